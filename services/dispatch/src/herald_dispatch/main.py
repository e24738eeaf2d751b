"""Dispatch service process: the destinations API and the destination workers.

HERALD_DISPATCH_WORKERS picks the workers this process runs (comma-separated, default
`segment`; empty for an API-only process), so each worker type can scale on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import grpc

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as pb_grpc
from herald_common import runtime
from herald_common.runtime import Infrastructure, ServiceHost
from herald_common.settings import Settings
from herald_dispatch.destinations import Destinations
from herald_dispatch.segment import SegmentChannel
from herald_dispatch.servicer import DispatchServicer
from herald_dispatch.storage import SCHEMA, outbox
from herald_dispatch.worker import DeliveryWorker

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DispatchService"].full_name
MIGRATIONS = Path(__file__).parent / "migrations"
WORKER_TYPES = ("segment",)


def worker_types_from_env() -> list[str]:
    raw = os.environ.get("HERALD_DISPATCH_WORKERS", "segment")
    chosen = [w.strip() for w in raw.split(",") if w.strip()]
    unknown = set(chosen) - set(WORKER_TYPES)
    if unknown:
        raise RuntimeError(f"unknown HERALD_DISPATCH_WORKERS {sorted(unknown)}; known: {WORKER_TYPES}")
    return chosen


async def start(settings: Settings, port: int | None = None, workers: list[str] | None = None) -> ServiceHost:
    infra = await Infrastructure.open(
        settings, service="dispatch", schema=SCHEMA, migrations_dir=MIGRATIONS, outbox=outbox
    )
    destinations = Destinations(infra.database)
    servicer = DispatchServicer(destinations)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_DispatchServiceServicer_to_server(servicer, server)

    host = await ServiceHost.start(
        "dispatch", infra, [SERVICE_NAME], register, settings.port("dispatch") if port is None else port
    )
    http = aiohttp.ClientSession()
    host.on_stop.append(http.close)
    for worker_type in worker_types_from_env() if workers is None else workers:
        if worker_type == "segment":
            worker = DeliveryWorker(infra, destinations, SegmentChannel(http))
            await worker.start()
    return host


def main() -> None:
    runtime.run(start)


if __name__ == "__main__":
    main()
