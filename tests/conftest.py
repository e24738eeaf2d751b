"""Real PostgreSQL, real NATS JetStream, real gRPC servers on 127.0.0.1.

With DATABASE_URL and NATS_URL set the tests use those servers; otherwise they start embedded
ones. Every test session gets its own database and NATS namespace, removed at the end, so no
state carries over between runs.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from herald_common import clock
from herald_common.bus import Subjects, ensure_streams
from herald_common.embedded import EmbeddedInfrastructure
from herald_common.logging import configure_logging
from herald_common.settings import Settings
from herald_sandbox.segment_api import SegmentApi
from tests.harness import Platform, fresh_settings, running_platform

__all__ = ["Platform", "eventually"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--all-faults", action="store_true", help="run every case of the fault suite (`make chaos`)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --all-faults, the fault suite runs its fast subset only."""
    if config.getoption("--all-faults"):
        return
    slow = [item for item in items if item.get_closest_marker("full_chaos")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("full_chaos")]


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(PostgreSQL URL, NATS URL) of the servers the tests run against."""
    configure_logging(os.environ.get("LOG_LEVEL", "warning"))
    database_url, nats_url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
    if database_url and nats_url:
        yield database_url, nats_url
        return
    embedded = EmbeddedInfrastructure(Path(tmp_path_factory.mktemp("embedded")))
    embedded.start()
    try:
        yield embedded.database_url, embedded.nats_url
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
async def settings(servers: tuple[str, str]) -> AsyncIterator[Settings]:
    """Settings pointing at a fresh database and a fresh NATS namespace."""
    async with fresh_settings(*servers) as fresh:
        yield fresh


@pytest.fixture(scope="session")
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    async with running_platform(settings) as running:
        yield running


@pytest.fixture
async def js(settings: Settings) -> AsyncIterator[JetStreamContext]:
    """JetStream of the test namespace, its streams in place."""
    connection = await nats.connect(settings.nats_url)
    js = connection.jetstream()
    await ensure_streams(js, Subjects(settings.namespace))
    yield js
    await connection.close()


@pytest.fixture
async def segment_api() -> AsyncIterator[SegmentApi]:
    api = SegmentApi(write_keys={f"wk_{uuid.uuid4().hex}"})
    await api.start()
    yield api
    await api.stop()


async def eventually(
    check: Callable[[], Awaitable[object]], within: float = 30.0, interval: float = 0.1
) -> None:
    """Waits until `check` answers something truthy; fails the test with a clear message otherwise."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


# Monday 23 November 2026, noon UTC: where tests that move the clock start.
CLOCK_START = datetime(2026, 11, 23, 12, tzinfo=UTC)


@pytest.fixture
def manual_clock() -> Iterator[clock.ManualClock]:
    """Makes every service read a clock the test moves, from CLOCK_START; restored afterwards."""
    manual = clock.ManualClock(CLOCK_START)
    previous = clock.use(manual)
    yield manual
    clock.use(previous)


@pytest.fixture(autouse=True)
async def report_hung_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test about to reach its time limit prints what every task of the loop is waiting on
    (the time-limit report shows threads only, and the loop's thread is always in select)."""
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(request.config.getini("timeout"))

    async def report_when_late() -> None:
        await asyncio.sleep(max(limit - 10, 1))
        for task in asyncio.all_tasks():
            print(f"--- task {task.get_name()}")
            task.print_stack(file=sys.stdout)

    watchdog = asyncio.create_task(report_when_late(), name="hung-task-report")
    yield
    watchdog.cancel()


@pytest.fixture(autouse=True)
def keep_collections_short() -> None:
    """Puts what the test process holds before each test out of the collector's sight: a full
    collection then scans only the test's own objects, and does not stall the fake servers (which
    run in this process) long enough to bunch the arrival times rate-limit tests measure."""
    gc.freeze()
