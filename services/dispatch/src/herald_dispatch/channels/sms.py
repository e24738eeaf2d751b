"""What every SMS provider shares: each recipient's phone and rendered text, one request per
message a few at a time, and what to do with the answer (sent, throttled, failed, fail over)."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import enum
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import aiohttp
import orjson

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import personalization
from herald_common.sms import E164, MAX_BODY_CHARACTERS
from herald_dispatch.channels import FAILED, SENT, SKIPPED, UNKNOWN, Channel, Outcome, SendContext
from herald_dispatch.gate import STALE_ADMISSION_SECONDS, Admission
from herald_dispatch.provider_http import AnswerLost, NotConnected, ProviderHttp, Withheld, form_body
from herald_dispatch.retry import backoff_seconds, retry_after_seconds

# Alphanumeric sender ids: 1 to 11 letters, digits and spaces, at least one letter.
ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}\Z")
# Messages of one batch in flight at once.
CONCURRENT_REQUESTS = 16
# When the message a sender is about to post was admitted (monotonic; the sender's task's own).
ADMITTED_AT: contextvars.ContextVar[float] = contextvars.ContextVar("admitted_at", default=math.inf)
# Messages whose intent is recorded at once, before the first of them is sent: a few rounds of
# requests, so recording costs little, and a crash leaves few unknown.
WAVE_SIZE = 4 * CONCURRENT_REQUESTS
# Sends one message (recipient, E.164 phone, text) and returns its outcome.
SendOne = Callable[[events.Recipient, str, str], Awaitable[Outcome]]


@dataclass(frozen=True)
class Lookup:
    """What a provider says of a message that went unanswered: sent (with its id), not sent, or
    None when it cannot tell now."""

    sent: bool | None
    message_id: str = ""


CANNOT_TELL = Lookup(None)


class SmsChannel(Channel, Protocol):
    """An SMS provider (or a group of them): sends one rendered message to one number."""

    # Whether `look_up` can tell if an unanswered message was sent.
    can_settle: bool

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome: ...

    async def look_up(self, destination: pb.Destination, phone: str, text: str, since: datetime) -> Lookup:
        """Whether a message with `text` to `phone` was made through `destination` since `since`."""
        ...


def message_of(recipient: events.Recipient, body: str) -> tuple[str, str] | Outcome:
    """(phone, text) for a recipient, or the outcome that stops it before any provider is called."""
    profile = orjson.loads(recipient.attributes_json or b"{}")
    phone = profile.get("phone") if isinstance(profile, dict) else None
    if not isinstance(phone, str) or not E164.match(phone):
        return Outcome(recipient, SKIPPED, 0, "no phone number")
    try:
        text = personalization.render(body, profile)
    except personalization.PersonalizationError as error:
        return Outcome(recipient, FAILED, 0, f"personalization failed: {error}")
    if not text.strip():
        return Outcome(recipient, FAILED, 0, "the rendered message is empty")
    if len(text) > MAX_BODY_CHARACTERS:
        reason = f"the rendered message is {len(text):,} characters; at most {MAX_BODY_CHARACTERS:,}"
        return Outcome(recipient, FAILED, 0, reason)
    return phone, text


async def messages_of(recipients: Sequence[events.Recipient], body: str) -> list[tuple[str, str] | Outcome]:
    """`message_of` for each recipient; off the event loop when the body takes the Liquid engine."""
    if personalization.needs_engine(body):
        return await asyncio.to_thread(lambda: [message_of(r, body) for r in recipients])
    return [message_of(r, body) for r in recipients]


async def send_each(
    context: SendContext, recipients: Sequence[events.Recipient], send: SendOne
) -> list[Outcome]:
    """One outcome per recipient reached (in their order), CONCURRENT_REQUESTS messages in flight
    at once: that many senders take the next recipient in turn (not a task per recipient).

    Recipients are admitted in waves of WAVE_SIZE, each wave's intent recorded before its first
    request (the next wave is admitted while the last of the current one goes out): a halted
    campaign skips the rest, an opted-out phone is skipped. Once the process drains, or another
    replica took the batch over, no new wave starts and the recipients not reached get no outcome
    here."""
    body = context.campaign.sms.body
    outcomes: list[Outcome | None] = [None] * len(recipients)
    waiting: collections.deque[tuple[int, events.Recipient, str, str]] = collections.deque()
    messages = await messages_of(recipients, body)
    for i, (recipient, prepared) in enumerate(zip(recipients, messages, strict=True)):
        if isinstance(prepared, Outcome):
            outcomes[i] = prepared
        else:
            waiting.append((i, recipient, *prepared))
    senders = min(CONCURRENT_REQUESTS, len(waiting))
    admitted: collections.deque[tuple[int, events.Recipient, str, str]] = collections.deque()
    admitting: asyncio.Task[None] | None = None
    admitted_at: dict[int, float] = {}

    async def admit_wave() -> None:
        wave = [waiting.popleft() for _ in range(min(WAVE_SIZE, len(waiting)))]
        entries = [(r.delivery_id, phone, r.user_id) for _, r, phone, _ in wave]
        asked = time.monotonic()  # a yes counts from the moment of asking, not of hearing it
        if context.admit is None:
            admission = Admission(admitted=frozenset(d for d, _, _ in entries))
        else:
            admission = await context.admit(context.destination.name, entries)
        if admission.halted:
            for i, recipient, _, _ in [*wave, *waiting]:
                outcomes[i] = Outcome(recipient, SKIPPED, 0, "campaign stopped")
        if admission.halted or admission.superseded:
            waiting.clear()
            return
        for item in wave:
            if item[1].delivery_id in admission.opted_out:
                outcomes[item[0]] = Outcome(item[1], SKIPPED, 0, "opted out")
            elif item[1].delivery_id in admission.admitted:
                admitted.append(item)
                admitted_at[item[0]] = asked

    def admit_next() -> None:
        """Starts admitting the next wave, unless one is under way or none is to be admitted."""
        nonlocal admitting
        if admitting is not None and not admitting.done():
            return
        if admitting is not None:
            admitting.result()  # an admission that failed fails the batch
        if waiting and not context.draining():
            admitting = asyncio.create_task(admit_wave())

    async def next_admitted() -> tuple[int, events.Recipient, str, str] | None:
        while True:
            if len(admitted) <= senders:  # the next wave is on its way while these go out
                admit_next()
            if admitted:
                return admitted.popleft()
            if admitting is None or admitting.done():
                return None  # nothing left to admit, or draining
            await asyncio.shield(admitting)

    async def sender() -> None:
        while (item := await next_admitted()) is not None:
            i, recipient, phone, text = item
            ADMITTED_AT.set(admitted_at[i])
            outcomes[i] = await send(recipient, phone, text)

    await asyncio.gather(*(sender() for _ in range(senders)))
    if admitting is not None:
        await admitting
    return [o for o in outcomes if o is not None]


class Meaning(enum.Enum):
    """What a provider's answer says about one message: the only thing a resend is decided on."""

    SENT = "sent"
    # Not processed (the provider says so): wait, then send again through the same provider.
    THROTTLED = "throttled"
    # Proved not processed, for a reason of the provider's or the account's (credentials, credit,
    # an unreachable server): another provider of a group may take it.
    NOT_SENT = "not sent"
    # Refused for the message itself (an invalid number, a text too long): no provider would take it.
    FINAL = "final"
    # It may have been sent (no answer, a dropped connection, a server error the provider does not
    # document as "not processed"): never sent again, through any provider.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class AnswerTable:
    """One provider's answers and what each means. Keys are an HTTP status, or (HTTP status, the
    provider's own code) where the provider says more than the status. An answer the table does not
    name is FINAL for a 4xx (the request was refused) and UNKNOWN otherwise (a 5xx, or a success
    whose body cannot be read, may have been processed)."""

    provider: str
    meanings: Mapping[int | tuple[int, str], Meaning]

    def meaning(self, status: int, code: str = "") -> Meaning:
        found = self.meanings.get((status, code)) if code else None
        if found is None:
            found = self.meanings.get(status)
        if found is not None:
            return found
        return Meaning.FINAL if 400 <= status < 500 else Meaning.UNKNOWN

    def verdict(self, status: int, code: str = "", *, message_id: object = "", reason: str = "") -> Verdict:
        return Verdict(self.meaning(status, code), str(message_id or ""), reason)


@dataclass(frozen=True)
class Verdict:
    """What a provider's answer to one message means, with its id or why it was refused."""

    meaning: Meaning
    message_id: str = ""  # the provider's id of the message it accepted
    reason: str = ""


Judge = Callable[[int, str], Verdict]


def json_object(text: str) -> dict[str, Any]:
    """A provider's JSON answer as a dict ({} when it is not one)."""
    try:
        body = orjson.loads(text)  # one answer per message: the faster parser first
    except orjson.JSONDecodeError:
        try:  # what only Python's parser reads (NaN, integers past 64 bits)
            body = json.loads(text)
        except ValueError:
            return {}
    return body if isinstance(body, dict) else {}


# Connecting (a free pooled connection included) gives up after this long: nothing was sent.
CONNECT_TIMEOUT_SECONDS = 5.0
# A connection that cannot be made is tried this many times before the message fails (and may
# fail over): it proves nothing was sent.
CONNECT_ATTEMPTS = 3
# A throttled message waits this long in all before it fails (and may fail over).
MAX_THROTTLED_SECONDS = 3600.0
# How long a provider has to answer a request once it is written; past it the message is UNKNOWN.
ANSWER_TIMEOUT_SECONDS = 15.0


def _outcome(recipient: events.Recipient, verdict: Verdict, attempts: int, provider: str) -> Outcome:
    """The outcome of a provider's final answer (neither throttled nor a refused connection)."""
    if verdict.meaning is Meaning.SENT:
        return Outcome(recipient, SENT, attempts, provider_message_id=verdict.message_id)
    if verdict.meaning is Meaning.UNKNOWN:
        reason = verdict.reason or f"{provider} gave no clear answer"
        return Outcome(
            recipient,
            UNKNOWN,
            attempts,
            f"{reason}; it may have been sent",
            provider_message_id=verdict.message_id,
        )
    return Outcome(
        recipient,
        FAILED,
        attempts,
        verdict.reason,
        failover=verdict.meaning is Meaning.NOT_SENT,
        provider_message_id=verdict.message_id,
    )


async def post_message(
    http: ProviderHttp,
    context: SendContext,
    recipient: events.Recipient,
    *,
    provider: str,
    url: str,
    form: dict[str, str] | None = None,
    repeated_form_fields: Collection[str] = (),
    json_body: object = None,
    headers: dict[str, str],
    judge: Judge,
    max_throttled_seconds: float = MAX_THROTTLED_SECONDS,
    answer_timeout_seconds: float = ANSWER_TIMEOUT_SECONDS,
) -> Outcome:
    """Posts one message until the provider answers for good. Providers cannot de-duplicate, so
    it is posted again only after an answer proving it was not processed (throttled, or no
    connection made); an answer that proves nothing makes it UNKNOWN, never sent again."""
    # Encoded once, for every attempt: a form, or JSON.
    if form is not None:
        body, content_type = form_body(form, repeated_form_fields), "application/x-www-form-urlencoded"
    else:
        body = json.dumps(json_body, separators=(",", ":"), ensure_ascii=False).encode()
        content_type = "application/json"
    started = time.monotonic()
    attempts = refused_connections = 0
    if context.halted():  # admitted before a stop that came while it waited for its turn
        return Outcome(recipient, SKIPPED, 0, "campaign stopped")
    # When this message was last confirmed wanted: the wave was admitted before the first attempt.
    confirmed_at = ADMITTED_AT.get()

    async def confirmed() -> bool:
        """Asks again whether the message is wanted (raises Superseded when the batch was taken
        over); a yes counts from the moment of asking."""
        nonlocal confirmed_at
        asked = time.monotonic()
        if not await context.wanted():
            return False
        confirmed_at = asked
        return True

    while True:
        # A retry after waiting asks again.
        if attempts and not await confirmed():
            return Outcome(recipient, SKIPPED, attempts, "campaign stopped")
        refused: NotConnected | None = None
        async with context.request_slots:  # a connection is free before the slot is taken
            while True:
                send_by = await context.permit()
                # Confirmed a while ago (a slow rate limit, or this process was paused and another
                # replica may have taken the batch over and settled it): asked again just before,
                # and again after any wait for a later slot, which a pause may have stretched too.
                if time.monotonic() - confirmed_at <= STALE_ADMISSION_SECONDS:
                    break
                if not await confirmed():
                    return Outcome(recipient, SKIPPED, attempts, "campaign stopped")
                if time.monotonic() <= send_by:  # else asking took its slot's time: the next one
                    break
            attempts += 1
            try:
                # Written only while the confirmation is fresh and within its rate slot, checked
                # with no wait between it and the socket: a process paused after its last look
                # (getting a connection, building the request) writes nothing on waking, so a
                # successor that took the batch over and asked the provider meanwhile is never
                # contradicted, and a late request never lands beside the next slot's.
                answer = await http.post(
                    url,
                    body,
                    content_type=content_type,
                    headers=headers,
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    answer_timeout=answer_timeout_seconds,
                    write_until=min(confirmed_at + STALE_ADMISSION_SECONDS, send_by),
                )
            except Withheld:  # nothing was written: made in a later slot (confirmed again if stale)
                attempts -= 1
                continue
            except NotConnected as error:
                refused = error
            except AnswerLost as error:
                reason = f"no answer from {provider} ({error}); it may have been sent"
                return Outcome(recipient, UNKNOWN, attempts, reason)
            except ValueError as error:  # a header that cannot be sent: nothing was
                return Outcome(recipient, FAILED, attempts, f"the request could not be made: {error}")
        if refused is not None:
            # No connection was made: nothing was written, so it is safe to try again.
            refused_connections += 1
            if refused_connections >= CONNECT_ATTEMPTS:
                reason = f"could not connect to {provider} ({refused})"
                return Outcome(recipient, FAILED, attempts, reason, failover=True)
            await context.waiting(f"{provider} cannot be reached")
            await asyncio.sleep(backoff_seconds(refused_connections))
            continue
        verdict = judge(answer.status, answer.text)
        if verdict.meaning is not Meaning.THROTTLED:
            if verdict.meaning is Meaning.SENT:
                await context.waiting(None)
            return _outcome(recipient, verdict, attempts, provider)
        if time.monotonic() - started > max_throttled_seconds:
            reason = f"{provider} throttled it for {max_throttled_seconds:,.0f} s"
            return Outcome(recipient, FAILED, attempts, reason, failover=True)
        await context.waiting(f"{provider} is throttling; slowing down")
        retry_after = retry_after_seconds(answer.headers.get("retry-after"))
        await asyncio.sleep(retry_after if retry_after is not None else backoff_seconds(attempts + 1))


async def check_with(
    http: aiohttp.ClientSession,
    provider: str,
    url: str,
    headers: dict[str, str],
    describe: Callable[[str], str],
) -> tuple[bool, str]:
    """GETs a provider's account resource: 200 means the credentials work (`describe` words the
    answer); anything else, or no answer, means they do not, or cannot be told."""
    try:
        async with http.get(
            url,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_SECONDS),
            allow_redirects=False,
        ) as response:
            status, text = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError) as error:
        return False, f"{provider} could not be reached ({type(error).__name__})"
    if status == 200:
        return True, describe(text)
    if status in (401, 403):
        return False, f"{provider} refused the credentials (HTTP {status})"
    return False, f"{provider} answered HTTP {status}"


def dlt_missing(phone: str, entity_id: str, template_id: str) -> str:
    """What India's DLT rules need that a message to `phone` lacks ('' when nothing): +91 numbers
    are reached only with the principal entity's id and the approved template's id."""
    if not phone.startswith("+91"):
        return ""
    missing = [
        name for name, value in (("dlt_entity_id", entity_id), ("dlt_template_id", template_id)) if not value
    ]
    if not missing:
        return ""
    return f"India's DLT rules need {' and '.join(missing)} for +91 numbers; not sent"


class SmsProvider:
    """What the providers share: a batch is each recipient's message sent through `send_one`,
    and each message posted through `post`."""

    can_settle = False

    async def look_up(self, destination: pb.Destination, phone: str, text: str, since: datetime) -> Lookup:
        return CANNOT_TELL

    def __init__(
        self,
        http: aiohttp.ClientSession,
        messages: ProviderHttp,
        *,
        max_throttled_seconds: float = MAX_THROTTLED_SECONDS,
        answer_timeout_seconds: float = ANSWER_TIMEOUT_SECONDS,
    ) -> None:
        self.http = http  # lookups and credential checks
        self.messages = messages  # the messages themselves
        self.max_throttled_seconds = max_throttled_seconds
        self.answer_timeout_seconds = answer_timeout_seconds

    async def post(self, context: SendContext, recipient: events.Recipient, **request: Any) -> Outcome:
        """`post_message` with this provider's connections and limits."""
        return await post_message(
            self.messages,
            context,
            recipient,
            max_throttled_seconds=self.max_throttled_seconds,
            answer_timeout_seconds=self.answer_timeout_seconds,
            **request,
        )

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        raise NotImplementedError

    async def deliver(self, context: SendContext, recipients: Sequence[events.Recipient]) -> list[Outcome]:
        return await send_each(
            context, recipients, lambda r, phone, text: self.send_one(context, r, phone, text)
        )
