"""`make run`: embedded PostgreSQL and NATS, four services serving, a clean stop on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.accounts.v1 import account_service_pb2_grpc as accounts_grpc
from herald_common.embedded import free_port
from herald_common.grpc_server import health_status
from tests.harness import keyed_channel

SERVICES = ("campaign", "segmentation", "scheduler", "dispatch")


async def _serving(port: int) -> bool:
    return await health_status(f"127.0.0.1:{port}") == "SERVING"


def _processes_using(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(data_dir) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


async def test_platform_starts_embedded_servers_and_stops_cleanly(tmp_path: Path) -> None:
    ports: dict[str, int] = {}
    for name in SERVICES:
        ports[name] = free_port(avoid=set(ports.values()))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}
    env.update({f"HERALD_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    env.update({"HERALD_DATA_DIR": str(tmp_path / "data"), "HERALD_NAMESPACE": "launcher"})
    platform = subprocess.Popen(  # noqa: ASYNC220 - the platform runs for the whole test
        [sys.executable, "-m", "herald_common.platform"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while not all([await _serving(port) for port in ports.values()]):
            assert platform.poll() is None, platform.stdout.read().decode() if platform.stdout else ""
            assert asyncio.get_running_loop().time() < deadline, "services did not become SERVING"
            await asyncio.sleep(0.3)
        assert _processes_using(tmp_path / "data"), "embedded servers should run under the data folder"

        # A development account exists, and its admin key (kept in the data folder) works.
        key_file = tmp_path / "data" / "dev-admin-key"
        while not key_file.exists() or not key_file.read_text():
            assert asyncio.get_running_loop().time() < deadline, "no development key"
            await asyncio.sleep(0.3)
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        campaign = f"127.0.0.1:{ports['campaign']}"
        async with keyed_channel(campaign, key_file.read_text()) as channel:
            account = await accounts_grpc.AccountServiceStub(channel).GetAccount(
                accounts_pb.GetAccountRequest()
            )
            assert account.display_name == "Development"
        async with grpc.aio.insecure_channel(campaign) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await accounts_grpc.AccountServiceStub(channel).GetAccount(accounts_pb.GetAccountRequest())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        platform.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(platform.wait, 60) == 0
        output = platform.stdout.read().decode() if platform.stdout else ""
        assert "platform_stopped" in output
        assert key_file.read_text() in output  # printed for the developer
        assert not any([await _serving(port) for port in ports.values()])
        assert _processes_using(tmp_path / "data") == [], "PostgreSQL and NATS must stop with the platform"
    finally:
        if platform.poll() is None:
            platform.kill()
