"""Scheduler service process: plans runs from campaign changes and executes them when due."""

from __future__ import annotations

from pathlib import Path

import grpc

from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc
from herald_common import runtime
from herald_common.auth import account_id_of
from herald_common.runtime import Infrastructure, ServiceHost
from herald_common.settings import Settings
from herald_scheduler.executor import RunExecutor
from herald_scheduler.live import LiveEngine
from herald_scheduler.planning import Planner
from herald_scheduler.release import Releaser, sample_progress
from herald_scheduler.runs import RunEvents, RunQueries
from herald_scheduler.servicer import PERMISSIONS, SchedulerServicer
from herald_scheduler.storage import SCHEMA, outbox

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SchedulerService"].full_name
MIGRATIONS = Path(__file__).parent / "migrations"
CONSUMER = "scheduler-campaigns"
ACCOUNTS_CONSUMER = "scheduler-accounts"
LIVE_CONSUMER = "scheduler-live-matches"
LIVE_BATCH = 32


def _account_changed_problem(event: events.AccountChanged) -> str | None:
    if account_id_of(event.account) is None:
        return f"AccountChanged names no account ({event.account!r})"
    return None


def _live_matches_problem(event: events.LiveMatches) -> str | None:
    if account_id_of(event.account) is None:
        return f"LiveMatches names no account ({event.account!r})"
    if any(not m.campaign.startswith("campaigns/") or not m.client_event_id for m in event.matches):
        return "LiveMatches with a match without campaign or client event id"
    return None


async def start(settings: Settings, port: int | None = None) -> ServiceHost:
    infra = await Infrastructure.open(
        settings, service="scheduler", schema=SCHEMA, migrations_dir=MIGRATIONS, outbox=outbox
    )
    run_events = RunEvents(infra.subjects)
    planner = Planner(infra.database, run_events)
    segmentation = infra.channel("segmentation")
    releaser = Releaser(infra.database, infra.subjects, run_events, infra.relay.notify, metrics=infra.metrics)
    executor = RunExecutor(
        infra.database,
        infra.subjects,
        run_events,
        segmentation,
        infra.relay.notify,
        releaser.notify,
        lease_seconds=settings.run_lease_seconds,
        metrics=infra.metrics,
    )
    live = LiveEngine(
        infra.database,
        infra.subjects,
        run_events,
        segmentation,
        infra.relay.notify,
        releaser.notify,
        metrics=infra.metrics,
    )
    servicer = SchedulerServicer(RunQueries(infra.database), infra.database)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_SchedulerServiceServicer_to_server(servicer, server)

    host = await ServiceHost.start(
        "scheduler",
        infra,
        [SERVICE_NAME],
        register,
        settings.port("scheduler") if port is None else port,
        permissions=PERMISSIONS,
    )

    async def apply_campaign_changes(changes: list[events.CampaignChanged]) -> None:
        await planner.apply(changes)
        infra.relay.notify()
        executor.notify()

    await infra.consume(
        owner="campaign",
        durable=CONSUMER,
        filter_subject=infra.subjects.campaign_changed,
        event_type=events.CampaignChanged,
        apply=apply_campaign_changes,
        problem=runtime.campaign_changed_problem,
    )

    async def apply_account_changes(changes: list[events.AccountChanged]) -> None:
        await planner.apply_accounts(changes)

    await infra.consume(
        owner="campaign",
        durable=ACCOUNTS_CONSUMER,
        filter_subject=infra.subjects.account_changed,
        event_type=events.AccountChanged,
        apply=apply_account_changes,
        problem=_account_changed_problem,
    )
    await infra.consume(
        owner="segmentation",
        durable=LIVE_CONSUMER,
        filter_subject=infra.subjects.live_matches,
        event_type=events.LiveMatches,
        apply=live.apply_matches,
        problem=_live_matches_problem,
        # A message holds up to 1,000 events' matches: a batch stays small in memory and in time.
        batch_size=LIVE_BATCH,
    )
    infra.watch(executor.loop, live.loop, *releaser.loops)
    if host.metrics_server is not None:
        host.metrics_server.add_sample(lambda: sample_progress(infra.database, infra.metrics))
    executor.start()
    releaser.start()
    live.start()
    host.on_stop.extend([executor.stop, live.stop, releaser.stop, segmentation.close])
    return host


def main() -> None:
    runtime.run(start)


if __name__ == "__main__":
    main()
