"""The local Segment API answers as Segment documents, so tests against it mean something."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from herald_sandbox.segment_api import SegmentApi

KEY = "wk_test"


@pytest.fixture
async def fake() -> AsyncIterator[SegmentApi]:
    api = SegmentApi(write_keys={KEY})
    await api.start()
    yield api
    await api.stop()


def _track(message_id: str, **extra: object) -> dict[str, object]:
    return {"type": "track", "event": "E", "userId": "u", "messageId": message_id, **extra}


async def _post(
    fake: SegmentApi, path: str, body: bytes, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            fake.url + path, data=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        await response.read()
        return response


async def test_invalid_json_and_oversized_requests_are_400(fake: SegmentApi) -> None:
    assert (await _post(fake, "/v1/batch", b"{nope")).status == 400
    big_event = _track("m1", properties={"x": "y" * 33_000})
    assert (
        await _post(fake, "/v1/batch", json.dumps({"batch": [big_event], "writeKey": KEY}).encode())
    ).status == 400
    assert (await _post(fake, "/v1/track", json.dumps({**big_event, "writeKey": KEY}).encode())).status == 400
    many = [_track(f"m{i}", properties={"x": "y" * 20_000}) for i in range(30)]
    assert (
        await _post(fake, "/v1/batch", json.dumps({"batch": many, "writeKey": KEY}).encode())
    ).status == 400
    assert fake.events == {}


async def test_basic_auth_and_body_write_key_are_both_accepted(fake: SegmentApi) -> None:
    basic = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    ok = await _post(
        fake, "/v1/batch", json.dumps({"batch": [_track("a")]}).encode(), {"Authorization": basic}
    )
    assert ok.status == 200
    assert (
        await _post(fake, "/v1/batch", json.dumps({"batch": [_track("b")], "writeKey": KEY}).encode())
    ).status == 200
    assert set(fake.events) == {"a", "b"}


async def test_unknown_key_and_bad_events_get_200_but_are_dropped(fake: SegmentApi) -> None:
    assert (
        await _post(fake, "/v1/batch", json.dumps({"batch": [_track("c")], "writeKey": "wrong"}).encode())
    ).status == 200
    no_user = {"type": "track", "event": "E", "messageId": "d"}
    assert (
        await _post(fake, "/v1/batch", json.dumps({"batch": [no_user], "writeKey": KEY}).encode())
    ).status == 200
    assert fake.events == {}
    assert [reason for reason, _ in fake.dropped] == ["unknown write key", "no_user_anon_id"]


async def test_rate_limit_answers_429_with_retry_after(fake: SegmentApi) -> None:
    fake.max_requests_per_second = 2
    body = json.dumps({"batch": [_track("e")], "writeKey": KEY}).encode()
    responses = await asyncio.gather(*(_post(fake, "/v1/batch", body) for _ in range(3)))
    assert sorted(r.status for r in responses) == [200, 200, 429]
    limited = await _post(fake, "/v1/batch", body)
    assert limited.headers["Retry-After"] == "1" and limited.headers["X-RateLimit-Reset"] == "1"
    assert fake.duplicates == 1  # messageId "e" accepted once, de-duplicated once
