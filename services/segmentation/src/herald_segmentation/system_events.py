"""Events Herald records itself, so live triggers, goals and segments can use them as any other:

- `Notification Delivered`: a delivery receipt said so, or an export was accepted;
- `Notification Replied`: an SMS reply came in from the user's number;
- `Control Group`: a campaign held the user back;
- `App Version Changed`: a device of the profile now reports another app version;
- `Notification Viewed` and `Notification Clicked`: a visitor saw a web pop-up, or clicked it.

Each is recorded through IngestEvents' own path, as the account, with a client event id that
follows from what caused it: a report handled twice records its events once. Those made only of
Herald's own identifiers (a delivery's id, campaign and user) skip the checks a caller's events
need; a reply's text and a device's versions come from outside and are checked.
"""

from __future__ import annotations

import itertools
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from herald.events.v1 import events_pb2 as events
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api, channels
from herald_common.auth import account_id_of, act_as, service_caller
from herald_common.db import Database
from herald_common.live import (
    APP_VERSION_CHANGED,
    CONTROL_GROUP,
    NOTIFICATION_CLICKED,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_REPLIED,
    NOTIFICATION_VIEWED,
)
from herald_common.skips import SkipReason
from herald_segmentation.events import MAX_EVENTS, Events, OwnEvent
from herald_segmentation.storage import users


def _event(user_id: str, name: str, client_id: str, at: Timestamp | datetime, **properties: str) -> pb.Event:
    """An event, its properties set field by field (Struct.update goes through a slower, general
    path)."""
    event = pb.Event(user_id=user_id, name=name, client_event_id=client_id)
    event.time.CopyFrom(at if isinstance(at, Timestamp) else api.timestamp(at))
    fields = event.properties.fields
    for key, value in properties.items():
        fields[key].string_value = value
    return event


def _own(user_id: str, name: str, client_id: str, at: Timestamp | datetime, **properties: str) -> OwnEvent:
    """An event of Herald's own identifiers, with a template of its own."""
    return OwnEvent(_event("", name, "", at, **properties), user_id, client_id, {}, properties)


def app_version_events(
    user_id: str, changed: Sequence[tuple[str, str, str]], at: datetime, cause: str
) -> list[pb.Event]:
    """`App Version Changed` for each (device, from, to) of a profile; `cause` makes the ids."""
    return [
        _event(
            user_id,
            APP_VERSION_CHANGED,
            f"herald:app-version:{cause}:{user_id}:{device}",
            at,
            device_id=device,
            previous_version=before,
            app_version=after,
        )
        for device, before, after in changed
    ]


class _CampaignEvents:
    """Events of one campaign's deliveries, sharing a template of each name (the campaign and the
    time), each with its user, id and delivery."""

    def __init__(self, campaign: str, at: Timestamp, receipt: str) -> None:
        self.campaign = campaign
        self.at = at
        self.receipt = receipt  # the report's: its events are recorded once, together
        self._templates: dict[str, pb.Event] = {}

    def made(self, user_id: str, name: str, client_id: str, delivery_id: str) -> OwnEvent:
        template = self._templates.get(name)
        if template is None:
            template = self._templates[name] = _event("", name, "", self.at, campaign=self.campaign)
        return OwnEvent(
            template,
            user_id,
            client_id,
            {"delivery_id": delivery_id},
            {"campaign": self.campaign, "delivery_id": delivery_id},
            self.receipt,
        )


def _calls(made: Sequence[OwnEvent], most: int) -> Iterator[list[OwnEvent]]:
    """`made` in calls of about `most` events, never parting the events of one receipt (a
    report's, recorded all or none): a report larger than `most` is a call of its own."""
    call: list[OwnEvent] = []
    for _, group in itertools.groupby(made, key=lambda own: own.receipt or own.client_id):
        events_of_receipt = list(group)
        if call and len(call) + len(events_of_receipt) > most:
            yield call
            call = []
        call += events_of_receipt
    if call:
        yield call


class _Report(Protocol):
    @property
    def account(self) -> str: ...


def _outcome_events(report: events.DeliveryOutcomes) -> list[OwnEvent]:
    kind = channels.of_type(report.destination_type)
    delivered_on_acceptance = kind is not None and kind.accepted_is_delivered
    # The report's events are recorded once by its id: the ledger reports each delivery's outcome
    # in one report only ("": each event by its own id, for a report without an id).
    receipt = f"herald:outcomes:{report.event_id}" if report.event_id else ""
    made = _CampaignEvents(report.campaign, report.occur_time, receipt).made
    found = []
    for result in report.results:
        delivery_id = result.delivery_id
        if result.status == events.DELIVERY_STATUS_SKIPPED and result.reason == SkipReason.CONTROL_GROUP:
            found.append(
                made(result.user_id, CONTROL_GROUP, f"herald:control-group:{delivery_id}", delivery_id)
            )
        elif result.status == events.DELIVERY_STATUS_SENT and delivered_on_acceptance:
            found.append(
                made(result.user_id, NOTIFICATION_DELIVERED, f"herald:delivered:{delivery_id}", delivery_id)
            )
    return found


# A pop-up interaction's system event, and the word its client event id is made with.
_POPUP_EVENTS = {
    events.WEB_INTERACTION_KIND_VIEWED: (NOTIFICATION_VIEWED, "viewed"),
    events.WEB_INTERACTION_KIND_CLICKED: (NOTIFICATION_CLICKED, "clicked"),
}


def _popup_events(report: events.WebInteractions) -> list[OwnEvent]:
    return [
        _own(
            result.user_id,
            _POPUP_EVENTS[result.kind][0],
            f"herald:{_POPUP_EVENTS[result.kind][1]}:{result.delivery_id}",
            result.occur_time,
            campaign=report.campaign,
            delivery_id=result.delivery_id,
        )
        for result in report.results
        if result.kind in _POPUP_EVENTS and result.user_id
    ]


class SystemEvents:
    def __init__(self, database: Database, recorder: Events) -> None:
        self.database = database
        self.recorder = recorder

    async def record(self, account_id: uuid.UUID, recorded: Sequence[pb.Event]) -> None:
        """Records the events as the account does through IngestEvents, a call's worth at a time."""
        act_as(service_caller(account_id))
        for start in range(0, len(recorded), MAX_EVENTS):
            chunk = list(recorded[start : start + MAX_EVENTS])
            await self.recorder.ingest(chunk)

    async def record_own(self, account_id: uuid.UUID, made: Sequence[OwnEvent]) -> None:
        """Records events of Herald's own identifiers as the account, a call's worth at a time."""
        act_as(service_caller(account_id))
        for call in _calls(made, MAX_EVENTS):
            await self.recorder.ingest_own(call)

    async def record_reports(
        self, reports: Sequence[_Report], events_of: Callable[[Any], list[OwnEvent]]
    ) -> None:
        """Records the events each report makes, each account's together: the many small reports
        of a busy campaign, fetched as one batch, make few writes."""
        by_account: dict[uuid.UUID, list[OwnEvent]] = defaultdict(list)
        for report in reports:
            account_id = account_id_of(report.account)
            if account_id is not None:
                by_account[account_id] += events_of(report)
        for account_id, made in sorted(by_account.items()):
            await self.record_own(account_id, made)

    async def from_outcomes(self, received: Sequence[events.DeliveryOutcomes]) -> None:
        """Control Group for users held back; Notification Delivered for exports accepted."""
        await self.record_reports(received, _outcome_events)

    async def from_receipts(self, received: Sequence[events.DeliveryReceipts]) -> None:
        """Notification Delivered for each delivery a provider's receipt says was delivered."""
        now = api.timestamp(api.utcnow())

        def delivered(report: events.DeliveryReceipts) -> list[OwnEvent]:
            # Each by its own id: a delivery's receipts may come in more than one report.
            made = _CampaignEvents(report.campaign, now, "").made
            return [
                made(
                    result.user_id,
                    NOTIFICATION_DELIVERED,
                    f"herald:delivered:{result.delivery_id}",
                    result.delivery_id,
                )
                for result in report.results
                if result.status == events.RECEIPT_STATUS_DELIVERED and result.user_id
            ]

        await self.record_reports(received, delivered)

    async def from_popups(self, received: Sequence[events.WebInteractions]) -> None:
        """Notification Viewed and Notification Clicked for what visitors did with web pop-ups."""
        await self.record_reports(received, _popup_events)

    async def from_replies(self, received: Sequence[events.SmsReplied]) -> None:
        """Notification Replied for each user of the account with the number that replied."""
        by_account: dict[uuid.UUID, list[events.SmsReplied]] = defaultdict(list)
        for reply in received:
            account_id = account_id_of(reply.account)
            if account_id is not None:
                by_account[account_id].append(reply)
        for account_id, replies in sorted(by_account.items()):
            async with self.database.transaction() as session:
                rows = await session.execute(
                    sa.select(users.c.user_id, users.c.phone).where(
                        users.c.account_id == account_id, users.c.phone.in_({r.phone for r in replies})
                    )
                )
                holders: dict[str, list[str]] = defaultdict(list)
                for row in rows:
                    holders[row.phone].append(row.user_id)
            found = [
                _event(
                    user_id,
                    NOTIFICATION_REPLIED,
                    f"herald:replied:{reply.event_id}:{user_id}",
                    reply.occur_time,
                    text=reply.text,
                    destination=reply.destination,
                )
                for reply in replies
                for user_id in holders.get(reply.phone, [])
            ]
            await self.record(account_id, found)

    async def from_queue(self, received: Sequence[events.SystemEvents]) -> None:
        """Events segmentation queued itself, with the change that caused them."""
        for queued in received:
            account_id = account_id_of(queued.account)
            if account_id is not None:
                await self.record(account_id, list(queued.events))
