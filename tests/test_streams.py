"""Streams never drop events a consumer has not read: when one is full, publishing is refused
(the event waits in its outbox, which reports itself stuck) instead of the oldest being discarded."""

from __future__ import annotations

import uuid

import pytest
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.errors import APIError

from herald_common.bus import Subjects, ensure_streams
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
