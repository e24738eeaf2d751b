"""Who is calling, and what they may do.

Callers present an API key (`authorization: Bearer hrld_<key id>_<secret>`). Every service keeps
the state of every key in memory, replicated from a JetStream key-value bucket that the campaign
service writes through its outbox, so a check costs no round trip and a revocation reaches every
service within moments. Our services call each other with a shared service token and name the
account they act for (`x-herald-account`); an operator creates accounts with the bootstrap token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import grpc
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from herald.events.v1 import events_pb2 as events
from herald_common import api, tracing
from herald_common.bus import set_up
from herald_common.errors import DomainError, ResourceExhausted
from herald_common.logging import get_logger
from herald_common.loops import cancel_and_wait

log = get_logger(__name__)

KEY_PREFIX = "hrld_"
ACCOUNT_HEADER = "x-herald-account"
# With the service token: the role of the caller a service passes on, when it is a browser's.
ROLE_HEADER = "x-herald-acting-role"
SERVICE_ROLE = "SERVICE"
# Owns rows from before accounts existed; no key acts for it.
NO_ACCOUNT = uuid.UUID(int=0)


class Permission(enum.Enum):
    READ = "read"
    WRITE = "write"
    INGEST = "ingest"
    EVENTS = "events"  # send what users did: also from a browser, with a publishable key
    KEYS = "keys"
    WEB = "web"
    BOOTSTRAP = "bootstrap"
    INTERNAL = "internal"  # only Herald's services, with the service token


ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "ROLE_ADMIN": frozenset(
        {Permission.READ, Permission.WRITE, Permission.INGEST, Permission.EVENTS, Permission.KEYS}
    ),
    "ROLE_EDITOR": frozenset({Permission.READ, Permission.WRITE, Permission.INGEST, Permission.EVENTS}),
    "ROLE_VIEWER": frozenset({Permission.READ}),
    "ROLE_INGEST": frozenset({Permission.INGEST, Permission.EVENTS}),
    "ROLE_PUBLISHABLE": frozenset({Permission.EVENTS, Permission.WEB}),
    SERVICE_ROLE: frozenset(
        {Permission.READ, Permission.WRITE, Permission.INGEST, Permission.EVENTS, Permission.INTERNAL}
    ),
}


class Unauthenticated(DomainError):
    """No key, a malformed key, or a key that does not exist or was revoked."""


class PermissionDenied(DomainError):
    """The key is valid but its role does not allow the call."""


@dataclass(frozen=True)
class Caller:
    account: str  # `accounts/{id}`; empty for the operator's bootstrap calls
    role: str
    key_id: str = ""
    # The account's own limits; zero takes the installation's defaults.
    requests_per_second: float = 0.0
    max_batch_size: int = 0
    # A publishable key's web origins.
    allowed_origins: tuple[str, ...] = ()


PUBLISHABLE_ROLE = "ROLE_PUBLISHABLE"


@dataclass(frozen=True)
class QuotaDefaults:
    requests_per_second: float = 200.0
    max_batch_size: int = 1000
    # Calls with the account's publishable (browser) keys, counted apart from its server keys, so
    # a flood from a public page cannot use up the account's own quota.
    publishable_requests_per_second: float = 50.0


class AccountRates:
    """A token bucket per account in this process: the account's rate, bursts of twice as many."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # account → (tokens, refreshed at)

    def admit(self, account: str, rate: float) -> float | None:
        """None if the call may go ahead, else the seconds until it may."""
        now = time.monotonic()
        tokens, refreshed = self._buckets.get(account, (2 * rate, now))
        tokens = min(2 * rate, tokens + (now - refreshed) * rate)
        if tokens < 1:
            self._buckets[account] = (tokens, now)
            return (1 - tokens) / rate
        self._buckets[account] = (tokens - 1, now)
        return None


class FailedGuesses:
    """Wrong bootstrap tokens per source address, in this process: after MAX_FAILURES within
    WINDOW_SECONDS, that address may not try the bootstrap token again until the oldest of them
    is WINDOW_SECONDS old. Bounded: the addresses seen longest ago are forgotten first."""

    MAX_FAILURES = 5
    WINDOW_SECONDS = 60.0
    MAX_SOURCES = 10_000

    def __init__(self) -> None:
        self._failures: dict[str, collections.deque[float]] = {}

    def wait(self, source: str) -> float | None:
        """Seconds until `source` may try again; None when it may now."""
        failures = self._failures.get(source)
        if failures is None:
            return None
        now = time.monotonic()
        while failures and failures[0] <= now - self.WINDOW_SECONDS:
            failures.popleft()
        if len(failures) < self.MAX_FAILURES:
            return None
        return failures[0] + self.WINDOW_SECONDS - now

    def failed(self, source: str) -> None:
        failures = self._failures.pop(source, None) or collections.deque(maxlen=self.MAX_FAILURES)
        failures.append(time.monotonic())
        self._failures[source] = failures  # newest last
        if len(self._failures) > self.MAX_SOURCES:
            del self._failures[next(iter(self._failures))]


def source_address(peer: str) -> str:
    """The address part of a gRPC peer ("ipv4:10.0.0.7:51234" → "ipv4:10.0.0.7")."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


_caller: ContextVar[Caller | None] = ContextVar("caller", default=None)


def current_caller() -> Caller | None:
    return _caller.get()


def current_account() -> str:
    """`accounts/{id}` the current call acts for; Unauthenticated when it acts for none."""
    caller = _caller.get()
    if caller is None or not caller.account:
        raise Unauthenticated("this call must be made with an API key of an account")
    return caller.account


def current_account_id() -> uuid.UUID:
    """The id of the account the current call acts for: every row a call reads or writes must
    carry it, so another account's rows stay out of sight."""
    return api.parse_uuid_name(current_account(), "accounts", "authorization")


def account_name(account_id: uuid.UUID) -> str:
    return f"accounts/{account_id}"


def account_id_of(name: str) -> uuid.UUID | None:
    """The id in an `accounts/{id}` name that an event carries; None when it names none."""
    collection, _, raw = name.partition("/")
    if collection != "accounts":
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


def service_caller(account_id: uuid.UUID) -> Caller:
    """Our own service acting for an account outside any call (planning a run, say)."""
    return Caller(account_name(account_id), SERVICE_ROLE)


def act_as(caller: Caller | None) -> None:
    _caller.set(caller)


@dataclass(frozen=True)
class NewKey:
    key_id: str
    key: str
    secret_sha256: bytes

    @property
    def prefix(self) -> str:
        return f"{KEY_PREFIX}{self.key_id}"


# A browser-generated user id: the visitor has not been identified, so no signature is needed.
ANONYMOUS_PREFIX = "anon:"


def identity_secret(service_token: str, account: str) -> str:
    """The secret a site's server signs an account's user ids with (`accounts/{id}`). Derived
    from the service token, so every service knows it without storing it."""
    return hmac.new(service_token.encode(), f"identity:{account}".encode(), hashlib.sha256).hexdigest()


def user_signature_matches(secret: str, user_id: str, signature: str) -> bool:
    expected = hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.strip().lower().encode())


def method_permissions(service: str, by_method: Mapping[str, Permission]) -> dict[str, Permission]:
    """A service's permission table keyed by full gRPC method name."""
    return {f"/{service}/{method}": permission for method, permission in by_method.items()}


# A key id is 10 random hex digits and 6 of a MAC over them: a made-up id is refused from memory,
# without asking the key-value bucket (which only a key created a moment ago needs).
_KEY_ID_RANDOM = 10


def _key_id_tag(id_secret: str, random_part: str) -> str:
    digest = hmac.new(id_secret.encode(), random_part.encode(), hashlib.sha256).hexdigest()
    return digest[: 16 - _KEY_ID_RANDOM]


def api_keys_bucket(namespace: str) -> str:
    return f"{namespace}_api_keys"


def api_key_uses_bucket(namespace: str) -> str:
    return f"{namespace}_api_key_uses"


def api_key_subject(namespace: str, key_id: str) -> str:
    """Where the outbox writes a key's state: the key-value bucket's subject for that key."""
    return f"$KV.{api_keys_bucket(namespace)}.{key_id}"


async def ensure_bucket(js: JetStreamContext, bucket: str, history: int = 1, replicas: int = 1) -> KeyValue:
    """The key-value bucket, created (replicated like the streams) if it does not exist."""

    async def attempt() -> KeyValue:
        try:
            return await js.key_value(bucket)
        except BucketNotFoundError:
            return await js.create_key_value(
                KeyValueConfig(bucket=bucket, history=history, replicas=replicas)
            )

    return await set_up(bucket, attempt)


# Key states kept per key in the bucket: an older state the outbox published after a newer one
# must not hide it from a process that starts later, which reads them all and keeps the newest.
KEY_STATE_HISTORY = 8


class KeyUses:
    """When each key was last used, as seen by this process, reported to the key uses bucket every
    few seconds (one put per key used since the last report), so ListApiKeys can show it."""

    REPORT_SECONDS = 5.0

    def __init__(self) -> None:
        self._since_report: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def used(self, key_id: str) -> None:
        self._since_report[key_id] = api.utcnow()

    def start(self, bucket: KeyValue) -> None:
        self._task = asyncio.create_task(self._report_forever(bucket), name="api-key-uses")

    async def _report_forever(self, bucket: KeyValue) -> None:
        while True:
            await asyncio.sleep(self.REPORT_SECONDS)
            await self.report(bucket)

    async def report(self, bucket: KeyValue) -> None:
        uses, self._since_report = self._since_report, {}
        for key_id, at in uses.items():
            try:
                await bucket.put(key_id, at.isoformat().encode())
            except Exception as error:  # NATS away: the next use reports again
                log.warning("api_key_use_not_reported", error=str(error))
                return

    async def stop(self, bucket: KeyValue | None) -> None:
        await cancel_and_wait(self._task)
        if bucket is not None:
            with contextlib.suppress(Exception):
                await self.report(bucket)


class KeyRegistry:
    """Every API key's state, followed live from the key-value bucket."""

    def __init__(self, id_secret: str = "") -> None:
        # Signs new key ids (the service token: every service knows it); empty, ids are not checked.
        self.id_secret = id_secret
        self._keys: dict[str, events.ApiKeyState] = {}
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()
        self._bucket: KeyValue | None = None

    async def start(self, bucket: KeyValue) -> None:
        self._bucket = bucket
        watcher = await bucket.watchall(include_history=True)
        self._task = asyncio.create_task(self._follow(watcher), name="api-keys")
        await asyncio.wait_for(self._loaded.wait(), timeout=30)

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        while True:
            try:
                entry = await watcher.updates(timeout=5)  # type: ignore[no-untyped-call]
            except TimeoutError:
                continue
            except Exception as error:  # NATS away: the watcher resumes when it reconnects
                log.warning("api_keys_watch_failed", error=str(error))
                await asyncio.sleep(1)
                continue
            if entry is None:
                self._loaded.set()  # every key known so far has been delivered
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self._keys.pop(entry.key, None)
                continue
            try:
                self.learn(events.ApiKeyState.FromString(entry.value))
            except Exception:
                log.warning("api_key_state_malformed", key_id=entry.key)

    def new_key(self) -> NewKey:
        random_part = secrets.token_hex(_KEY_ID_RANDOM // 2)
        key_id = random_part + _key_id_tag(self.id_secret, random_part)
        secret = secrets.token_urlsafe(32)
        return NewKey(key_id, f"{KEY_PREFIX}{key_id}_{secret}", hashlib.sha256(secret.encode()).digest())

    def _could_exist(self, key_id: str) -> bool:
        """Whether an id not held yet could be a key's: one this installation made."""
        if not self.id_secret:
            return True
        random_part, tag = key_id[:_KEY_ID_RANDOM], key_id[_KEY_ID_RANDOM:]
        return hmac.compare_digest(tag, _key_id_tag(self.id_secret, random_part))

    def learn(self, state: events.ApiKeyState) -> None:
        """Holds a key's newest state: one older than what is held is ignored."""
        held = self._keys.get(state.key_id)
        if held is None or state.version >= held.version:
            self._keys[state.key_id] = state

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _state(self, key_id: str) -> events.ApiKeyState | None:
        """The key's state; one not seen yet (created a moment ago) is read from the bucket."""
        state = self._keys.get(key_id)
        if state is not None or self._bucket is None or not self._could_exist(key_id):
            return state
        try:
            entries = await self._bucket.history(key_id)
        except (KeyNotFoundError, NoKeysError):
            return None
        for entry in entries:
            if entry.value and entry.operation not in ("DEL", "PURGE"):
                self.learn(events.ApiKeyState.FromString(entry.value))
        return self._keys.get(key_id)

    async def wait_for(self, key_id: str, within: float = 5.0) -> None:
        """Returns once the key's latest state is in the bucket, so every service can check it."""
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            if self._bucket is not None:
                with contextlib.suppress(KeyNotFoundError):
                    if (await self._bucket.get(key_id)).value:
                        return
            await asyncio.sleep(0.02)

    async def check(self, key: str) -> Caller:
        """The caller a key stands for; Unauthenticated with what to do when it is not valid."""
        body = key.removeprefix(KEY_PREFIX)
        key_id, _, secret = body.partition("_")
        if not key.startswith(KEY_PREFIX) or len(key_id) != 16 or not secret or len(key) > 200:
            raise Unauthenticated("malformed API key: expected `authorization: Bearer hrld_...`")
        state = await self._state(key_id)
        digest = hashlib.sha256(secret.encode()).digest()
        if state is None or not hmac.compare_digest(state.secret_sha256, digest):
            raise Unauthenticated("unknown API key; create one with AccountService.CreateApiKey")
        if state.account_deleted:
            raise Unauthenticated("the account of this API key was deleted; use a key of another account")
        if state.revoked:
            raise Unauthenticated("this API key was revoked; use another key of the account")
        return Caller(
            state.account,
            state.role,
            key_id,
            state.requests_per_second,
            state.max_batch_size,
            tuple(state.allowed_origins),
        )


@dataclass
class Authenticator:
    """Checks the credentials of each call against the permission its method needs, and the
    request rate of its account."""

    registry: KeyRegistry
    service_token: str
    bootstrap_token: str
    defaults: QuotaDefaults = field(default_factory=QuotaDefaults)
    rates: AccountRates = field(default_factory=AccountRates)
    uses: KeyUses = field(default_factory=KeyUses)
    guesses: FailedGuesses = field(default_factory=FailedGuesses)

    def limits(self, caller: Caller) -> Caller:
        """The caller with its account's limits filled in from the defaults."""
        return replace(
            caller,
            requests_per_second=caller.requests_per_second or self.defaults.requests_per_second,
            max_batch_size=caller.max_batch_size or self.defaults.max_batch_size,
        )

    async def authenticate(self, metadata: Mapping[str, str], needed: Permission, source: str = "") -> Caller:
        """The caller the credentials in `metadata` prove; `source` is the caller's address, which
        wrong bootstrap tokens are throttled by."""
        authorization = metadata.get("authorization", "")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if not authorization:
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>` metadata")
        if scheme == "Bootstrap":
            wait = self.guesses.wait(source)
            if wait is not None:
                raise ResourceExhausted(
                    "bootstrap",
                    f"too many wrong bootstrap tokens from this address; retry in {wait:.0f} s",
                    retry_after=wait,
                )
            if not self.bootstrap_token or not hmac.compare_digest(
                credential.encode(), self.bootstrap_token.encode()
            ):
                self.guesses.failed(source)
                raise Unauthenticated("wrong bootstrap token")
            if needed is not Permission.BOOTSTRAP:
                raise PermissionDenied("the bootstrap token only creates and deletes accounts")
            return Caller("", "BOOTSTRAP")
        if scheme == "Service":
            if not self.service_token or not hmac.compare_digest(credential, self.service_token):
                raise Unauthenticated("wrong service token")
            # A service passing on a browser's calls (the web worker) acts with a browser's rights.
            browser = metadata.get(ROLE_HEADER, "") == PUBLISHABLE_ROLE
            caller = Caller(metadata.get(ACCOUNT_HEADER, ""), PUBLISHABLE_ROLE if browser else SERVICE_ROLE)
        elif scheme == "Bearer":
            caller = await self.registry.check(credential)
            self.uses.used(caller.key_id)
        else:
            raise Unauthenticated("unknown authorization scheme: send `authorization: Bearer <key>`")
        if needed not in ROLE_PERMISSIONS.get(caller.role, frozenset()):
            role = caller.role.removeprefix("ROLE_").lower()
            raise PermissionDenied(f"a {role} key may not do this ({needed.value} is needed)")
        if scheme == "Service":
            return caller  # already counted where the account's call came in
        caller = self.limits(caller)
        bucket, rate = caller.account, caller.requests_per_second
        if caller.role == PUBLISHABLE_ROLE:
            bucket, rate = f"{caller.account} publishable", self.defaults.publishable_requests_per_second
        wait = self.rates.admit(bucket, rate)
        if wait is not None:
            raise ResourceExhausted(
                caller.account, f"more than {rate:g} calls a second; retry in {wait:.2f} s", retry_after=wait
            )
        return caller


CallHeaders = Callable[[], list[tuple[str, str]]]


class _WithHeaders:
    """Replaces the credential headers of every outgoing call with those `headers` gives now."""

    def __init__(self, headers: CallHeaders) -> None:
        self.headers = headers

    def _details(self, details: Any) -> Any:
        replaced = self.headers()
        names = {name for name, _ in replaced}
        metadata = [(k, v) for k, v in (details.metadata or ()) if k not in names]
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata, *replaced),
            details.credentials,
            details.wait_for_ready,
        )


# grpc.aio files an interceptor under one kind only, so each kind has its own class.
class _UnaryHeaders(_WithHeaders, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamHeaders(_WithHeaders, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UploadHeaders(_WithHeaders, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def header_interceptors(headers: CallHeaders) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send `headers()` with every unary, server- and client-streaming
    call."""
    return [_UnaryHeaders(headers), _StreamHeaders(headers), _UploadHeaders(headers)]


def service_credentials(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Our services' credentials: the service token and the account the current call acts for
    (none outside a call, which drops a header a caller may have set)."""

    def headers() -> list[tuple[str, str]]:
        caller = current_caller()
        account = caller.account if caller is not None else ""
        role = caller.role if caller is not None and caller.role == PUBLISHABLE_ROLE else ""
        trace: dict[str, str] = {}
        tracing.inject(trace)  # the called service's span continues the caller's trace
        return [
            ("authorization", f"Service {token}"),
            (ACCOUNT_HEADER, account),
            (ROLE_HEADER, role),
            *trace.items(),
        ]

    return header_interceptors(headers)


def api_key_credentials(key: str) -> list[grpc.aio.ClientInterceptor]:
    """A client's credentials: its API key on every call."""
    return header_interceptors(lambda: [("authorization", f"Bearer {key}")])
