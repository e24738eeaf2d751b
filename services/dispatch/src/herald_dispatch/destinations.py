"""Destination configuration: validation, storage, masking of credentials."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from sqlalchemy.dialects.postgresql import insert

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald_common import api, channels
from herald_common.auth import current_account_id
from herald_common.campaign_usage import CampaignUsage
from herald_common.db import Database
from herald_common.errors import FailedPrecondition, InvalidArgument, NotFound, Validator, invalid
from herald_common.netguard import NetworkPolicy
from herald_common.paging import keyset_page
from herald_common.secret_box import Sealed, SecretBox
from herald_common.validation import check_text_fields
from herald_dispatch.channels import CannotCheck, Channel, SendContext
from herald_dispatch.ratelimit import SharedRateLimiter
from herald_dispatch.receipts import receipt_url, reply_url
from herald_dispatch.storage import destinations

MAX_DISPLAY_NAME = 200
CACHE_SECONDS = 1.0


def _seal(secrets: SecretBox, destination_id: uuid.UUID, destination: pb.Destination) -> dict[str, Any]:
    sealed = secrets.seal(destination.SerializeToString(), destination_id.bytes)
    return {"config": sealed.data, "key_id": sealed.key_id}


def _open(secrets: SecretBox, row: Any) -> pb.Destination:
    if row.key_id is None:  # written before credentials were sealed; sealed at start
        return pb.Destination.FromString(row.config)
    return pb.Destination.FromString(secrets.open(Sealed(row.key_id, row.config), row.id.bytes))


async def reseal(database: Database, secrets: SecretBox, batch: int = 100) -> int:
    """Seals every destination not sealed under the current key with it (after a key rotation, or
    rows from before sealing); returns how many were resealed. Replicas may run it at once."""
    resealed = 0
    while True:
        async with database.transaction() as session:
            rows = (
                await session.execute(
                    sa.select(destinations)
                    .where(sa.or_(destinations.c.key_id.is_(None), destinations.c.key_id != secrets.current))
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for row in rows:
                await session.execute(
                    sa.update(destinations)
                    .where(destinations.c.id == row.id)
                    .values(**_seal(secrets, row.id, _open(secrets, row)))
                )
        resealed += len(rows)
        if len(rows) < batch:
            return resealed


GROUP_KIND = channels.for_config("sms_provider_group")


# Connections the dispatch HTTP client keeps open at once (and requests made at once).
HTTP_CONNECTIONS = 100


class Destinations:
    def __init__(
        self,
        database: Database,
        channels_by_type: dict[str, Channel],
        policy: NetworkPolicy,
        campaign_usage: CampaignUsage,
        secrets: SecretBox,
    ) -> None:
        self.database = database
        self.channels = channels_by_type
        self.policy = policy
        self.campaign_usage = campaign_usage
        self.secrets = secrets
        self.request_slots = asyncio.Semaphore(HTTP_CONNECTIONS)
        # The receipt endpoint's public base URL, once it serves ('' when dispatch takes none).
        self.receipts_url = ""
        # Destinations as the workers use them (secrets revealed), each read at most once a second.
        self._for_delivery: dict[tuple[str, uuid.UUID], tuple[float, pb.Destination]] = {}

    def channel_of(self, destination: pb.Destination) -> Channel | None:
        config = destination.WhichOneof("config")
        kind = channels.for_config(config) if config else None
        return self.channels.get(kind.destination_type) if kind else None

    async def _validate(self, destination: pb.Destination, check: Validator) -> None:
        check.require(bool(destination.display_name.strip()), "destination.display_name", "required")
        check.require(
            len(destination.display_name) <= MAX_DISPLAY_NAME,
            "destination.display_name",
            f"at most {MAX_DISPLAY_NAME} characters",
        )
        check_text_fields(destination, "destination", check)
        config = destination.WhichOneof("config")
        channel = self.channel_of(destination)
        if not check.require(
            config is not None, "destination.config", "exactly one destination config is required"
        ):
            return
        if not check.require(
            channel is not None, f"destination.{config}", "this kind of destination is not available yet"
        ):
            return
        assert channel is not None and config is not None
        field = f"destination.{config}"
        if config == "sms_provider_group":
            await self._check_members(destination.sms_provider_group, f"{field}.destinations", check)
        for url in channel.validate_config(getattr(destination, config), field, check):
            problem = await self.policy.url_problem(url)
            if problem:
                check.add(f"{field}.endpoint_url", problem)

    async def _check_members(self, group: pb.SmsProviderGroupConfig, field: str, check: Validator) -> None:
        """Each member of a provider group is an SMS provider destination of the account."""
        providers = {
            int(k.destination_enum)
            for k in channels.for_content("sms")
            if k.config_field != "sms_provider_group"
        }
        for i, name in enumerate(group.destinations):
            try:
                member = await self.load(name, f"{field}[{i}]", current_account_id(), reveal_secrets=False)
            except (NotFound, InvalidArgument):
                check.add(f"{field}[{i}]", f"{name} is not a destination of this account")
                continue
            check.require(
                int(member.type) in providers and self.channel_of(member) is not None,
                f"{field}[{i}]",
                f"{name} is a {pb.DestinationType.Name(member.type)} destination, not an SMS provider",
            )

    def _message(self, row: Any, *, reveal_secrets: bool) -> pb.Destination:
        destination = _open(self.secrets, row)
        destination.name = f"destinations/{row.id}"
        destination.create_time.CopyFrom(api.timestamp(row.created_at))
        channel = self.channel_of(destination)
        config = destination.WhichOneof("config")
        destination.receipt_url = receipt_url(self.receipts_url, destination)
        destination.reply_url = reply_url(self.receipts_url, destination)
        if not reveal_secrets and channel is not None and config is not None:
            channel.mask(getattr(destination, config))
        return destination

    async def create(self, destination: pb.Destination, request_id: str) -> pb.Destination:
        check = Validator()
        await self._validate(destination, check)
        check.require(len(request_id) <= 200, "request_id", "at most 200 characters")
        check.raise_if_any()
        config_name = destination.WhichOneof("config") or ""
        kind = channels.for_config(config_name)
        stored = pb.Destination()
        stored.CopyFrom(destination)
        stored.ClearField("name")
        stored.ClearField("create_time")
        stored.display_name = destination.display_name.strip()
        stored.type = kind.destination_enum
        destination_id = uuid.uuid4()
        account_id = current_account_id()
        async with self.database.transaction() as session:
            statement = (
                insert(destinations)
                .values(
                    id=destination_id,
                    account_id=account_id,
                    display_name=stored.display_name,
                    type=kind.destination_type,
                    request_id=request_id or None,
                    **_seal(self.secrets, destination_id, stored),
                )
                .on_conflict_do_nothing(index_elements=[destinations.c.account_id, destinations.c.request_id])
                .returning(*destinations.c)
            )
            row = (await session.execute(statement)).first()
            if row is None:  # the same request_id created it before
                row = (
                    await session.execute(
                        sa.select(destinations).where(
                            destinations.c.account_id == account_id, destinations.c.request_id == request_id
                        )
                    )
                ).one()
        return self._message(row, reveal_secrets=False)

    async def update(
        self, destination: pb.Destination, update_mask: field_mask_pb2.FieldMask
    ) -> pb.Destination:
        """Changes the display name or the settings (credentials rotate this way); the kind stays.
        The result is checked as on create."""
        destination_id = api.parse_uuid_name(destination.name, "destinations", "destination.name")
        account_id = current_account_id()
        current = await self.load(destination.name, "destination.name", account_id, reveal_secrets=True)
        config = current.WhichOneof("config") or ""
        given = destination.WhichOneof("config")
        if given is not None and given != config:
            raise invalid(
                f"destination.{given}",
                f"{destination.name} is a {config} destination; its kind cannot change",
            )
        paths = list(update_mask.paths)
        refused = [p for p in paths if p.split(".")[0] not in ("display_name", config)]
        if refused or not paths:
            raise invalid(
                "update_mask",
                f"can change display_name and {config} or its fields; got {refused or 'nothing'}",
            )
        merged = pb.Destination()
        merged.CopyFrom(current)
        try:
            field_mask_pb2.FieldMask(paths=paths).MergeMessage(destination, merged, True, True)
        except ValueError as error:
            raise invalid("update_mask", str(error)) from None
        check = Validator()
        await self._validate(merged, check)
        self._refuse_masked_secrets(current, merged, check)
        check.raise_if_any()
        for output_only in ("name", "create_time", "receipt_url", "reply_url"):
            merged.ClearField(output_only)
        merged.display_name = merged.display_name.strip()
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.update(destinations)
                    .where(destinations.c.id == destination_id, destinations.c.account_id == account_id)
                    .values(display_name=merged.display_name, **_seal(self.secrets, destination_id, merged))
                    .returning(*destinations.c)
                )
            ).first()
        if row is None:  # deleted meanwhile
            raise NotFound(destination.name, "destination.name")
        self._for_delivery.pop((destination.name, account_id), None)
        return self._message(row, reveal_secrets=False)

    def _refuse_masked_secrets(
        self, current: pb.Destination, merged: pb.Destination, check: Validator
    ) -> None:
        """A secret sent back as GetDestination showed it (masked) would replace the real one."""
        config = current.WhichOneof("config")
        channel = self.channel_of(current)
        if config is None or channel is None:
            return
        masked = pb.Destination()
        masked.CopyFrom(current)
        channel.mask(getattr(masked, config))
        for field, shown in getattr(masked, config).ListFields():
            real = getattr(getattr(current, config), field.name)
            if shown != real and getattr(getattr(merged, config), field.name) == shown:
                check.add(f"destination.{config}.{field.name}", "give the secret itself, not its masked form")

    async def get(self, name: str) -> pb.Destination:
        return await self.load(name, "name", current_account_id(), reveal_secrets=False)

    async def load(
        self, name: str, field: str, account_id: uuid.UUID, *, reveal_secrets: bool
    ) -> pb.Destination:
        """The destination if `account_id` owns it; another account's answers NOT_FOUND."""
        destination_id = api.parse_uuid_name(name, "destinations", field)
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.select(destinations).where(
                        destinations.c.id == destination_id, destinations.c.account_id == account_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound(name, field)
        return self._message(row, reveal_secrets=reveal_secrets)

    async def for_delivery(self, name: str, account_id: uuid.UUID) -> pb.Destination:
        """The destination with its secrets, for sending to recipients of `account_id`, which must
        own it; a change reaches the workers within CACHE_SECONDS."""
        held = self._for_delivery.get((name, account_id))
        if held is not None and time.monotonic() - held[0] < CACHE_SECONDS:
            return held[1]
        destination = await self.load(name, "destination", account_id, reveal_secrets=True)
        self._for_delivery[(name, account_id)] = (time.monotonic(), destination)
        return destination

    def send_context(
        self,
        account_id: uuid.UUID,
        destination: pb.Destination,
        channel: Channel,
        limiter: SharedRateLimiter,
        **rest: Any,
    ) -> SendContext:
        """What `channel` needs to send through `destination` for `account_id`: the shared rate
        limits of the destination (and of a group's members) and the account's other destinations."""

        async def permit_for(destination_name: str, requests_per_second: int) -> float:
            return await limiter.acquire(account_id, destination_name, requests_per_second)

        async def permit() -> float:
            return await permit_for(destination.name, channel.requests_per_second(destination))

        async def destination_named(name: str) -> pb.Destination:
            return await self.for_delivery(name, account_id)

        return SendContext(
            account_id=account_id,
            destination=destination,
            permit=permit,
            request_slots=self.request_slots,
            destination_named=destination_named,
            permit_for=permit_for,
            **rest,
        )

    async def test(self, name: str) -> tuple[bool, str]:
        """Whether the destination's provider accepts its credentials (a group: every member's)."""
        destination = await self.load(name, "name", current_account_id(), reveal_secrets=True)
        members = [destination]
        if destination.WhichOneof("config") == "sms_provider_group":
            members = [
                await self.load(m, "name", current_account_id(), reveal_secrets=True)
                for m in destination.sms_provider_group.destinations
            ]
        answers = []
        for member in members:
            channel = self.channel_of(member)
            if channel is None:
                answers.append((False, f"{member.name} is not a kind of destination this installation runs"))
                continue
            try:
                answers.append(await channel.check_credentials(member))
            except CannotCheck as reason:
                raise FailedPrecondition(name, str(reason)) from None
        if len(members) == 1:
            return answers[0]
        detail = "; ".join(f"{m.name}: {text}" for m, (_, text) in zip(members, answers, strict=True))
        return all(ok for ok, _ in answers), detail

    async def for_receipts(self, destination_id: uuid.UUID) -> tuple[uuid.UUID, pb.Destination] | None:
        """(owner, destination with secrets) for checking a provider's receipt; None if unknown."""
        async with self.database.transaction() as session:
            row = (
                await session.execute(sa.select(destinations).where(destinations.c.id == destination_id))
            ).first()
        return None if row is None else (row.account_id, self._message(row, reveal_secrets=True))

    async def list(self, size: int, token: str) -> tuple[list[pb.Destination], str]:
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(
                session, destinations, size, token, destinations.c.account_id == current_account_id()
            )
        return [self._message(r, reveal_secrets=False) for r in rows], next_token

    async def delete(self, name: str) -> None:
        destination_id = api.parse_uuid_name(name, "destinations")
        await self.campaign_usage.refuse_if_used(name)
        async with self.database.transaction() as session:
            groups = (
                await session.execute(
                    sa.select(destinations).where(
                        destinations.c.account_id == current_account_id(),
                        destinations.c.type == GROUP_KIND.destination_type,
                    )
                )
            ).all()
            using = sorted(
                g.name
                for g in (self._message(row, reveal_secrets=False) for row in groups)
                if name in g.sms_provider_group.destinations
            )
            if using:
                raise FailedPrecondition(name, f"{name} is a member of {', '.join(using)}; take it out first")
            result = await session.execute(
                sa.delete(destinations).where(
                    destinations.c.id == destination_id, destinations.c.account_id == current_account_id()
                )
            )
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise NotFound(name)
