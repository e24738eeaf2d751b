"""`make run`: the whole platform on one machine.

Starts embedded PostgreSQL and NATS when DATABASE_URL / NATS_URL are not set, then the four
services as child processes; Ctrl-C or SIGTERM stops the services first, then the servers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.accounts.v1 import account_service_pb2_grpc as accounts_grpc
from herald_common.embedded import EmbeddedInfrastructure, default_data_dir
from herald_common.grpc_server import health_status
from herald_common.logging import configure_logging, get_logger
from herald_common.secret_box import new_key_setting
from herald_common.settings import Settings, service_ports

SERVICES = ["segmentation", "dispatch", "campaign", "scheduler"]

log = get_logger(__name__)


def local_secret(data_dir: Path, name: str, make: Callable[[], str]) -> str:
    """A secret of the local platform: made on first start, kept (owner-only) in the data folder."""
    path = data_dir / name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(make())
        log.info("local_secret_created", path=str(path))
    return path.read_text().strip()


def _serving(port: int) -> bool:
    return asyncio.run(health_status(f"127.0.0.1:{port}")) == "SERVING"


def development_account(data_dir: Path, campaign_port: int, bootstrap_token: str) -> str:
    """The admin key of the development account, created on the first start and kept in the data
    folder, so the README's grpcurl walkthrough works with `-H "authorization: Bearer <key>"`."""
    path = data_dir / "dev-admin-key"
    if path.exists():
        return path.read_text().strip()

    async def create() -> str:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{campaign_port}") as channel:
            stub: Any = accounts_grpc.AccountServiceStub(channel)
            created = await stub.CreateAccount(
                accounts_pb.CreateAccountRequest(account=accounts_pb.Account(display_name="Development")),
                metadata=(("authorization", f"Bootstrap {bootstrap_token}"),),
                timeout=10,
            )
            return str(created.key)

    key = asyncio.run(create())
    path.touch(mode=0o600)
    path.write_text(key)
    return key


DEFAULT_WEB_PORT = 8095
DEFAULT_RECEIPTS_PORT = 8096
SANDBOX_PORT = 8097


def main() -> None:
    configure_logging(os.environ.get("LOG_LEVEL", "info"))
    env = dict(os.environ)
    embedded: EmbeddedInfrastructure | None = None
    if not env.get("DATABASE_URL") or not env.get("NATS_URL"):
        embedded = EmbeddedInfrastructure(default_data_dir(), avoid_ports=service_ports(env).values())
        embedded.start()
        env = {**embedded.environment(), **{k: v for k, v in env.items() if v}}
    # Local fakes and sinks run on loopback; a deployment allows private networks explicitly.
    env.setdefault("HERALD_ALLOWED_DESTINATION_NETWORKS", "127.0.0.0/8,::1/128")
    # The web SDK and its API (dispatch's web pop-up worker), for a site on this machine, and
    # the endpoint providers post delivery receipts and replies to.
    env.setdefault("HERALD_WEB_PORT", str(DEFAULT_WEB_PORT))
    env.setdefault("HERALD_RECEIPTS_PORT", str(DEFAULT_RECEIPTS_PORT))
    data_dir = default_data_dir()
    if not env.get("HERALD_SECRET_KEYS"):
        env["HERALD_SECRET_KEYS"] = local_secret(data_dir, "secret-keys", lambda: new_key_setting("local"))
    for setting, name in (
        ("HERALD_SERVICE_TOKEN", "service-token"),
        ("HERALD_BOOTSTRAP_TOKEN", "bootstrap-token"),
    ):
        if not env.get(setting):
            env[setting] = local_secret(data_dir, name, lambda: secrets.token_urlsafe(32))
    children = [subprocess.Popen([sys.executable, "-m", f"herald_{name}.main"], env=env) for name in SERVICES]
    sandbox = env.get("HERALD_SANDBOX", "") not in ("", "0", "false")
    if sandbox:  # local stand-ins for every destination kind, recording what they receive
        command = [sys.executable, "-m", "herald_sandbox.sandbox", "--data-dir", str(data_dir)]
        children.append(subprocess.Popen([*command, "--port", str(SANDBOX_PORT)], env=env))
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        settings = Settings.from_env(env)
        campaign_port = settings.port("campaign")
        # "running" means every service answers, not only the one the development account needs.
        while not stopping and not all(_serving(settings.port(name)) for name in SERVICES):
            if any(c.poll() is not None for c in children):
                break
            time.sleep(0.5)
        if not stopping and all(c.poll() is None for c in children):
            key = development_account(data_dir, campaign_port, env["HERALD_BOOTSTRAP_TOKEN"])
            print(f"Herald is running. Development account admin key (kept in {data_dir / 'dev-admin-key'}):")
            print(f"  {key}")
            print(f"Web SDK: http://127.0.0.1:{env['HERALD_WEB_PORT']}/sdk.js")
            print(f"Provider receipts: http://127.0.0.1:{env['HERALD_RECEIPTS_PORT']}")
            if sandbox:
                print(
                    f"Sandbox destinations: http://127.0.0.1:{SANDBOX_PORT}/<segment|mparticle|twilio|"
                    "vonage|msg91|exotel|netcore> (credentials in the README; `make sandbox-log` shows "
                    "what they got)"
                )
            else:
                print("Sandbox destinations: off (HERALD_SANDBOX=1 make run starts them)")
            sys.stdout.flush()
        while not stopping:
            exited = [c for c in children if c.poll() is not None]
            if exited:
                log.error("service_exited", pid=exited[0].pid, code=exited[0].returncode)
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        if embedded is not None:
            embedded.stop()
        log.info("platform_stopped")
    if not stopping:
        sys.exit(1)


if __name__ == "__main__":
    main()
