"""Segmentation service process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from herald.events.v1 import events_pb2 as events
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from herald_common import runtime
from herald_common.auth import account_id_of
from herald_common.campaign_usage import CampaignUsage
from herald_common.runtime import Infrastructure, ServiceHost
from herald_common.settings import Settings
from herald_segmentation.domain import Segmentation
from herald_segmentation.events import Events
from herald_segmentation.lists import Lists
from herald_segmentation.live import LiveTriggers
from herald_segmentation.profiles import Profiles
from herald_segmentation.servicer import PERMISSIONS, SegmentationServicer
from herald_segmentation.storage import SCHEMA, outbox
from herald_segmentation.system_events import SystemEvents
from herald_segmentation.visitors import Visitors

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name
MIGRATIONS = Path(__file__).parent / "migrations"


async def start(settings: Settings, port: int | None = None) -> ServiceHost:
    infra = await Infrastructure.open(
        settings, service="segmentation", schema=SCHEMA, migrations_dir=MIGRATIONS, outbox=outbox
    )
    campaign_service = infra.channel("campaign")
    usage = CampaignUsage(campaign_service)
    profiles = Profiles(infra.database, infra.subjects)
    live = LiveTriggers(infra.database, infra.subjects, infra.relay.notify)
    recorder = Events(infra.database, infra.subjects, infra.relay.notify, settings.service_token, live)
    system = SystemEvents(infra.database, recorder)
    servicer = SegmentationServicer(
        profiles=profiles,
        events=recorder,
        lists=Lists(infra.database, usage),
        segments=Segmentation(infra.database, usage),
        visitors=Visitors(infra.database, infra.subjects, infra.relay.notify, settings.service_token),
    )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_SegmentationServiceServicer_to_server(servicer, server)

    host = await ServiceHost.start(
        "segmentation",
        infra,
        [SERVICE_NAME],
        register,
        settings.port("segmentation") if port is None else port,
        permissions=PERMISSIONS,
    )
    host.on_stop.append(campaign_service.close)
    await infra.consume(
        owner="dispatch",
        durable="segmentation-sms-opt-outs",
        filter_subject=infra.subjects.sms_opt_outs,
        event_type=events.SmsOptOut,
        apply=profiles.opt_out_of_sms,
        problem=_opt_out_problem,
    )
    for owner, durable, subject, event_type, apply in (
        (
            "dispatch",
            "segmentation-system-outcomes",
            infra.subjects.delivery_outcomes,
            events.DeliveryOutcomes,
            system.from_outcomes,
        ),
        (
            "dispatch",
            "segmentation-system-receipts",
            infra.subjects.delivery_receipts,
            events.DeliveryReceipts,
            system.from_receipts,
        ),
        (
            "dispatch",
            "segmentation-system-replies",
            infra.subjects.sms_replies,
            events.SmsReplied,
            system.from_replies,
        ),
        (
            "dispatch",
            "segmentation-system-popups",
            infra.subjects.web_interactions,
            events.WebInteractions,
            system.from_popups,
        ),
        (
            "segmentation",
            "segmentation-system-events",
            infra.subjects.system_events,
            events.SystemEvents,
            system.from_queue,
        ),
    ):
        await infra.consume(
            owner=owner,
            durable=durable,
            filter_subject=subject,
            event_type=event_type,
            apply=apply,  # type: ignore[arg-type]
            problem=_names_an_account,
        )
    await infra.consume(
        owner="campaign",
        durable="segmentation-live-triggers",
        filter_subject=infra.subjects.campaign_changed,
        event_type=events.CampaignChanged,
        apply=live.apply_campaigns,
        problem=runtime.campaign_changed_problem,
    )
    return host


def _names_an_account(event: Any) -> str | None:
    if account_id_of(event.account) is None:
        return f"{type(event).__name__} names no account ({event.account!r})"
    return None


def _opt_out_problem(event: events.SmsOptOut) -> str | None:
    if account_id_of(event.account) is None or not event.phone:
        return f"SmsOptOut without an account or a phone ({event.account!r}, {event.phone!r})"
    return None


def main() -> None:
    runtime.run(start)


if __name__ == "__main__":
    main()
