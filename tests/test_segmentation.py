"""Segments select exactly the users their filters describe."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_segmentation import audience_snapshots
from herald_segmentation.audience_snapshots import AudienceSnapshot
from tests.conftest import Platform
from tests.harness import Clients, create_account
from tests.helpers import audience, condition, create_segment, field_violations, matching, user


@pytest.fixture(scope="module")
async def tag(platform: Platform) -> str:
    tag = uuid.uuid4().hex[:8]
    people = [
        user(f"{tag}-ana", t=tag, country="US", age=31, gender="F", langs=["en", "es"], bio="Loves Hiking"),
        user(f"{tag}-ben", t=tag, country="US", age=17, gender="M", langs=["en"]),
        user(f"{tag}-cy", t=tag, country="IN", age=45, gender="F", langs=["hi", "en"], vip=True),
        user(f"{tag}-dee", t=tag, country="DE", gender="F"),
    ]
    await platform.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=people))
    return tag


async def _members(platform: Platform, *conditions: pb.PropertyCondition, match: str = "ALL") -> list[str]:
    segment = await create_segment(platform, *conditions, match=match)
    names: list[str] = []
    async for page in platform.segmentation.StreamAudience(
        pb.StreamAudienceRequest(audience=audience(segment.name), page_size=2)
    ):
        names.extend(m.user_id.split("-", 1)[1] for m in page.members)
    reach = await platform.segmentation.EstimateReach(
        pb.EstimateReachRequest(audience=audience(segment.name))
    )
    assert reach.user_count == len(names)
    return names


@pytest.mark.parametrize(
    ("conditions", "match", "expected"),
    [
        ([("country", "EQUALS", "US")], "ALL", ["ana", "ben"]),
        ([("country", "NOT_EQUALS", "US")], "ALL", ["cy", "dee"]),
        ([("age", "GREATER_THAN_OR_EQUAL", 31)], "ALL", ["ana", "cy"]),
        ([("age", "LESS_THAN", 18)], "ALL", ["ben"]),
        ([("country", "IN", ["IN", "DE"])], "ALL", ["cy", "dee"]),
        ([("langs", "CONTAINS", "es")], "ALL", ["ana"]),
        ([("bio", "CONTAINS", "hiking")], "ALL", ["ana"]),
        ([("vip", "EXISTS", None)], "ALL", ["cy"]),
        ([("vip", "NOT_EXISTS", None)], "ALL", ["ana", "ben", "dee"]),
        ([("gender", "EQUALS", "F"), ("country", "EQUALS", "US")], "ALL", ["ana"]),
        ([("age", "LESS_THAN", 18), ("vip", "EQUALS", True)], "ANY", ["ben", "cy"]),
    ],
)
async def test_filters_select_the_right_users(
    platform: Platform, tag: str, conditions: list[tuple[str, str, object]], match: str, expected: list[str]
) -> None:
    scoped = [condition("t", "EQUALS", tag)] if match == "ALL" else []
    found = await _members(platform, *scoped, *(condition(*c) for c in conditions), match=match)
    if match == "ANY":
        found = [f for f in found if f in {"ana", "ben", "cy", "dee"}]
    assert found == expected


async def test_audience_carries_only_requested_attributes(platform: Platform, tag: str) -> None:
    segment = await create_segment(
        platform, condition("t", "EQUALS", tag), condition("country", "EQUALS", "IN")
    )
    pages = platform.segmentation.StreamAudience(
        pb.StreamAudienceRequest(audience=audience(segment.name), attribute_keys=["age", "vip", "missing"])
    )
    members = [m async for page in pages for m in page.members]
    assert [dict(m.attributes) for m in members] == [{"age": 45.0, "vip": True}]


async def test_upsert_replaces_properties(platform: Platform) -> None:
    user_id = f"u-{uuid.uuid4().hex[:8]}"
    await platform.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[user(user_id, plan="free")]))
    await platform.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[user(user_id, plan="pro")]))
    stored = await platform.segmentation.GetUser(pb.GetUserRequest(name=f"users/{user_id}"))
    assert dict(stored.properties) == {"plan": "pro"}


async def test_bad_users_are_refused_and_nothing_is_written(platform: Platform) -> None:
    good = f"ok-{uuid.uuid4().hex[:8]}"
    bad_tz = user(f"tz-{uuid.uuid4().hex[:8]}")
    bad_tz.timezone = "Mars/Olympus"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[user(good), user(""), bad_tz]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(raised.value)) == {"users[1].user_id", "users[2].timezone"}
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await platform.segmentation.GetUser(pb.GetUserRequest(name=f"users/{good}"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_segment_definitions_name_the_field(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.segmentation.CreateSegment(
            pb.CreateSegmentRequest(
                segment=pb.Segment(
                    display_name="broken",
                    filter=matching(
                        condition("", "EQUALS", "x"),
                        condition("age", "GREATER_THAN", ["a"]),
                        condition("country", "IN", "US"),
                        pb.PropertyCondition(property="x"),
                    ),
                )
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(raised.value)) == {
        "segment.filter.all_of[0].property.property",
        "segment.filter.all_of[1].property.value",
        "segment.filter.all_of[2].property.value",
        "segment.filter.all_of[3].property.operator",
    }


async def test_segments_page_through(platform: Platform) -> None:
    created = {(await create_segment(platform, condition("page", "EXISTS"))).name for _ in range(3)}
    seen: list[str] = []
    token = ""
    while True:
        page = await platform.segmentation.ListSegments(pb.ListSegmentsRequest(page_size=2, page_token=token))
        assert len(page.segments) <= 2
        seen.extend(s.name for s in page.segments)
        token = page.next_page_token
        if not token:
            break
    assert created <= set(seen)
    assert len(seen) == len(set(seen))


async def test_a_stream_holds_the_members_of_the_moment_it_started(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first two of an account's users are chosen ahead of the others; those are chosen after
    the audience changed, and still come as they were when the stream started."""
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "moment")
    clients = Clients.open(platform.addresses, key)
    people = [user(name, t="in") for name in ("ana", "ben", "cy", "dee")]
    await clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[*people, user("al", t="out")]))
    changed = asyncio.Event()
    write = AudienceSnapshot._write

    async def write_after_the_change(self: AudienceSnapshot, *args: Any, first: bool = False) -> None:
        if not first:
            await changed.wait()
        await write(self, *args, first=first)

    monkeypatch.setattr(audience_snapshots, "FIRST_MEMBERS", 2)
    monkeypatch.setattr(AudienceSnapshot, "_write", write_after_the_change)
    try:
        segment = await clients.segmentation.CreateSegment(
            pb.CreateSegmentRequest(
                segment=pb.Segment(display_name="in", filter=matching(condition("t", "EQUALS", "in")))
            )
        )
        pages = clients.segmentation.StreamAudience(
            pb.StreamAudienceRequest(audience=audience(segment.name), page_size=1)
        ).__aiter__()
        first = await pages.__anext__()
        assert [m.user_id for m in first.members] == ["ana"]  # al, the first user, is not in it
        # Since the stream started, bea joined the audience and cy left it.
        await clients.segmentation.UpsertUsers(
            pb.UpsertUsersRequest(users=[user("bea", t="in"), user("cy", t="out")])
        )
        changed.set()
        assert [m.user_id async for page in pages for m in page.members] == ["ben", "cy", "dee"]
    finally:
        await clients.close()
