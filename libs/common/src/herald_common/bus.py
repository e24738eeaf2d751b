"""NATS JetStream: connection, streams, subjects, durable pull consumers and dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from opentelemetry.trace import SpanKind

from herald_common import tracing
from herald_common.faults import NotReady, is_transient
from herald_common.logging import get_logger
from herald_common.loops import cancel_and_wait
from herald_common.metrics import Metrics

log = get_logger(__name__)

REASON_HEADER = "Herald-Dead-Letter-Reason"
SOURCE_SUBJECT_HEADER = "Herald-Source-Subject"
# JetStream drops a second publish with the same Nats-Msg-Id inside this window.
DUPLICATE_WINDOW_SECONDS = 600.0
# Events are consumed within seconds; they are kept a week for replay and inspection, dead
# letters a month so someone can look at them and redrive.
EVENT_RETENTION_SECONDS = 7 * 86400.0
DEAD_LETTER_RETENTION_SECONDS = 30 * 86400.0


# Streams of events keep at most this much; the oldest events go first (all are consumed within
# seconds, the rest is history for replay and inspection).
EVENT_STREAM_MAX_BYTES = 1 << 30
# Planned deliveries wait in a work queue: removed once handled, and a full queue refuses new
# batches, which then wait in the scheduler's outbox, instead of dropping planned work.
JOB_STREAM_MAX_BYTES = 2 << 30


@dataclass(frozen=True)
class StreamLimits:
    """What an installation sets for its streams (HERALD_STREAM_* settings): on a JetStream
    cluster, replicas 3 keeps every stream through the loss of a server."""

    replicas: int = 1
    max_age_seconds: float = EVENT_RETENTION_SECONDS
    max_bytes: int = EVENT_STREAM_MAX_BYTES
    job_max_bytes: int = JOB_STREAM_MAX_BYTES


@dataclass(frozen=True)
class StreamSpec:
    subjects: list[str]
    max_age_seconds: float
    max_bytes: int
    work_queue: bool = False


@dataclass(frozen=True)
class Subjects:
    """Every subject Herald publishes on, under one namespace."""

    namespace: str

    @property
    def campaign_changed(self) -> str:
        return f"{self.namespace}.campaign.changed"

    @property
    def account_changed(self) -> str:
        return f"{self.namespace}.campaign.account.changed"

    @property
    def run_changed(self) -> str:
        return f"{self.namespace}.scheduler.run.changed"

    def delivery_batch(self, destination_type: str, destination_id: str) -> str:
        """Jobs of one destination: a worker handles each destination as its own lane."""
        return f"{self.namespace}.jobs.{destination_type}.{destination_id}"

    def delivery_batches(self, destination_type: str) -> str:
        return f"{self.namespace}.jobs.{destination_type}.*"

    @property
    def delivery_outcomes(self) -> str:
        return f"{self.namespace}.dispatch.outcomes"

    @property
    def delivery_receipts(self) -> str:
        return f"{self.namespace}.dispatch.receipts"

    @property
    def sms_opt_outs(self) -> str:
        return f"{self.namespace}.dispatch.sms.optout"

    @property
    def destination_waiting(self) -> str:
        return f"{self.namespace}.dispatch.waiting"

    def campaign_alert(self, account: str) -> str:
        """Alerts of one account (`accounts/{id}`): each account's webhook is a lane of its own."""
        return f"{self.namespace}.scheduler.campaign.alert.{account.removeprefix('accounts/')}"

    @property
    def campaign_alerts(self) -> str:
        return f"{self.namespace}.scheduler.campaign.alert.*"

    @property
    def events_ingested(self) -> str:
        return f"{self.namespace}.segmentation.events.ingested"

    @property
    def visitor_merged(self) -> str:
        return f"{self.namespace}.segmentation.visitor.merged"

    @property
    def web_interactions(self) -> str:
        return f"{self.namespace}.dispatch.web.interactions"

    @property
    def sms_replies(self) -> str:
        return f"{self.namespace}.dispatch.sms.replied"

    @property
    def system_events(self) -> str:
        return f"{self.namespace}.segmentation.system.events"

    @property
    def live_matches(self) -> str:
        return f"{self.namespace}.segmentation.live.matches"

    @property
    def goal_events(self) -> str:
        return f"{self.namespace}.segmentation.goal.events"

    @property
    def campaign_halts(self) -> str:
        """Core NATS (no stream): a halted campaign, told at once to every dispatch replica."""
        return f"{self.namespace}.control.halt"

    def dead_letter(self, consumer: str) -> str:
        return f"{self.namespace}.deadletter.{consumer}"

    def stream(self, owner: str) -> str:
        """Stream holding what `owner` publishes (one stream per publishing service, plus jobs)."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.namespace}_{owner}").upper()

    def streams(self, limits: StreamLimits = StreamLimits()) -> dict[str, StreamSpec]:
        owners = ["campaign", "scheduler", "dispatch", "segmentation"]
        specs = {
            self.stream(o): StreamSpec([f"{self.namespace}.{o}.>"], limits.max_age_seconds, limits.max_bytes)
            for o in owners
        }
        specs[self.stream("jobs")] = StreamSpec(
            [f"{self.namespace}.jobs.>"], limits.max_age_seconds, limits.job_max_bytes, work_queue=True
        )
        # Dead letters are kept longer than events: someone has to look at them.
        specs[self.stream("deadletter")] = StreamSpec(
            [f"{self.namespace}.deadletter.>"],
            max(limits.max_age_seconds, DEAD_LETTER_RETENTION_SECONDS),
            limits.max_bytes,
        )
        return specs


async def connect(url: str, name: str) -> NatsClient:
    async def on_error(error: Exception) -> None:
        log.warning("nats_error", error=str(error))

    # NATS_URL may list several servers of a cluster, comma-separated; the client learns the
    # others from them and moves to another when its server goes away.
    servers = [u.strip() for u in url.split(",") if u.strip()]
    return await nats.connect(
        servers, name=name, error_cb=on_error, max_reconnect_attempts=-1, reconnect_time_wait=1
    )


async def ensure_streams(
    js: JetStreamContext, subjects: Subjects, limits: StreamLimits = StreamLimits()
) -> None:
    """Creates the namespace's streams, or updates them to the current configuration (replicas
    included: JetStream moves a stream to more or fewer servers in place)."""
    for name, spec in subjects.streams(limits).items():
        config = StreamConfig(
            name=name,
            subjects=spec.subjects,
            num_replicas=limits.replicas,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            max_age=spec.max_age_seconds,
            max_bytes=spec.max_bytes,
            retention=RetentionPolicy.WORK_QUEUE if spec.work_queue else RetentionPolicy.LIMITS,
            # A full stream refuses what is new rather than dropping what a consumer may not have
            # read yet: the refused events wait in their outbox (which then reports itself stuck).
            discard=DiscardPolicy.NEW,
        )
        await _create_or_update(js, config)


T = TypeVar("T")

# On a cluster, replicas starting together race to create the same streams: the meta leader
# answers one and may leave the others unanswered. Each tries again for this long.
STREAM_SETUP_SECONDS = 30.0


async def set_up(name: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """Creates or updates a stream or bucket, trying again while another replica races it."""
    deadline = time.monotonic() + STREAM_SETUP_SECONDS
    while True:
        try:
            return await attempt()
        except (TimeoutError, nats.errors.TimeoutError, BadRequestError) as error:
            # BadRequestError: another replica created it first ("stream name already in use").
            if time.monotonic() > deadline:
                raise
            log.info("stream_setup_retried", stream=name, error=repr(error))
            await asyncio.sleep(0.5)


async def _create_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    async def attempt() -> None:
        try:
            await js.stream_info(config.name or "")
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)

    await set_up(config.name or "", attempt)


async def replay_dead_letters(
    js: JetStreamContext, subjects: Subjects, consumer: str, limit: int
) -> tuple[int, int]:
    """Republishes the dead letters of `consumer` (every consumer's when empty), oldest first, up
    to `limit`, each to the subject it came from, then removes it from the dead letters. Returns
    (replayed, left)."""
    stream = subjects.stream("deadletter")
    subject = subjects.dead_letter(consumer or "*")
    replayed, seq = 0, 1
    while replayed < limit:
        try:
            found = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        found_seq = found.seq or seq
        source = (found.headers or {}).get(SOURCE_SUBJECT_HEADER, "")
        if source:
            # A replayed message has an id of its own: the original's may still be in the
            # duplicate window, and JetStream would drop it as a repeat.
            replay_id = f"replay-{stream}-{found_seq}"
            await js.publish(source, found.data or b"", headers={"Nats-Msg-Id": replay_id})
            await js.delete_msg(stream, found_seq)
            replayed += 1
            log.info("dead_letter_replayed", subject=source, consumer=consumer or "*")
        seq = found_seq + 1
    info = await js.stream_info(stream, subjects_filter=subject)
    left = sum((info.state.subjects or {}).values())
    return replayed, left


async def dead_letter(
    js: JetStreamContext,
    subjects: Subjects,
    consumer: str,
    msg: Msg,
    reason: str,
    metrics: Metrics | None = None,
) -> None:
    """Keeps a message that can never be processed, with the reason, then removes it from work."""
    if metrics is not None:
        metrics.dead_letters.labels(consumer).inc()
    await js.publish(
        subjects.dead_letter(consumer),
        msg.data,
        headers={REASON_HEADER: reason, SOURCE_SUBJECT_HEADER: msg.subject},
    )
    log.warning("dead_lettered", consumer=consumer, subject=msg.subject, reason=reason)
    await msg.term()


EventT = TypeVar("EventT", bound=Message)


async def decode_batch(
    js: JetStreamContext,
    subjects: Subjects,
    consumer: str,
    msgs: Sequence[Msg],
    event_type: type[EventT],
    validate: Callable[[EventT], str | None] = lambda _: None,
    metrics: Metrics | None = None,
) -> list[tuple[Msg, EventT]]:
    """Parses each message; malformed ones are dead-lettered with the reason and left out."""
    decoded: list[tuple[Msg, EventT]] = []
    for msg in msgs:
        event = event_type()
        try:
            event.ParseFromString(msg.data)
        except DecodeError as error:
            await dead_letter(
                js, subjects, consumer, msg, f"undecodable {event_type.__name__}: {error}", metrics
            )
            continue
        problem = validate(event)
        if problem:
            await dead_letter(js, subjects, consumer, msg, problem, metrics)
            continue
        decoded.append((msg, event))
    return decoded


def _size(msgs: list[Msg]) -> dict[str, int]:
    return {"messaging.batch.message_count": len(msgs)}


BatchHandler = Callable[[list[Msg]], Awaitable[None]]
MessageHandler = Callable[[Msg], Awaitable[None]]
# Longest wait before a message whose handling failed is offered again.
MAX_REDELIVERY_DELAY_SECONDS = 60.0
# The first wait of a message that came before what it refers to (NotReady): that is usually an
# event from another service, milliseconds behind it, so it is offered again soon (then less often).
NOT_READY_FIRST_DELAY_SECONDS = 0.1
# How long an idle consumer's pull waits before it asks again. A message ends the wait at once and
# a stop cuts it short, so this sets only how often an idle consumer asks (and what NATS does for
# each ask).
FETCH_WAIT_SECONDS = 5.0
# A lane holds at most this many times its concurrency (running, or waiting for their turn); a
# message past that is offered again after LANE_FULL_DELAY_SECONDS. A stuck lane then fills a
# small share of a worker's in-flight slots.
LANE_HOLDS = 2
LANE_FULL_DELAY_SECONDS = 0.25


class _Consumer:
    """A durable pull consumer with explicit acks; subclasses decide how messages are handled.

    A message whose handling fails for a transient reason (the database or NATS is away, what it
    refers to has not arrived yet) is offered again with growing delays for as long as it takes.
    One that keeps failing for another reason is dead-lettered with the error after
    `max_deliveries`. Nothing that goes wrong while doing so stops the consumer.
    """

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        stream: str,
        durable: str,
        filter_subject: str,
        ack_wait_seconds: float = 30.0,
        max_deliveries: int = 10,
        redelivery_base_seconds: float = 2.0,
        max_ack_pending: int = 20_000,
        dead_lettered: Callable[[Msg, str], Awaitable[None]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.js = js
        self.metrics = metrics
        self.subjects = subjects
        # Told of each message this consumer dead-letters for failing every attempt, with the reason.
        self.dead_lettered = dead_lettered
        self.stream = stream
        self.durable = durable
        self.filter_subject = filter_subject
        self.ack_wait_seconds = ack_wait_seconds
        self.max_deliveries = max_deliveries
        self.redelivery_base_seconds = redelivery_base_seconds
        self.max_ack_pending = max_ack_pending
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Messages being handled, by id(): Msg is not hashable.
        self._in_progress: dict[int, Msg] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None

    @property
    def alive(self) -> bool:
        """False if the consumer's task has ended while it was meant to run."""
        return self._task is not None and (not self._task.done() or self._stopping.is_set())

    async def start(self) -> None:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_seconds,
            filter_subject=self.filter_subject,
            max_ack_pending=self.max_ack_pending,
        )
        subscription = await self.js.pull_subscribe(
            self.filter_subject, durable=self.durable, stream=self.stream, config=config
        )
        self._subscription = subscription
        self._keepalive = asyncio.create_task(self._keep_alive(), name=f"keepalive:{self.durable}")
        self._task = asyncio.create_task(self._run_forever(subscription), name=f"consumer:{self.durable}")

    async def _run_forever(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._stopping.is_set():
            try:
                await self._run(subscription)
            except Exception:  # a bug or an unexpected NATS answer: log it and carry on
                log.exception("consumer_loop_failed", consumer=self.durable)
                await asyncio.sleep(1)

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        raise NotImplementedError

    async def _fetch(self, subscription: JetStreamContext.PullSubscription, count: int) -> list[Msg]:
        """Up to `count` messages, waiting up to FETCH_WAIT_SECONDS for the first; a stop ends the
        wait at once."""
        pull = asyncio.ensure_future(subscription.fetch(count, timeout=FETCH_WAIT_SECONDS))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((pull, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not pull.done():
                pull.cancel()  # what NATS sends for it is given back by _give_back_unread
                await asyncio.wait((pull,))
        try:
            return pull.result() if not pull.cancelled() else []
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except Exception as error:  # connection trouble: wait and try again
            log.warning("fetch_failed", consumer=self.durable, error=str(error))
            await asyncio.sleep(1)
            return []

    async def _keep_alive(self) -> None:
        # A slow handler (a destination's rate limit, an outage) must not let its messages be
        # handed to another instance while they are still being worked on.
        while True:
            await asyncio.sleep(self.ack_wait_seconds / 3)
            for msg in list(self._in_progress.values()):
                if not msg._ackd:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _settle_failure(self, msg: Msg, error: BaseException) -> None:
        """Offers a failed message again later, or sets it aside when it keeps failing."""
        delivered = msg.metadata.num_delivered or 1
        retried = is_transient(error) or delivered < self.max_deliveries
        if self.metrics is not None and retried:
            self.metrics.consumer_handled.labels(self.durable, "retried").inc()
        try:
            if isinstance(error, NotReady):
                await msg.nak(delay=self._delay(delivered, NOT_READY_FIRST_DELAY_SECONDS))
            elif is_transient(error):
                await msg.nak(delay=self._delay(delivered))
            elif delivered >= self.max_deliveries:
                reason = f"failed {delivered} times: {error!r}"[:1000]
                await dead_letter(self.js, self.subjects, self.durable, msg, reason, self.metrics)
                if self.dead_lettered is not None:
                    await self.dead_lettered(msg, reason)
            else:
                await msg.nak(delay=self._delay(delivered))
        except Exception as settle_error:
            # NATS is away: the message comes back by itself once its ack wait passes.
            log.warning("settle_failed", consumer=self.durable, error=str(settle_error))

    def _delay(self, delivered: int, first: float | None = None) -> float:
        base = self.redelivery_base_seconds if first is None else min(first, self.redelivery_base_seconds)
        delay: float = base * 2.0 ** min(delivered - 1, 16)
        return min(delay, MAX_REDELIVERY_DELAY_SECONDS)

    async def stop(self, grace_seconds: float = 5.0) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
        await self._give_back_unread()
        await self._drain(grace_seconds)
        await cancel_and_wait(self._keepalive)

    async def _give_back_unread(self) -> None:
        """Ends the pulls a stop cut short, so NATS sends their messages to another replica at
        once (a pull whose inbox has no subscriber is dropped), and offers again at once what
        had already come for them, instead of after the ack wait."""
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        try:
            await subscription.unsubscribe()
            unread = subscription._sub._pending_queue  # nats-py keeps what came for a pull here
            while not unread.empty():
                msg = unread.get_nowait()
                if not JetStreamContext.is_status_msg(msg):
                    await msg.nak()
        except Exception as error:  # NATS is away: what came comes back after its ack wait
            log.warning("give_back_failed", consumer=self.durable, error=str(error))

    async def _drain(self, grace_seconds: float) -> None:
        """Lets handlers still running finish within the grace period."""


class PullConsumer(_Consumer):
    """Hands batches of messages to a handler, which acks what it has processed.

    When a batch fails, its messages are retried one by one so a single bad message cannot hold
    the others back.
    """

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        handler: BatchHandler,
        batch_size: int = 256,
        **options: Any,
    ) -> None:
        super().__init__(js, subjects, **options)
        self.handler = handler
        self.batch_size = batch_size

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._stopping.is_set():
            msgs = await self._fetch(subscription, self.batch_size)
            if not msgs:
                continue
            try:
                await self._handle(msgs)
            except Exception as error:
                log.warning("batch_failed", consumer=self.durable, size=len(msgs), error=repr(error))
                if len(msgs) == 1 or is_transient(error):
                    for msg in msgs:
                        if not msg._ackd:
                            await self._settle_failure(msg, error)
                    continue
                for msg in msgs:
                    if not msg._ackd:
                        await self._handle_alone(msg)

    async def _handle(self, msgs: list[Msg]) -> None:
        self._in_progress.update((id(msg), msg) for msg in msgs)
        try:
            # A batch continues the trace of its first traced message.
            parent = next((m.headers for m in msgs if m.headers and tracing.TRACEPARENT in m.headers), None)
            with tracing.span(
                f"consume {self.durable}", SpanKind.CONSUMER, parent=parent, attributes=_size(msgs)
            ):
                await self.handler(msgs)
        finally:
            for msg in msgs:
                self._in_progress.pop(id(msg), None)

    async def _handle_alone(self, msg: Msg) -> None:
        try:
            await self._handle([msg])
        except Exception as error:
            await self._settle_failure(msg, error)


class LaneConsumer(_Consumer):
    """Handles messages one at a time, concurrently, in lanes keyed by subject.

    Each lane (a destination, say) has its own concurrency, so one lane waiting on a rate limit or
    an outage never holds another back; `max_in_flight` bounds the messages held at once. A lane
    holds at most LANE_HOLDS times its concurrency: past that, a message is handed back to
    JetStream for a while (redelivered after LANE_FULL_DELAY_SECONDS), so a stuck lane cannot fill
    every in-flight slot. The handler acks; on stop, handlers get the grace
    period and what is still running is handed back to JetStream for redelivery.
    """

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        handler: MessageHandler,
        lane_concurrency: int = 4,
        max_in_flight: int = 64,
        **options: Any,
    ) -> None:
        super().__init__(js, subjects, **options)
        self.handler = handler
        self.lane_concurrency = lane_concurrency
        self.max_in_flight = max_in_flight
        self._lanes: dict[str, asyncio.Semaphore] = {}
        self._held: dict[str, int] = {}  # messages of each lane running or waiting for their turn
        self._tasks: set[asyncio.Task[None]] = set()

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._stopping.is_set():
            free = self.max_in_flight - len(self._tasks)
            if free <= 0:
                await asyncio.wait(self._tasks, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                continue
            for msg in await self._fetch(subscription, free):
                task = asyncio.create_task(self._handle(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        lane = self._lanes.setdefault(msg.subject, asyncio.Semaphore(self.lane_concurrency))
        held = self._held.get(msg.subject, 0)
        if held >= LANE_HOLDS * self.lane_concurrency:
            with contextlib.suppress(Exception):  # not sent back: it returns after the ack wait
                await msg.nak(delay=LANE_FULL_DELAY_SECONDS)
            return
        self._held[msg.subject] = held + 1
        self._in_progress[id(msg)] = msg
        try:
            async with lane:
                with tracing.span(f"consume {self.durable}", SpanKind.CONSUMER, parent=msg.headers):
                    await self.handler(msg)
            if self.metrics is not None:
                self.metrics.consumer_handled.labels(self.durable, "acked").inc()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception as error:
            log.warning("message_failed", consumer=self.durable, subject=msg.subject, error=repr(error))
            await self._settle_failure(msg, error)
        finally:
            self._in_progress.pop(id(msg), None)
            self._held[msg.subject] -= 1
            if not self._held[msg.subject]:
                del self._held[msg.subject], self._lanes[msg.subject]

    async def _drain(self, grace_seconds: float) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.info("handlers_cancelled_at_shutdown", consumer=self.durable, count=len(pending))
