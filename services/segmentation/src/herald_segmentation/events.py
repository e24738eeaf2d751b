"""Events: what users did, recorded once each and announced on JetStream through the outbox."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa

from herald.events.v1 import events_pb2
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api
from herald_common.auth import (
    ANONYMOUS_PREFIX,
    PUBLISHABLE_ROLE,
    account_name,
    current_account_id,
    current_caller,
    identity_secret,
    user_signature_matches,
)
from herald_common.bus import Subjects
from herald_common.db import Database, Statement, Target
from herald_common.errors import Validator
from herald_common.outbox import OutboxEvent, enqueue
from herald_segmentation.activity import count_activity
from herald_segmentation.live import LIVE_TURN_SHARED, LiveTriggers
from herald_segmentation.properties import (
    MAX_PROPERTY_KEYS,
    SERVER_ONLY_KEYS,
    USER,
    PropertyType,
    SentTypes,
    check_properties,
    event_subject,
    plain_properties,
    struct_values,
)
from herald_segmentation.storage import LARGE_PROPERTIES, SCHEMA, outbox
from herald_segmentation.visitors import aliases

# A call's bytes are bounded where it arrives (herald_common.limits: 1 MiB).
MAX_EVENTS = 1000
# An event of this name sets the user's custom properties from its own.
PROFILE_EVENT = "herald.profile"
MAX_AHEAD_SECONDS = 86400.0
EARLIEST_SECONDS = datetime(2000, 1, 1, tzinfo=UTC).timestamp()

# An index entry holds at most about 2.7 KB: the key columns take up to about 1 KB (a name of 200
# characters, a user id of 200), so properties over LARGE_PROPERTIES bytes go to event_bodies.
# The batch comes as one JSON document: one parameter to encode, where arrays cost a check per item;
# read as jsonb, whose records hand over each event's properties without parsing them again
# (json_to_recordset took five times as long).
# Users are added in user id order, so that two calls adding the same users cannot deadlock.
# Known users are left out before the insert: a lookup costs less than ON CONFLICT's
# speculative insertion, and nearly every event is of a known user.
_NEW_USERS = f"""
    , new_users AS (
        INSERT INTO {SCHEMA}.users (account_id, user_id)
        SELECT DISTINCT :account_id, s.user_id FROM stored s
        WHERE NOT EXISTS (
            SELECT 1 FROM {SCHEMA}.users u WHERE u.account_id = :account_id AND u.user_id = s.user_id
        )
        ORDER BY s.user_id
        ON CONFLICT DO NOTHING
    )"""


def _record_statement(adds_users: bool) -> Statement:
    """Records a batch of events once each, answering the client ids recorded before; with
    `adds_users`, makes the users not known yet. An event is recorded once by its receipt: its own
    client id, or the id of the report it came in with (all of a report's events are recorded
    together, so one receipt serves them all)."""
    return Statement(
        f"""
    WITH turn AS (
        SELECT {LIVE_TURN_SHARED}
    ), incoming AS (
        SELECT e.c AS client_event_id, coalesce(e.r, e.c) AS receipt, e.u AS user_id, e.n AS name,
               e.t AS occurred_at, e.p AS properties, pg_column_size(e.p) > {LARGE_PROPERTIES} AS large
        FROM jsonb_to_recordset(CAST(:events AS jsonb))
             AS e(c text, r text, u text, n text, t float8, p jsonb)
        CROSS JOIN turn
    ), fresh AS (
        INSERT INTO {SCHEMA}.event_receipts (account_id, client_event_id)
        SELECT DISTINCT :account_id, receipt FROM incoming
        ON CONFLICT DO NOTHING
        RETURNING client_event_id AS receipt
    ), kept AS (
        SELECT incoming.* FROM incoming JOIN fresh USING (receipt)
    ), stored AS (
        INSERT INTO {SCHEMA}.events
            (account_id, user_id, name, occurred_at, properties, received_at, client_event_id)
        SELECT :account_id, user_id, name, to_timestamp(occurred_at),
               CASE WHEN large THEN to_jsonb(client_event_id) ELSE properties END,
               to_timestamp(:received), client_event_id
        FROM kept
        RETURNING user_id
    ), bodies AS (
        INSERT INTO {SCHEMA}.event_bodies (account_id, client_event_id, properties)
        SELECT :account_id, client_event_id, properties FROM kept WHERE large
    ){_NEW_USERS if adds_users else ""}
    SELECT client_event_id FROM incoming WHERE receipt NOT IN (SELECT receipt FROM fresh)
    """
    )


_RECORD = _record_statement(adds_users=True)
# Herald's own events are of users it delivered to: they exist, and one deleted meanwhile must not
# be made again by a late report.
_RECORD_OWN = _record_statement(adds_users=False)
# Profile events' properties merged into their users' profiles, in one statement for the batch.
_SET_PROPERTIES = Statement(
    f"""
    UPDATE {SCHEMA}.users u SET properties = u.properties || CAST(p.properties AS jsonb), updated_at = now()
    FROM unnest(CAST(:users AS text[]), CAST(:properties AS text[])) AS p(user_id, properties)
    WHERE u.account_id = :account_id AND u.user_id = p.user_id
    """
)
# The users among :users whose profile holds more than :most properties, with their count.
_OVERSIZED_PROFILES = Statement(
    f"""
    SELECT user_id, keys FROM (
        SELECT user_id, (SELECT count(*) FROM jsonb_object_keys(properties)) AS keys
        FROM {SCHEMA}.users WHERE account_id = :account_id AND user_id = ANY(CAST(:users AS text[]))
    ) counted WHERE keys > :most
    """
)


def _month(seconds: float) -> date:
    moment = datetime.fromtimestamp(seconds, UTC)
    return date(moment.year, moment.month, 1)


def _next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


STRING = PropertyType.STRING


class OwnEvent(NamedTuple):
    """An event Herald made: a template of its name, time and the properties it shares with
    others (one template serves a report's events), its user and id, and its properties of its
    own. Its message is made only for the announcement, where it costs least."""

    template: pb.Event
    user_id: str
    client_id: str
    extra: dict[str, str]
    values: dict[str, str]  # every property (all strings), the template's and its own
    # What it is recorded once by: its report's id, shared by the report's events (which are then
    # recorded together, in one call); "" for its own client id.
    receipt: str = ""


class _Received(NamedTuple):
    source: pb.Event | OwnEvent  # a caller's event as it came, or one of Herald's own
    client_id: str
    user_id: str
    name: str
    when: float  # seconds since the epoch
    values: dict[str, Any]


def _receipt_of(received: _Received) -> str | None:
    """What the event is recorded once by, when not its own client id (None): its report's id."""
    source = received.source
    return (source.receipt or None) if isinstance(source, OwnEvent) else None


def _report(event: pb.Event, when: float, now: float, path: str, check: Validator) -> None:
    """Says what is wrong with an event that failed the quick check."""
    check.require(
        api.is_valid_id(event.user_id), f"{path}.user_id", "required: 1-200 letters, digits or ._:@+-"
    )
    check.require(
        bool(event.name.strip()) and len(event.name) <= 200 and "\x00" not in event.name,
        f"{path}.name",
        "required: 1-200 characters, no NUL",
    )
    check.require(
        0 < len(event.client_event_id) <= 200, f"{path}.client_event_id", "required: 1-200 characters"
    )
    for name in ("client_event_id", "user_signature"):
        check.require("\x00" not in getattr(event, name), f"{path}.{name}", "must not contain NUL characters")
    check.require(when <= now + MAX_AHEAD_SECONDS, f"{path}.time", "at most one day ahead of now")
    check.require(when >= EARLIEST_SECONDS, f"{path}.time", "in 2000 or later")


class Events:
    def __init__(
        self,
        database: Database,
        subjects: Subjects,
        notify_outbox: Callable[[], None],
        service_token: str = "",
        live: LiveTriggers | None = None,
    ) -> None:
        self.database = database
        # Matches recorded events against live campaigns' triggers, in the recording transaction.
        self.live = live
        self.subjects = subjects
        self.notify_outbox = notify_outbox
        # Derives each account's identity secret, which publishable keys' profile events prove.
        self.service_token = service_token
        self._partitions: set[date] = set()

    async def _ensure_partitions(self, months: set[date]) -> None:
        """Makes the month partitions these events go to (each once per process)."""
        for month in sorted(months - self._partitions):
            async with self.database.transaction() as session:
                await session.execute(
                    sa.text("SELECT pg_advisory_xact_lock(hashtext('segmentation:events'))")
                )
                await session.execute(
                    sa.text(
                        f"CREATE TABLE IF NOT EXISTS {SCHEMA}.events_{month:%Y_%m} "
                        f"PARTITION OF {SCHEMA}.events FOR VALUES "
                        f"FROM ('{month.isoformat()}') TO ('{_next_month(month).isoformat()}')"
                    )
                )
            self._partitions.add(month)

    def _validate(
        self, batch: Sequence[pb.Event], now: float
    ) -> tuple[list[_Received], SentTypes, Validator]:
        check = Validator()
        check.require(0 < len(batch) <= MAX_EVENTS, "events", f"between 1 and {MAX_EVENTS} events")
        types = SentTypes()
        parsed = []
        caller = current_caller()
        # A publishable key (a web page): profile events need the user's signature, and never
        # touch what only the account's server may set.
        browser_secret = (
            identity_secret(self.service_token, caller.account)
            if caller is not None and caller.role == PUBLISHABLE_ROLE
            else None
        )
        # The shapes (event name and property types) already added: a batch repeats a few, and
        # the first event of each is the one a conflict is reported at.
        shapes: set[tuple[str, tuple[tuple[str, PropertyType], ...]]] = set()
        for i, event in enumerate(batch):
            # Fields read once (each read of a message field makes a new string), and checked
            # without building a message or a path unless something is wrong: this runs per event.
            # Each string field is checked for NUL here (the interceptor leaves this method's to it).
            user_id, name, client_id = event.user_id, event.name, event.client_event_id
            if event.HasField("time"):
                sent = event.time
                when = sent.seconds + sent.nanos / 1e9
            else:
                when = now
            if not (
                api.is_valid_id(user_id)
                and 0 < len(name) <= 200
                and name.strip()
                and "\x00" not in name
                and 0 < len(client_id) <= 200
                and "\x00" not in client_id
                and "\x00" not in event.user_signature
                and EARLIEST_SECONDS <= when <= now + MAX_AHEAD_SECONDS
            ):
                _report(event, when, now, f"events[{i}]", check)
            plain = plain_properties(event.properties)
            if plain is None:
                path = f"events[{i}].properties"
                values = struct_values(event.properties, path, check)
                kinds = check_properties(values, path, check)
            else:
                values, kinds = plain
            if browser_secret is not None and name == PROFILE_EVENT:
                _check_from_browser(event, values, browser_secret, f"events[{i}]", check)
            if kinds and (shape := (name, tuple(kinds.items()))) not in shapes:
                shapes.add(shape)
                subject = USER if name == PROFILE_EVENT else event_subject(name)
                types.add(f"events[{i}].properties", subject, kinds)
            parsed.append(_Received(event, client_id, user_id, name, when, values))
        return parsed, types, check

    async def ingest(self, batch: Sequence[pb.Event]) -> tuple[int, int]:
        """Records the events not recorded before; returns (accepted, duplicates)."""
        received = api.utcnow()
        parsed, types, check = self._validate(batch, received.timestamp())
        return await self._record(parsed, types, check, received, _RECORD)

    async def ingest_own(self, made: Sequence[OwnEvent]) -> tuple[int, int]:
        """Records events Herald made from its own identifiers (a delivery's id, campaign and user):
        well-formed by construction, so they are not checked one by one, and their properties are
        strings. Returns (accepted, duplicates), as `ingest` does."""
        received = api.utcnow()
        types = SentTypes()
        typed: set[tuple[str, ...]] = set()
        parsed = []
        template: pb.Event | None = None
        name, when = "", 0.0
        for i, own in enumerate(made):
            if own.template is not template:  # a report's events share one: read it once
                template = own.template
                name, time = template.name, template.time
                when = time.seconds + time.nanos / 1e9
            values = own.values
            if (shape := (name, *values)) not in typed:
                typed.add(shape)
                types.add(f"events[{i}].properties", event_subject(name), dict.fromkeys(values, STRING))
            parsed.append(_Received(own, own.client_id, own.user_id, name, when, values))
        return await self._record(parsed, types, Validator(), received, _RECORD_OWN)

    async def _record(
        self,
        parsed: list[_Received],
        types: SentTypes,
        check: Validator,
        received: datetime,
        statement: Statement,
    ) -> tuple[int, int]:
        account_id = current_account_id()
        await types.check(self.database, account_id, check)
        check.raise_if_any()
        # The first of several events with one client id in a call counts; the others are duplicates.
        unique = list({r.client_id: r for r in reversed(parsed)}.values())
        unique.reverse()
        await self._ensure_partitions({_month(day) for day in {int(r.when) // 86400 * 86400 for r in unique}})
        # On a direct connection: this runs for every call, and a session would cost more than
        # its statements.
        async with self.database.direct_transaction() as connection:
            await types.record(connection, account_id, check)
            unique = await _as_merged(connection, account_id, unique)
            # The statement names the duplicates, which are few: nearly every event is new.
            found = await statement.fetch(
                connection,
                account_id=account_id,
                received=received.timestamp(),
                events=orjson.dumps(
                    [
                        {
                            "c": r.client_id,
                            "r": _receipt_of(r),
                            "u": r.user_id,
                            "n": r.name,
                            "t": r.when,
                            "p": r.values,
                        }
                        for r in unique
                    ]
                ).decode(),
            )
            duplicates = {row[0] for row in found}
            recorded = [r for r in unique if r.client_id not in duplicates] if duplicates else unique
            if recorded:
                await self._apply_profile_events(connection, account_id, recorded)
                await self._refuse_oversized_profiles(connection, account_id, parsed, recorded)
                await count_activity(connection, account_id, recorded)
                announced = [self._announcement(account_id, recorded, received)]
                if self.live is not None:
                    announced += await self.live.match(connection, account_id, recorded, received)
                await enqueue(connection, outbox, announced)
        if recorded:
            self.notify_outbox()
        return len(recorded), len(parsed) - len(recorded)

    @staticmethod
    async def _refuse_oversized_profiles(
        target: Target, account_id: uuid.UUID, parsed: list[_Received], recorded: list[_Received]
    ) -> None:
        """Refuses the whole call when a profile event took a profile past MAX_PROPERTY_KEYS.
        Counted after the merge in the writing transaction, whose row locks make concurrent calls
        for one user take turns, so two calls cannot each pass with half of the keys."""
        touched = {r.user_id for r in recorded if r.name == PROFILE_EVENT}
        if not touched:
            return
        rows = await _OVERSIZED_PROFILES.fetch(
            target, account_id=account_id, users=sorted(touched), most=MAX_PROPERTY_KEYS
        )
        check = Validator()
        for user_id, keys in rows:
            first = next(i for i, r in enumerate(parsed) if r.name == PROFILE_EVENT and r.user_id == user_id)
            check.add(
                f"events[{first}].properties",
                f"the profile would hold {keys:,} properties; at most {MAX_PROPERTY_KEYS:,}",
            )
        check.raise_if_any()

    @staticmethod
    async def _apply_profile_events(target: Target, account_id: uuid.UUID, recorded: list[_Received]) -> None:
        merged: dict[str, dict[str, Any]] = {}
        for r in sorted(recorded, key=lambda r: r.when):  # the newest value wins
            if r.name == PROFILE_EVENT:
                merged.setdefault(r.user_id, {}).update(r.values)
        if merged:
            await _SET_PROPERTIES.execute(
                target,
                account_id=account_id,
                users=list(merged),
                properties=[orjson.dumps(values).decode() for values in merged.values()],
            )

    def _announcement(self, account_id: uuid.UUID, recorded: list[_Received], now: datetime) -> OutboxEvent:
        """EventsIngested: the recorded events, those sent without a time given the receive time."""
        event_id = str(uuid.uuid4())
        receive_time = api.timestamp(now)
        head = events_pb2.EventsIngested(
            event_id=event_id, account=account_name(account_id), receive_time=receive_time
        ).SerializeToString()
        # A caller's event is appended in its wire form (field 3, length-delimited): adding it to
        # the message would copy it first. Herald's own are made in a message of their own from
        # their templates, and appended as its wire form (the events field of both is field 3).
        parts = [head]
        own = events_pb2.EventsIngested()
        add_own = own.events.add
        for r in recorded:
            source = r.source
            if isinstance(source, OwnEvent):
                event = add_own()
                event.MergeFrom(source.template)
                event.user_id, event.client_event_id = r.user_id, r.client_id
                fields = event.properties.fields
                for key, value in source.extra.items():
                    fields[key].string_value = value
                continue
            if not source.HasField("time"):
                source.time.CopyFrom(receive_time)
            data = source.SerializeToString()
            parts.append(_EVENTS_TAG + _varint(len(data)) + data)
        parts.append(own.SerializeToString())
        return OutboxEvent(self.subjects.events_ingested, b"".join(parts), event_id)


# EventsIngested.events: field 3, length-delimited.
_EVENTS_TAG = bytes([events_pb2.EventsIngested.EVENTS_FIELD_NUMBER << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


async def _as_merged(target: Target, account_id: uuid.UUID, received: list[_Received]) -> list[_Received]:
    """The events, those of anonymous visitors merged into a user since made the user's."""
    merged = await aliases(target, account_id, {r.user_id for r in received})
    if not merged:
        return received
    for r in received:
        if r.user_id in merged and isinstance(r.source, pb.Event):
            r.source.user_id = merged[r.user_id]  # announced as recorded
    return [r._replace(user_id=merged[r.user_id]) if r.user_id in merged else r for r in received]


def _check_from_browser(
    event: pb.Event, values: dict[str, Any], secret: str, path: str, check: Validator
) -> None:
    """A profile event sent with a publishable key: an identified user's needs their signature,
    and keys only the account's server may set are refused."""
    user_id = event.user_id
    if not user_id.startswith(ANONYMOUS_PREFIX):
        if not event.user_signature:
            check.add(
                f"{path}.user_signature", "required to change an identified user's profile from a browser"
            )
        elif not user_signature_matches(secret, user_id, event.user_signature):
            check.add(f"{path}.user_signature", "does not match the user id")
    for key in sorted(SERVER_ONLY_KEYS & values.keys()):
        check.add(f"{path}.properties.{key}", "only the account's server sets this (UpsertUsers)")
