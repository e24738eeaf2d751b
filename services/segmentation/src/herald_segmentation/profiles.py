"""User profiles: custom properties, system fields and devices."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import date
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.events.v1 import events_pb2 as events
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api
from herald_common.auth import account_id_of, account_name, current_account_id, current_caller
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.errors import NotFound, ResourceExhausted, Validator
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.sms import E164
from herald_common.timing import zone_named
from herald_common.validation import check_text_fields
from herald_segmentation.properties import USER, SentTypes, as_python, check_properties
from herald_segmentation.storage import devices, outbox, users
from herald_segmentation.system_events import app_version_events

MAX_UPSERT = 1000
# A profile's properties, as JSON, are at most this large: a page of an audience, a delivery batch
# and a destination's event all stay within their limits.
MAX_PROFILE_BYTES = 256 * 1024
MAX_DEVICES = 20
MAX_IDENTITIES = 20
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+\Z")
_COUNTRY = re.compile(r"^[A-Z]{2}\Z")
_IDENTITY_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")


def parse_date(text: str) -> date | None:
    try:
        return date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        return None


def _check_user(user: pb.User, path: str, check: Validator) -> None:
    if user.timezone and zone_named(user.timezone) is None:
        check.add(f"{path}.timezone", f"unknown IANA timezone {user.timezone!r}")
    check_text_fields(user, path, check)
    if user.email:
        check.require(
            len(user.email) <= 254 and bool(EMAIL.match(user.email)), f"{path}.email", "not an email address"
        )
    if user.phone:
        check.require(bool(E164.match(user.phone)), f"{path}.phone", "E.164 form, for example +14155550100")
    check.require(len(user.identities) <= MAX_IDENTITIES, f"{path}.identities", f"at most {MAX_IDENTITIES}")
    for i, identity in enumerate(user.identities):
        check.require(
            bool(_IDENTITY_TYPE.match(identity.type)),
            f"{path}.identities[{i}].type",
            "1-64 lower-case letters, digits or _, starting with a letter",
        )
        check.require(0 < len(identity.value) <= 200, f"{path}.identities[{i}].value", "1-200 characters")
    if user.date_of_birth:
        born = parse_date(user.date_of_birth)
        check.require(
            born is not None and date(1900, 1, 1) <= born <= api.utcnow().date(),
            f"{path}.date_of_birth",
            "a past date as YYYY-MM-DD",
        )
    location = user.location
    if location.country:
        check.require(
            bool(_COUNTRY.match(location.country)), f"{path}.location.country", "ISO 3166-1 alpha-2, like US"
        )
    for name in ("region", "city"):
        check.require(
            len(getattr(location, name)) <= 200, f"{path}.location.{name}", "at most 200 characters"
        )
    if check.require(
        location.HasField("latitude") == location.HasField("longitude"),
        f"{path}.location",
        "latitude and longitude go together",
    ) and location.HasField("latitude"):
        check.require(-90 <= location.latitude <= 90, f"{path}.location.latitude", "between -90 and 90")
        check.require(-180 <= location.longitude <= 180, f"{path}.location.longitude", "between -180 and 180")
    check.require(len(user.devices) <= MAX_DEVICES, f"{path}.devices", f"at most {MAX_DEVICES} devices")
    device_ids: set[str] = set()
    for i, device in enumerate(user.devices):
        field = f"{path}.devices[{i}]"
        if not check.require(0 < len(device.device_id) <= 200, f"{field}.device_id", "1-200 characters"):
            continue
        check.require(device.device_id not in device_ids, f"{field}.device_id", "appears twice for this user")
        device_ids.add(device.device_id)
        check.require(
            not device.push_token or device.push_token_type != pb.PushTokenType.PUSH_TOKEN_TYPE_UNSPECIFIED,
            f"{field}.push_token_type",
            "required with a push token",
        )
    size = user.properties.ByteSize()
    check.require(
        size <= MAX_PROFILE_BYTES,
        f"{path}.properties",
        f"{size} bytes; a profile holds at most {MAX_PROFILE_BYTES // 1024} KB",
    )


def _row(account_id: uuid.UUID, user: pb.User, properties: dict[str, Any]) -> dict[str, Any]:
    location = user.location
    return {
        "account_id": account_id,
        "user_id": user.user_id,
        "properties": properties,
        "timezone": user.timezone,
        "email": user.email,
        "phone": user.phone,
        "identities": [{"type": i.type, "value": i.value} for i in user.identities],
        "gender": pb.Gender.Name(user.gender) if user.gender else "",
        "date_of_birth": parse_date(user.date_of_birth),
        "country": location.country,
        "region": location.region,
        "city": location.city,
        "latitude": location.latitude if location.HasField("latitude") else None,
        "longitude": location.longitude if location.HasField("longitude") else None,
        "email_unsubscribed": user.subscriptions.email_unsubscribed,
        "sms_unsubscribed": user.subscriptions.sms_unsubscribed,
    }


def _device_row(account_id: uuid.UUID, user_id: str, device: pb.Device) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "user_id": user_id,
        "device_id": device.device_id,
        "platform": pb.Platform.Name(device.platform),
        "app_version": device.app_version,
        "make": device.make,
        "model": device.model,
        "os_version": device.os_version,
        "sdk_version": device.sdk_version,
        "push_token": device.push_token,
        "push_token_type": pb.PushTokenType.Name(device.push_token_type),
        "last_seen_at": api.from_timestamp(device.last_seen_time)
        if device.HasField("last_seen_time")
        else None,
    }


def user_message(row: Any, device_rows: Sequence[Any] = ()) -> pb.User:
    user = pb.User(
        name=f"users/{row.user_id}",
        user_id=row.user_id,
        timezone=row.timezone,
        create_time=api.timestamp(row.created_at),
        update_time=api.timestamp(row.updated_at),
        email=row.email,
        phone=row.phone,
        identities=[pb.Identity(type=i["type"], value=i["value"]) for i in row.identities],
        gender=pb.Gender.Value(row.gender) if row.gender else pb.Gender.GENDER_UNSPECIFIED,
        date_of_birth=row.date_of_birth.isoformat() if row.date_of_birth else "",
        location=pb.Location(country=row.country, region=row.region, city=row.city),
        subscriptions=pb.Subscriptions(
            email_unsubscribed=row.email_unsubscribed, sms_unsubscribed=row.sms_unsubscribed
        ),
    )
    if row.latitude is not None:
        user.location.latitude, user.location.longitude = row.latitude, row.longitude
    user.properties.update(row.properties)
    for d in device_rows:
        device = pb.Device(
            device_id=d.device_id,
            platform=pb.Platform.Value(d.platform),
            app_version=d.app_version,
            make=d.make,
            model=d.model,
            os_version=d.os_version,
            sdk_version=d.sdk_version,
            push_token=d.push_token,
            push_token_type=pb.PushTokenType.Value(d.push_token_type),
        )
        if d.last_seen_at is not None:
            device.last_seen_time.CopyFrom(api.timestamp(d.last_seen_at))
        user.devices.append(device)
    return user


class Profiles:
    def __init__(self, database: Database, subjects: Subjects | None = None) -> None:
        self.database = database
        # Where App Version Changed events are queued (with the profile change, in its transaction).
        self.subjects = subjects

    async def upsert(self, batch: Sequence[pb.User]) -> int:
        caller = current_caller()
        quota = caller.max_batch_size if caller is not None and caller.max_batch_size else MAX_UPSERT
        if quota < len(batch) <= MAX_UPSERT:
            raise ResourceExhausted(
                caller.account if caller else "",
                f"this account may send at most {quota} users per call; split the batch",
            )
        check = Validator()
        check.require(0 < len(batch) <= MAX_UPSERT, "users", f"between 1 and {MAX_UPSERT} users")
        seen: set[str] = set()
        properties: list[dict[str, Any]] = []
        types = SentTypes()
        for i, user in enumerate(batch):
            path = f"users[{i}]"
            if not api.is_valid_id(user.user_id):
                check.add(f"{path}.user_id", "required: 1-200 letters, digits or ._:@+-")
            elif user.user_id in seen:
                check.add(f"{path}.user_id", f"{user.user_id!r} appears twice in the request")
            seen.add(user.user_id)
            _check_user(user, path, check)
            values = as_python(user.properties) or {}
            properties.append(values)
            types.add(f"{path}.properties", USER, check_properties(values, f"{path}.properties", check))
        account_id = current_account_id()
        await types.check(self.database, account_id, check)
        check.raise_if_any()
        async with self.database.transaction() as session:
            await types.record(session, account_id, check)
            changed = await self._write(session, account_id, batch, properties)
            if changed and self.subjects is not None:
                queued = events.SystemEvents(event_id=str(uuid.uuid4()), account=account_name(account_id))
                now = api.utcnow()
                for user_id, versions in sorted(changed.items()):
                    queued.events.extend(app_version_events(user_id, versions, now, queued.event_id))
                await enqueue(
                    session, outbox, [OutboxEvent.of(self.subjects.system_events, queued, queued.event_id)]
                )
        return len(batch)

    @staticmethod
    async def _write(
        session: AsyncSession,
        account_id: uuid.UUID,
        batch: Sequence[pb.User],
        properties: list[dict[str, Any]],
    ) -> dict[str, list[tuple[str, str, str]]]:
        """Writes the profiles; answers each user's devices whose app version changed, as
        (device, from, to)."""
        rows = [_row(account_id, user, values) for user, values in zip(batch, properties, strict=True)]
        statement = insert(users)
        replaced = {c: statement.excluded[c] for c in rows[0] if c not in ("account_id", "user_id")}
        statement = statement.on_conflict_do_update(
            index_elements=[users.c.account_id, users.c.user_id],
            set_={**replaced, "updated_at": sa.func.now()},
        )
        await session.execute(statement, rows)  # executemany: compiled once, sent in batches
        # A profile's devices are replaced with it.
        before = {
            (row.user_id, row.device_id): row.app_version
            for row in await session.execute(
                sa.delete(devices)
                .where(devices.c.account_id == account_id, devices.c.user_id.in_([u.user_id for u in batch]))
                .returning(devices.c.user_id, devices.c.device_id, devices.c.app_version)
            )
        }
        device_rows = [_device_row(account_id, u.user_id, d) for u in batch for d in u.devices]
        if device_rows:
            await session.execute(insert(devices), device_rows)
        changed: dict[str, list[tuple[str, str, str]]] = {}
        for row in device_rows:
            previous = before.get((row["user_id"], row["device_id"]))
            if previous and row["app_version"] and previous != row["app_version"]:
                changed.setdefault(row["user_id"], []).append(
                    (row["device_id"], previous, row["app_version"])
                )
        return changed

    async def get(self, name: str) -> pb.User:
        user_id = api.parse_name(name, "users")
        account_id = current_account_id()
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.select(users).where(users.c.account_id == account_id, users.c.user_id == user_id)
                )
            ).first()
            device_rows = (
                await session.execute(
                    sa.select(devices)
                    .where(devices.c.account_id == account_id, devices.c.user_id == user_id)
                    .order_by(devices.c.device_id)
                )
            ).all()
        if row is None:
            raise NotFound(name)
        return user_message(row, device_rows)

    async def opt_out_of_sms(self, replies: Sequence[events.SmsOptOut]) -> None:
        """Marks the users with each number that replied STOP as unsubscribed from SMS (in the
        account whose destination the reply came through)."""
        by_account: dict[uuid.UUID, set[str]] = {}
        for reply in replies:
            account_id = account_id_of(reply.account)
            if account_id is not None:
                by_account.setdefault(account_id, set()).add(reply.phone)
        async with self.database.transaction() as session:
            for account_id, phones in sorted(by_account.items()):
                await session.execute(
                    sa.update(users)
                    .where(users.c.account_id == account_id, users.c.phone.in_(sorted(phones)))
                    .values(sms_unsubscribed=True)
                )
