"""A message that keeps failing is set aside with its reason; the others are not held back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from herald_common.bus import (
    FETCH_WAIT_SECONDS,
    REASON_HEADER,
    SOURCE_SUBJECT_HEADER,
    PullConsumer,
    Subjects,
)
from herald_common.faults import NotReady
from herald_common.settings import Settings
from tests.conftest import eventually


async def test_poison_message_is_dead_lettered_after_retries(
    settings: Settings, js: JetStreamContext
) -> None:
    subjects = Subjects(settings.namespace)
    subject = f"{settings.namespace}.campaign.poison-{uuid.uuid4().hex[:6]}"
    handled: list[bytes] = []
    poison_deliveries: list[int] = []

    async def handler(msgs: list[Msg]) -> None:
        for msg in msgs:
            if msg.data == b"poison":
                poison_deliveries.append(msg.metadata.num_delivered or 0)
                raise ValueError("cannot handle poison")
        for msg in msgs:
            handled.append(msg.data)
            await msg.ack()

    durable = f"poison-test-{uuid.uuid4().hex[:6]}"
    consumer = PullConsumer(
        js,
        subjects,
        stream=subjects.stream("campaign"),
        durable=durable,
        filter_subject=subject,
        handler=handler,
        max_deliveries=3,
        redelivery_base_seconds=0.05,
    )
    for payload in (b"first", b"poison", b"last"):
        await js.publish(subject, payload)
    await consumer.start()
    try:

        async def set_aside() -> bool:
            try:
                last = await js.get_last_msg(subjects.stream("deadletter"), subjects.dead_letter(durable))
            except nats.js.errors.NotFoundError:
                return False
            return last.data == b"poison"

        await eventually(set_aside, within=20)
    finally:
        await consumer.stop()
    assert sorted(handled) == [b"first", b"last"]
    # Three deliveries by JetStream; the first one was also tried alone, out of its batch.
    assert poison_deliveries == [1, 1, 2, 3]
    last = await js.get_last_msg(subjects.stream("deadletter"), subjects.dead_letter(durable))
    assert last.headers is not None
    assert last.headers[REASON_HEADER] == "failed 3 times: ValueError('cannot handle poison')"
    assert last.headers[SOURCE_SUBJECT_HEADER] == subject


async def test_streams_keep_events_a_week_and_dead_letters_a_month(
    settings: Settings, js: JetStreamContext
) -> None:
    subjects = Subjects(settings.namespace)
    for owner, days in [("campaign", 7), ("scheduler", 7), ("dispatch", 7), ("deadletter", 30)]:
        info = await js.stream_info(subjects.stream(owner))
        assert info.config.subjects == [f"{settings.namespace}.{owner}.>"]
        assert info.config.max_age == days * 86400
        assert info.config.duplicate_window == 600


async def test_slow_handler_keeps_its_batch(settings: Settings, js: JetStreamContext) -> None:
    subject = f"{settings.namespace}.campaign.slow-{uuid.uuid4().hex[:6]}"
    calls: list[bytes] = []

    async def slow_handler(msgs: list[Msg]) -> None:
        calls.extend(msg.data for msg in msgs)
        await asyncio.sleep(3)  # three times the ack wait
        for msg in msgs:
            await msg.ack()

    consumer = _on_campaign_stream(js, settings, subject, slow_handler, ack_wait_seconds=1.0)
    await js.publish(subject, b"slow")
    await consumer.start()
    try:

        async def started() -> bool:
            return bool(calls)

        await eventually(started)
        await asyncio.sleep(4.5)  # past the handler, and past a redelivery had there been one
    finally:
        await consumer.stop()
    assert calls == [b"slow"], "JetStream redelivered a message that was still being handled"


def _consumer(
    js: JetStreamContext, settings: Settings, durable: str, subject: str, seen: list[tuple[float, bytes]]
) -> PullConsumer:

    async def handler(msgs: list[Msg]) -> None:
        for msg in msgs:
            seen.append((time.monotonic(), msg.data))
            await msg.ack()

    # A long ack wait: a message left with a stopped consumer would show as a 30 s stall.
    return _on_campaign_stream(js, settings, subject, handler, durable=durable, ack_wait_seconds=30.0)


def _on_campaign_stream(
    js: JetStreamContext,
    settings: Settings,
    subject: str,
    handler: Callable[[list[Msg]], Awaitable[None]],
    durable: str = "",
    **options: Any,
) -> PullConsumer:
    """A consumer of `subject` on the campaign stream (durable: a new name unless given)."""
    subjects = Subjects(settings.namespace)
    return PullConsumer(
        js,
        subjects,
        stream=subjects.stream("campaign"),
        durable=durable or f"test-{uuid.uuid4().hex[:8]}",
        filter_subject=subject,
        handler=handler,
        **options,
    )


async def test_a_lone_message_to_an_idle_consumer_is_handled_at_once(
    settings: Settings, js: JetStreamContext
) -> None:
    subject = f"{settings.namespace}.campaign.lone-{uuid.uuid4().hex[:6]}"
    seen: list[tuple[float, bytes]] = []
    consumer = _consumer(js, settings, f"lone-{uuid.uuid4().hex[:6]}", subject, seen)
    await consumer.start()
    try:
        await asyncio.sleep(0.5)  # idle: its pull is waiting
        published = time.monotonic()
        await js.publish(subject, b"one")
        await eventually(lambda: _any(seen), within=10, interval=0.01)
    finally:
        await consumer.stop()
    # Not held until its pull's wait (FETCH_WAIT_SECONDS) is over.
    assert seen[0][0] - published < FETCH_WAIT_SECONDS / 2


async def test_a_message_ahead_of_what_it_refers_to_is_offered_again_soon(
    settings: Settings, js: JetStreamContext
) -> None:
    # A delivery batch that reaches dispatch before its campaign's announcement: handled again
    # within a fraction of the redelivery wait that failures get (2 s here, as in production).
    subject = f"{settings.namespace}.campaign.ahead-{uuid.uuid4().hex[:6]}"
    attempts: list[float] = []

    async def handler(msgs: list[Msg]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise NotReady("its campaign has not been announced yet")
        for msg in msgs:
            await msg.ack()

    consumer = _on_campaign_stream(js, settings, subject, handler, redelivery_base_seconds=2.0)
    await js.publish(subject, b"batch")
    await consumer.start()
    try:
        await eventually(lambda: _handled_twice(attempts), within=10, interval=0.01)
    finally:
        await consumer.stop()
    assert attempts[1] - attempts[0] < 1.0


async def _handled_twice(attempts: list[float]) -> bool:
    return len(attempts) >= 2


async def test_a_stopped_consumer_leaves_no_pull_behind(settings: Settings, js: JetStreamContext) -> None:
    subject = f"{settings.namespace}.campaign.handover-{uuid.uuid4().hex[:6]}"
    durable = f"handover-{uuid.uuid4().hex[:6]}"
    first: list[tuple[float, bytes]] = []
    stopped = _consumer(js, settings, durable, subject, first)
    await stopped.start()
    await asyncio.sleep(0.5)  # its pull is waiting when it stops
    started = time.monotonic()
    await stopped.stop()
    assert time.monotonic() - started < 2.0  # the waiting pull does not hold the stop
    await js.publish(subject, b"after the stop")
    second: list[tuple[float, bytes]] = []
    successor = _consumer(js, settings, durable, subject, second)
    await successor.start()
    try:
        # The successor gets it at once, not after the 30 s ack wait of a pull left open.
        await eventually(lambda: _any(second), within=10, interval=0.05)
    finally:
        await successor.stop()
    assert [data for _, data in second] == [b"after the stop"]
    assert first == []


async def _any(seen: list[tuple[float, bytes]]) -> bool:
    return bool(seen)
