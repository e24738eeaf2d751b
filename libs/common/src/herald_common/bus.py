"""NATS JetStream: connection, streams, subjects, durable pull consumers and dead letters."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import nats
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError

from herald_common.logging import get_logger

log = get_logger(__name__)

REASON_HEADER = "Herald-Dead-Letter-Reason"
SOURCE_SUBJECT_HEADER = "Herald-Source-Subject"
# JetStream drops a second publish with the same Nats-Msg-Id inside this window.
DUPLICATE_WINDOW_SECONDS = 600.0
# Events are consumed within seconds; they are kept a week for replay and inspection, dead
# letters a month so someone can look at them and redrive.
EVENT_RETENTION_SECONDS = 7 * 86400.0
DEAD_LETTER_RETENTION_SECONDS = 30 * 86400.0


@dataclass(frozen=True)
class Subjects:
    """Every subject Herald publishes on, under one namespace."""

    namespace: str

    @property
    def campaign_changed(self) -> str:
        return f"{self.namespace}.campaign.changed"

    @property
    def run_changed(self) -> str:
        return f"{self.namespace}.scheduler.run.changed"

    def delivery_job(self, destination_type: str) -> str:
        return f"{self.namespace}.scheduler.job.{destination_type}"

    @property
    def delivery_outcome(self) -> str:
        return f"{self.namespace}.dispatch.outcome"

    def dead_letter(self, consumer: str) -> str:
        return f"{self.namespace}.deadletter.{consumer}"

    def stream(self, owner: str) -> str:
        """Stream holding what `owner` publishes (one stream per publishing service)."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.namespace}_{owner}").upper()

    def streams(self) -> dict[str, list[str]]:
        owners = ["campaign", "scheduler", "dispatch", "segmentation", "deadletter"]
        return {self.stream(o): [f"{self.namespace}.{o}.>"] for o in owners}


async def connect(url: str, name: str) -> NatsClient:
    async def on_error(error: Exception) -> None:
        log.warning("nats_error", error=str(error))

    return await nats.connect(
        url, name=name, error_cb=on_error, max_reconnect_attempts=-1, reconnect_time_wait=1
    )


async def ensure_streams(js: JetStreamContext, subjects: Subjects) -> None:
    """Creates the namespace's streams, or updates them to the current configuration."""
    dead_letters = subjects.stream("deadletter")
    for name, stream_subjects in subjects.streams().items():
        config = StreamConfig(
            name=name,
            subjects=stream_subjects,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            max_age=DEAD_LETTER_RETENTION_SECONDS if name == dead_letters else EVENT_RETENTION_SECONDS,
        )
        try:
            await js.stream_info(name)
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)


async def dead_letter(js: JetStreamContext, subjects: Subjects, consumer: str, msg: Msg, reason: str) -> None:
    """Keeps a message that can never be processed, with the reason, then removes it from work."""
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
) -> list[tuple[Msg, EventT]]:
    """Parses each message; malformed ones are dead-lettered with the reason and left out."""
    decoded: list[tuple[Msg, EventT]] = []
    for msg in msgs:
        event = event_type()
        try:
            event.ParseFromString(msg.data)
        except DecodeError as error:
            await dead_letter(js, subjects, consumer, msg, f"undecodable {event_type.__name__}: {error}")
            continue
        problem = validate(event)
        if problem:
            await dead_letter(js, subjects, consumer, msg, problem)
            continue
        decoded.append((msg, event))
    return decoded


BatchHandler = Callable[[list[Msg]], Awaitable[None]]


class PullConsumer:
    """A durable pull consumer that hands batches of messages to a handler until stopped.

    The handler acks what it has processed. When a batch fails, its messages are retried one by
    one so a single bad message cannot hold the others back; a message that keeps failing is
    redelivered with growing delays and, after `max_deliveries`, dead-lettered with the error.
    """

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        stream: str,
        durable: str,
        filter_subject: str,
        handler: BatchHandler,
        batch_size: int = 256,
        ack_wait_seconds: float = 30.0,
        max_deliveries: int = 10,
        redelivery_base_seconds: float = 2.0,
    ) -> None:
        self.js = js
        self.subjects = subjects
        self.stream = stream
        self.durable = durable
        self.filter_subject = filter_subject
        self.handler = handler
        self.batch_size = batch_size
        self.ack_wait_seconds = ack_wait_seconds
        self.max_deliveries = max_deliveries
        self.redelivery_base_seconds = redelivery_base_seconds
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_seconds,
            filter_subject=self.filter_subject,
            max_ack_pending=20_000,
        )
        subscription = await self.js.pull_subscribe(
            self.filter_subject, durable=self.durable, stream=self.stream, config=config
        )
        self._task = asyncio.create_task(self._run(subscription), name=f"consumer:{self.durable}")

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await subscription.fetch(self.batch_size, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as error:  # connection trouble: wait and try again
                log.warning("fetch_failed", consumer=self.durable, error=str(error))
                await asyncio.sleep(1)
                continue
            try:
                await self._handle(msgs)
            except Exception as error:
                log.exception("batch_failed", consumer=self.durable, size=len(msgs))
                if len(msgs) == 1:
                    await self._failed(msgs[0], error)
                    continue
                for msg in msgs:
                    if not msg._ackd:
                        await self._handle_alone(msg)

    async def _handle(self, msgs: list[Msg]) -> None:
        """Runs the handler, telling JetStream the batch is in progress while it takes long."""
        keepalive = asyncio.create_task(self._keep_alive(msgs))
        try:
            await self.handler(msgs)
        finally:
            keepalive.cancel()

    async def _keep_alive(self, msgs: list[Msg]) -> None:
        # A slow handler (a destination's rate limit, say) must not let the batch be handed
        # to another instance while it is still being worked on.
        while True:
            await asyncio.sleep(self.ack_wait_seconds / 3)
            for msg in msgs:
                if not msg._ackd:
                    await msg.in_progress()

    async def _handle_alone(self, msg: Msg) -> None:
        try:
            await self._handle([msg])
        except Exception as error:
            await self._failed(msg, error)

    async def _failed(self, msg: Msg, error: Exception) -> None:
        delivered = msg.metadata.num_delivered or 1
        if delivered >= self.max_deliveries:
            await dead_letter(
                self.js, self.subjects, self.durable, msg, f"failed {delivered} times: {error!r}"
            )
        else:
            await msg.nak(delay=min(self.redelivery_base_seconds * 2 ** (delivered - 1), 60.0))

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
