"""Accounts and their API keys.

A key's state is written to the API keys key-value bucket through the outbox, in the same
transaction as the change, so every service learns of a new or revoked key within moments.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc
import sqlalchemy as sa
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.accounts.v1 import account_service_pb2 as pb
from herald.accounts.v1 import account_service_pb2_grpc as pb_grpc
from herald.events.v1 import events_pb2 as events
from herald_campaign.storage import SCHEMA, accounts, api_keys, outbox
from herald_common import api, bus
from herald_common.auth import (
    KeyRegistry,
    NewKey,
    Permission,
    api_key_subject,
    current_account,
    current_account_id,
    identity_secret,
    method_permissions,
)
from herald_common.bus import Subjects
from herald_common.db import Database, Statement, Target
from herald_common.errors import NotFound, Validator, invalid
from herald_common.netguard import NetworkPolicy
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.paging import keyset_page
from herald_common.runtime import Infrastructure
from herald_common.schedules import parse_time_of_day
from herald_common.timing import zone_named
from herald_common.validation import check_text_fields

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AccountService"].full_name
PERMISSIONS = method_permissions(
    SERVICE_NAME,
    {
        "CreateAccount": Permission.BOOTSTRAP,
        "DeleteAccount": Permission.BOOTSTRAP,
        "GetAccount": Permission.READ,
        "GetIdentitySecret": Permission.KEYS,
        "CreateApiKey": Permission.KEYS,
        "ListApiKeys": Permission.KEYS,
        "RevokeApiKey": Permission.KEYS,
        "UpdateAccountSettings": Permission.KEYS,
        "ReplayDeadLetters": Permission.BOOTSTRAP,
    },
)
DEFAULT_REPLAY, MAX_REPLAY = 1000, 10_000
_NEXT_VERSION = sa.text("SELECT nextval('campaign.api_key_state_versions')")
CONSUMER_NAME = re.compile(r"^[A-Za-z0-9_-]{0,100}\Z")
MAX_DISPLAY_NAME = 200
MAX_BATCH_SIZE = 1000  # UpsertUsers never takes more
MAX_THROTTLE = 10_000_000
Role = pb.Role
Context = grpc.aio.ServicerContext[Any, Any]


def _account_message(row: Any) -> pb.Account:
    account = pb.Account(
        name=f"accounts/{row.id}",
        display_name=row.display_name,
        create_time=api.timestamp(row.created_at),
        quota=pb.Quota(requests_per_second=row.requests_per_second, max_batch_size=row.max_batch_size),
    )
    if row.deleted_at is not None:
        account.delete_time.CopyFrom(api.timestamp(row.deleted_at))
    account.settings.ParseFromString(row.settings)
    return account


_SETTINGS_OF = Statement(f"SELECT settings, settings_version FROM {SCHEMA}.accounts WHERE id = :id")


async def settings_of(target: Target, account_id: uuid.UUID) -> tuple[pb.AccountSettings, int]:
    """An account's settings and their version (defaults and 0 when it has none)."""
    row = await _SETTINGS_OF.fetch_row(target, id=account_id)
    if row is None:
        return pb.AccountSettings(), 0
    return pb.AccountSettings.FromString(row.settings), row.settings_version


async def check_settings(settings: pb.AccountSettings, network: NetworkPolicy) -> None:
    """INVALID_ARGUMENT naming each field that is wrong."""
    check = Validator()
    path = "settings"
    check_text_fields(settings, path, check)
    check.require(
        not settings.default_timezone or zone_named(settings.default_timezone) is not None,
        f"{path}.default_timezone",
        f"unknown IANA time zone {settings.default_timezone!r}",
    )
    check.require(
        not settings.best_time_fallback or parse_time_of_day(settings.best_time_fallback) is not None,
        f"{path}.best_time_fallback",
        "HH:MM, 00:00 to 23:59",
    )
    check.require(
        0 <= settings.throttle_per_five_minutes <= MAX_THROTTLE,
        f"{path}.throttle_per_five_minutes",
        f"0 (none) to {MAX_THROTTLE:,}",
    )
    channels = len(pb.CapChannel.values()) - 1  # without CAP_CHANNEL_UNSPECIFIED
    caps = settings.frequency_caps
    if not check.require(
        len(caps) <= channels, f"{path}.frequency_caps", f"at most {channels}: one a channel"
    ):
        check.raise_if_any()  # not walked one by one: a long list is refused as a whole
    seen: set[int] = set()
    for i, cap in enumerate(caps):
        field = f"{path}.frequency_caps[{i}]"
        check.require(cap.channel != pb.CAP_CHANNEL_UNSPECIFIED, f"{field}.channel", "required")
        check.require(cap.channel not in seen, f"{field}.channel", "a channel has at most one cap")
        seen.add(cap.channel)
        check.require(cap.per_day >= 0, f"{field}.per_day", "zero (no daily cap) or more")
        check.require(cap.per_week >= 0, f"{field}.per_week", "zero (no weekly cap) or more")
        check.require(cap.per_day > 0 or cap.per_week > 0, field, "a daily or a weekly cap is required")
    if settings.alert_webhook_url:
        # The platform calls this URL: the same rules as a destination's endpoint.
        problem = await network.url_problem(settings.alert_webhook_url)
        if problem:
            check.add(f"{path}.alert_webhook_url", problem)
    check.raise_if_any()


def _key_message(row: Any) -> pb.ApiKey:
    key = pb.ApiKey(
        name=f"accounts/{row.account_id}/apiKeys/{row.id}",
        display_name=row.display_name,
        role=Role.Value(row.role),
        prefix=f"hrld_{row.key_id}",
        create_time=api.timestamp(row.created_at),
    )
    if row.revoked_at is not None:
        key.revoke_time.CopyFrom(api.timestamp(row.revoked_at))
    key.allowed_origins.extend(row.allowed_origins)
    return key


def _origins(api_key: pb.ApiKey, check: Validator) -> list[str]:
    """A publishable key's web origins, normalized; other keys have none."""
    given = list(api_key.allowed_origins)
    if api_key.role != Role.ROLE_PUBLISHABLE:
        check.require(not given, "api_key.allowed_origins", "only for ROLE_PUBLISHABLE keys")
        return []
    check.require(
        0 < len(given) <= api.MAX_ORIGINS,
        "api_key.allowed_origins",
        f"required for a publishable key: 1 to {api.MAX_ORIGINS} web origins",
    )
    origins = []
    for i, text in enumerate(given[: api.MAX_ORIGINS]):
        origin = api.web_origin(text)
        if check.require(
            origin is not None,
            f"api_key.allowed_origins[{i}]",
            "a web origin: http or https, a host and an optional port, no path (https://shop.example.com)",
        ):
            assert origin is not None
            origins.append(origin)
    return sorted(set(origins))


def _parse_key_name(name: str) -> tuple[uuid.UUID, uuid.UUID]:
    """`accounts/{account}/apiKeys/{key}` → (account id, key id)."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "accounts" or parts[2] != "apiKeys":
        raise invalid("name", f"must look like accounts/<account>/apiKeys/<key>, got {name!r}")
    try:
        return uuid.UUID(parts[1]), uuid.UUID(parts[3])
    except ValueError:
        raise invalid("name", f"{name!r} is not a valid API key name") from None


class Accounts:
    def __init__(
        self,
        database: Database,
        namespace: str,
        notify_outbox: Any,
        keys: KeyRegistry,
        uses: KeyValue,
        network: NetworkPolicy,
    ) -> None:
        self.network = network
        self.database = database
        self.namespace = namespace
        self.notify_outbox = notify_outbox
        self.keys = keys
        self.uses = uses

    async def _last_use(self, key: pb.ApiKey, key_id: str) -> pb.ApiKey:
        with contextlib.suppress(KeyNotFoundError):
            entry = await self.uses.get(key_id)
            if entry.value:
                key.last_use_time.CopyFrom(api.timestamp(datetime.fromisoformat(entry.value.decode())))
        return key

    async def _publish_key(self, session: AsyncSession, changed: Any) -> None:
        """Publishes the key's state as it is now. The key's row is locked first and the version
        taken after it, so of two transactions changing the key or its account, the one that
        commits later publishes the higher version, and it reads what the other committed."""
        row = (
            await session.execute(sa.select(api_keys).where(api_keys.c.id == changed.id).with_for_update())
        ).one()
        account = (await session.execute(sa.select(accounts).where(accounts.c.id == row.account_id))).one()
        version = await session.scalar(_NEXT_VERSION)
        state = events.ApiKeyState(
            key_id=row.key_id,
            account=f"accounts/{row.account_id}",
            role=row.role,
            secret_sha256=row.secret_sha256,
            revoked=row.revoked_at is not None,
            requests_per_second=account.requests_per_second,
            max_batch_size=account.max_batch_size,
            account_deleted=account.deleted_at is not None,
            version=version,
            allowed_origins=row.allowed_origins,
        )
        subject = api_key_subject(self.namespace, row.key_id)
        message_id = f"{row.key_id}:{version}"
        await enqueue(session, outbox, [OutboxEvent.of(subject, state, message_id)])

    async def _add_key(
        self,
        session: AsyncSession,
        account_id: uuid.UUID,
        display_name: str,
        role: str,
        allowed_origins: Sequence[str] = (),
    ) -> tuple[Any, NewKey]:
        key = self.keys.new_key()
        row = (
            await session.execute(
                sa.insert(api_keys)
                .values(
                    id=uuid.uuid4(),
                    key_id=key.key_id,
                    account_id=account_id,
                    display_name=display_name,
                    role=role,
                    secret_sha256=key.secret_sha256,
                    allowed_origins=list(allowed_origins),
                )
                .returning(*api_keys.c)
            )
        ).one()
        await self._publish_key(session, row)
        return row, key

    async def create_account(self, account: pb.Account, request_id: str) -> pb.CreateAccountResponse:
        check = Validator()
        check.require(bool(account.display_name.strip()), "account.display_name", "required")
        check.require(
            len(account.display_name) <= MAX_DISPLAY_NAME,
            "account.display_name",
            f"at most {MAX_DISPLAY_NAME} characters",
        )
        check.require(len(request_id) <= 200, "request_id", "at most 200 characters")
        check_text_fields(account, "account", check)
        check.require(
            account.quota.requests_per_second >= 0, "account.quota.requests_per_second", "zero or more"
        )
        check.require(
            0 <= account.quota.max_batch_size <= MAX_BATCH_SIZE,
            "account.quota.max_batch_size",
            f"between 0 (the default) and {MAX_BATCH_SIZE}",
        )
        check.raise_if_any()
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    insert(accounts)
                    .values(
                        id=uuid.uuid4(),
                        display_name=account.display_name.strip(),
                        request_id=request_id or None,
                        requests_per_second=account.quota.requests_per_second,
                        max_batch_size=account.quota.max_batch_size,
                    )
                    .on_conflict_do_nothing(index_elements=[accounts.c.request_id])
                    .returning(*accounts.c)
                )
            ).first()
            if row is None:  # created before with this request_id: no second admin key
                row = (
                    await session.execute(sa.select(accounts).where(accounts.c.request_id == request_id))
                ).one()
                return pb.CreateAccountResponse(account=_account_message(row))
            key_row, key = await self._add_key(session, row.id, "first admin key", "ROLE_ADMIN")
        self.notify_outbox()
        await self.keys.wait_for(key.key_id)  # usable at every service once this answers
        return pb.CreateAccountResponse(
            account=_account_message(row), admin_key=_key_message(key_row), key=key.key
        )

    async def delete_account(self, name: str) -> pb.Account:
        account_id = api.parse_uuid_name(name, "accounts")
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.update(accounts)
                    .where(accounts.c.id == account_id)
                    .values(deleted_at=sa.func.coalesce(accounts.c.deleted_at, sa.func.now()))
                    .returning(*accounts.c)
                )
            ).first()
            if row is None:
                raise NotFound(name)
            keys = (
                await session.execute(sa.select(api_keys).where(api_keys.c.account_id == account_id))
            ).all()
            for key in keys:  # every service learns that these keys no longer open anything
                await self._publish_key(session, key)
        self.notify_outbox()
        return _account_message(row)

    async def get_account(self) -> pb.Account:
        account_id = current_account_id()
        async with self.database.transaction() as session:
            row = (await session.execute(sa.select(accounts).where(accounts.c.id == account_id))).first()
        if row is None:
            raise NotFound(f"accounts/{account_id}")
        return _account_message(row)

    async def create_key(self, api_key: pb.ApiKey) -> pb.CreateApiKeyResponse:
        account_id = current_account_id()
        check = Validator()
        check.require(bool(api_key.display_name.strip()), "api_key.display_name", "required")
        check.require(
            len(api_key.display_name) <= MAX_DISPLAY_NAME,
            "api_key.display_name",
            f"at most {MAX_DISPLAY_NAME} characters",
        )
        check_text_fields(api_key, "api_key", check)
        check.require(api_key.role != Role.ROLE_UNSPECIFIED, "api_key.role", "required")
        origins = _origins(api_key, check)
        check.raise_if_any()
        async with self.database.transaction() as session:
            row, key = await self._add_key(
                session, account_id, api_key.display_name.strip(), Role.Name(api_key.role), origins
            )
        self.notify_outbox()
        await self.keys.wait_for(key.key_id)
        return pb.CreateApiKeyResponse(api_key=_key_message(row), key=key.key)

    async def list_keys(self, size: int, token: str) -> tuple[list[pb.ApiKey], str]:
        account_id = current_account_id()
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(
                session, api_keys, size, token, api_keys.c.account_id == account_id
            )
        return [await self._last_use(_key_message(r), r.key_id) for r in rows], next_token

    async def revoke_key(self, name: str) -> pb.ApiKey:
        account_id = current_account_id()
        owner, key_uuid = _parse_key_name(name)
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.update(api_keys)
                    .where(api_keys.c.id == key_uuid, api_keys.c.account_id == account_id)
                    .where(api_keys.c.account_id == owner)
                    .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, sa.func.now()))
                    .returning(*api_keys.c)
                )
            ).first()
            if row is None:  # another account's key answers as if it did not exist
                raise NotFound(name)
            await self._publish_key(session, row)
        self.notify_outbox()
        return _key_message(row)

    async def update_settings(self, settings: pb.AccountSettings) -> pb.Account:
        account_id = current_account_id()
        await check_settings(settings, self.network)
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.update(accounts)
                    .where(accounts.c.id == account_id)
                    .values(
                        settings=settings.SerializeToString(),
                        settings_version=accounts.c.settings_version + 1,
                    )
                    .returning(*accounts.c)
                )
            ).first()
            if row is None:
                raise NotFound(f"accounts/{account_id}")
            event = events.AccountChanged(
                event_id=str(uuid.uuid4()),
                account=f"accounts/{row.id}",
                settings=settings,
                version=row.settings_version,
            )
            subject = Subjects(self.namespace).account_changed
            await enqueue(session, outbox, [OutboxEvent.of(subject, event, event.event_id)])
        self.notify_outbox()
        return _account_message(row)


class AccountServicer(pb_grpc.AccountServiceServicer):
    def __init__(self, accounts_: Accounts, infra: Infrastructure) -> None:
        self.accounts = accounts_
        self.infra = infra

    async def ReplayDeadLetters(
        self, request: pb.ReplayDeadLettersRequest, context: Context
    ) -> pb.ReplayDeadLettersResponse:
        check = Validator()
        check.require(bool(CONSUMER_NAME.match(request.consumer)), "consumer", "a consumer's name, or empty")
        check.require(0 <= request.limit <= MAX_REPLAY, "limit", f"0 ({DEFAULT_REPLAY:,}) to {MAX_REPLAY:,}")
        check.raise_if_any()
        replayed, left = await bus.replay_dead_letters(
            self.infra.js, self.infra.subjects, request.consumer, request.limit or DEFAULT_REPLAY
        )
        return pb.ReplayDeadLettersResponse(replayed=replayed, remaining=left)

    async def CreateAccount(
        self, request: pb.CreateAccountRequest, context: Context
    ) -> pb.CreateAccountResponse:
        return await self.accounts.create_account(request.account, request.request_id)

    async def DeleteAccount(self, request: pb.DeleteAccountRequest, context: Context) -> pb.Account:
        return await self.accounts.delete_account(request.name)

    async def GetAccount(self, request: pb.GetAccountRequest, context: Context) -> pb.Account:
        return await self.accounts.get_account()

    async def GetIdentitySecret(
        self, request: pb.GetIdentitySecretRequest, context: Context
    ) -> pb.IdentitySecret:
        secret = identity_secret(self.infra.settings.service_token, current_account())
        return pb.IdentitySecret(identity_secret=secret)

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        return await self.accounts.create_key(request.api_key)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        found, token = await self.accounts.list_keys(request.page_size, request.page_token)
        return pb.ListApiKeysResponse(api_keys=found, next_page_token=token)

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context) -> pb.ApiKey:
        return await self.accounts.revoke_key(request.name)

    async def UpdateAccountSettings(
        self, request: pb.UpdateAccountSettingsRequest, context: Context
    ) -> pb.Account:
        return await self.accounts.update_settings(request.settings)
