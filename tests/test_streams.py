"""Streams never drop events a consumer has not read: when one is full, publishing is refused
(the event waits in its outbox, which reports itself stuck) instead of the oldest being discarded."""

from __future__ import annotations

import uuid

import pytest
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.errors import APIError

from herald_common.bus import StreamLimits, Subjects, ensure_streams
from herald_common.settings import Settings


async def test_every_stream_refuses_new_events_when_full(settings: Settings, js: JetStreamContext) -> None:
    subjects = Subjects(settings.namespace)
    await ensure_streams(js, subjects)
    for name in subjects.streams():
        info = await js.stream_info(name)
        assert info.config.discard == DiscardPolicy.NEW, name


async def test_a_full_stream_keeps_its_oldest_event_and_refuses_the_next(js: JetStreamContext) -> None:
    """What that policy does, on a stream small enough to fill: nothing unread is lost."""
    name = f"FULL_{uuid.uuid4().hex[:8]}".upper()
    subject = f"{name.lower()}.events"
    await js.add_stream(
        StreamConfig(name=name, subjects=[subject], max_bytes=4096, discard=DiscardPolicy.NEW)
    )
    try:
        first = await js.publish(subject, b"x" * 1000)
        with pytest.raises(APIError):
            for _ in range(10):
                await js.publish(subject, b"y" * 1000)
        kept = await js.get_msg(name, first.seq)
        assert kept.data == b"x" * 1000
    finally:
        await js.delete_stream(name)


async def test_stream_limits_come_from_the_settings(js: JetStreamContext) -> None:
    subjects = Subjects(f"limits{uuid.uuid4().hex[:8]}")
    limits = StreamLimits(replicas=1, max_age_seconds=3600.0, max_bytes=64 << 20, job_max_bytes=128 << 20)
    await ensure_streams(js, subjects, limits)
    try:
        for name in subjects.streams():
            config = (await js.stream_info(name)).config
            assert config.num_replicas == 1
            if name == subjects.stream("jobs"):
                assert (config.max_age, config.max_bytes) == (3600.0, 128 << 20)
            elif name == subjects.stream("deadletter"):
                assert config.max_age == 30 * 86400.0  # dead letters stay a month whatever events do
            else:
                assert (config.max_age, config.max_bytes) == (3600.0, 64 << 20)
        # A change of settings reaches the existing streams at the next start.
        await ensure_streams(js, subjects, StreamLimits(max_age_seconds=7200.0))
        assert (await js.stream_info(subjects.stream("campaign"))).config.max_age == 7200.0
    finally:
        for name in subjects.streams():
            await js.delete_stream(name)
