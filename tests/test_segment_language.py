"""Every kind of condition of the segment language selects exactly the users it describes, and
EstimateReach counts exactly the users StreamAudience streams."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2
from nats.js import JetStreamContext

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.events.v1 import events_pb2
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common.bus import Subjects
from tests.conftest import Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import condition, field_violations, last_message, user, value

NOW = datetime.now(UTC)


def _ago(days: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(NOW - timedelta(days=days))
    return stamp


def _people() -> list[pb.User]:
    ana = user("ana", plan="gold", score=80, signup="2026-01-10T00:00:00Z", tags=["a", "b"], vip=True)
    ana.email, ana.phone, ana.gender, ana.date_of_birth = (
        "ana@x.io",
        "+14155550101",
        pb.GENDER_FEMALE,
        "1990-06-15",
    )
    ana.location.CopyFrom(pb.Location(country="US", region="California", city="San Francisco"))
    ana.location.latitude, ana.location.longitude = 37.7749, -122.4194
    ana.devices.append(
        pb.Device(
            device_id="a1",
            platform=pb.PLATFORM_ANDROID,
            app_version="5.2.0",
            make="Samsung",
            push_token="t-a",
            push_token_type=pb.PUSH_TOKEN_TYPE_GCM,
        )
    )
    signup = (NOW - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ben = user("ben", plan="free", score=20, signup=signup)
    ben.email, ben.gender, ben.date_of_birth = "ben@x.io", pb.GENDER_MALE, f"{NOW.year - 16}-01-01"
    ben.location.CopyFrom(pb.Location(country="US", region="New York", city="New York"))
    ben.location.latitude, ben.location.longitude = 40.7128, -74.0060
    ben.devices.append(pb.Device(device_id="b1", platform=pb.PLATFORM_WEB))
    cy = user("cy", plan="gold", score=55)
    cy.phone, cy.gender, cy.date_of_birth = "+919800000000", pb.GENDER_FEMALE, "1980-03-03"
    cy.subscriptions.sms_unsubscribed = True
    cy.location.CopyFrom(pb.Location(country="IN", region="Maharashtra", city="Mumbai"))
    cy.location.latitude, cy.location.longitude = 19.0760, 72.8777
    cy.devices.append(
        pb.Device(
            device_id="c1",
            platform=pb.PLATFORM_IOS,
            push_token="t-c",
            push_token_type=pb.PUSH_TOKEN_TYPE_APNS,
        )
    )
    dee = user("dee")
    dee.email = "dee@x.io"
    dee.subscriptions.email_unsubscribed = True
    dee.location.CopyFrom(pb.Location(country="DE", city="Berlin"))
    dee.devices.extend([pb.Device(device_id="d1", platform=pb.PLATFORM_WEB), pb.Device(device_id="d2")])
    return [ana, ben, cy, dee]


def _event(user_id: str, name: str, days_ago: float, n: int, **properties: Any) -> pb.Event:
    event = pb.Event(user_id=user_id, name=name, time=_ago(days_ago), client_event_id=f"{user_id}-{n}")
    event.properties.update(properties)
    return event


EVENTS = [
    _event("ana", "Viewed Product", 2, 1, product_id="p1"),
    _event("ana", "Added To Cart", 1, 2, product_id="p1"),
    _event("ana", "Purchased", 3, 3, amount=30),
    _event("ana", "Purchased", 10, 4, amount=50),
    _event("ana", "Purchased", 20, 5, amount=70),
    _event("ben", "Viewed Product", 1, 1, product_id="p2"),
    _event("ben", "Added To Cart", 1, 2, product_id="p3"),
    _event("ben", "Purchased", 40, 3, amount=10),
    _event("cy", "Added To Cart", 2, 1, product_id="p4"),
    _event("dee", "App Launched", 100, 1),
]


@pytest.fixture(scope="module")
async def acct(platform: Platform) -> AsyncIterator[Clients]:
    """An account of its own holding only the four users above, so counts are exact."""
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "language")
    clients = Clients.open(platform.addresses, key)
    await clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=_people()))
    sent = await clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=EVENTS))
    assert sent.accepted_count == len(EVENTS)
    yield clients
    await clients.close()


async def _selected(
    clients: Clients, audience: pb.Audience, channel: pb.Channel.ValueType = pb.CHANNEL_UNSPECIFIED
) -> list[str]:
    """The streamed members, after checking EstimateReach counted exactly as many."""
    request = pb.StreamAudienceRequest(audience=audience, channel=channel, page_size=2)
    streamed = [
        m.user_id async for page in clients.segmentation.StreamAudience(request) for m in page.members
    ]
    reach = await clients.segmentation.EstimateReach(
        pb.EstimateReachRequest(audience=audience, channel=channel)
    )
    assert reach.reachable_count == len(streamed), "EstimateReach and StreamAudience disagree"
    return streamed


def _all(*conditions: pb.Condition) -> pb.Audience:
    return pb.Audience(filter=pb.SegmentFilter(all_of=list(conditions)))


def prop(name: str, op: str, v: Any = None) -> pb.Condition:
    return pb.Condition(property=condition(name, op, v))


def profile(field: str, op: str, v: Any = None) -> pb.Condition:
    c = pb.ProfileCondition(
        field=pb.ProfileField.Value(f"PROFILE_FIELD_{field}"), operator=pb.Operator.Value(f"OPERATOR_{op}")
    )
    if v is not None:
        c.value.CopyFrom(value(v))
    return pb.Condition(profile=c)


def app(field: str, op: str, v: Any = None) -> pb.Condition:
    c = pb.AppFieldCondition(
        field=pb.AppField.Value(f"APP_FIELD_{field}"), operator=pb.Operator.Value(f"OPERATOR_{op}")
    )
    if v is not None:
        c.value.CopyFrom(value(v))
    return pb.Condition(app=c)


def reach(what: str, is_true: bool = True) -> pb.Condition:
    return pb.Condition(
        reachability=pb.ReachabilityCondition(
            reachability=pb.Reachability.Value(f"REACHABILITY_{what}"), is_true=is_true
        )
    )


def circle(lat: float, lon: float, km: float) -> pb.GeoCircle:
    return pb.GeoCircle(latitude=lat, longitude=lon, radius_km=km)


def did(
    name: str,
    *,
    last_days: int = 0,
    count: tuple[str, int] | None = None,
    where: list[pb.PropertyCondition] | None = None,
    did_not: bool = False,
    occurrence: str = "",
    window: pb.TimeWindow | None = None,
) -> pb.EventCondition:
    event = pb.EventCondition(event_name=name, did_not=did_not, where=where or [])
    if last_days:
        event.window.last_days = last_days
    if window is not None:
        event.window.CopyFrom(window)
    if count is not None:
        event.count.CopyFrom(
            pb.CountCondition(operator=pb.Operator.Value(f"OPERATOR_{count[0]}"), value=count[1])
        )
    if occurrence:
        event.occurrence = pb.Occurrence.Value(f"OCCURRENCE_{occurrence}")
    return event


def ev(*args: Any, **kwargs: Any) -> pb.Condition:
    return pb.Condition(event=did(*args, **kwargs))


CASES: list[tuple[str, pb.Audience, list[str]]] = [
    ("property equals", _all(prop("plan", "EQUALS", "gold")), ["ana", "cy"]),
    ("property not equals (missing counts)", _all(prop("plan", "NOT_EQUALS", "gold")), ["ben", "dee"]),
    ("number greater than", _all(prop("score", "GREATER_THAN", 50)), ["ana", "cy"]),
    ("number between", _all(prop("score", "BETWEEN", [20, 55])), ["ben", "cy"]),
    ("number in", _all(prop("score", "IN", [20, 80])), ["ana", "ben"]),
    ("starts with", _all(prop("plan", "STARTS_WITH", "GO")), ["ana", "cy"]),
    ("date after", _all(prop("signup", "AFTER", "2026-01-01T00:00:00Z")), ["ana", "ben"]),
    ("date before", _all(prop("signup", "BEFORE", "2026-02-01T00:00:00Z")), ["ana"]),
    ("date within the last days", _all(prop("signup", "WITHIN_LAST_DAYS", 7)), ["ben"]),
    ("list contains", _all(prop("tags", "CONTAINS", "b")), ["ana"]),
    ("boolean", _all(prop("vip", "EQUALS", True)), ["ana"]),
    ("exists", _all(prop("score", "EXISTS")), ["ana", "ben", "cy"]),
    ("gender", _all(profile("GENDER", "EQUALS", "GENDER_FEMALE")), ["ana", "cy"]),
    ("age between", _all(profile("AGE", "BETWEEN", [30, 40])), ["ana"]),
    ("age under", _all(profile("AGE", "LESS_THAN", 18)), ["ben"]),
    ("age + city", _all(profile("AGE", "GREATER_THAN", 18), profile("CITY", "EQUALS", "Mumbai")), ["cy"]),
    ("country in", _all(profile("COUNTRY", "IN", ["US"])), ["ana", "ben"]),
    ("region", _all(profile("REGION", "EQUALS", "Maharashtra")), ["cy"]),
    ("email domain", _all(profile("EMAIL", "CONTAINS", "@x.io")), ["ana", "ben", "dee"]),
    (
        "radius",
        pb.Audience(
            filter=pb.SegmentFilter(
                all_of=[pb.Condition(radius=pb.RadiusCondition(circles=[circle(37.8, -122.4, 50)]))]
            )
        ),
        ["ana"],
    ),
    (
        "radius, two places",
        _all(
            pb.Condition(
                radius=pb.RadiusCondition(circles=[circle(37.8, -122.4, 50), circle(19.1, 72.9, 10)])
            )
        ),
        ["ana", "cy"],
    ),
    ("has phone", _all(reach("HAS_PHONE")), ["ana", "cy"]),
    ("sms unsubscribed", _all(reach("SMS_UNSUBSCRIBED")), ["cy"]),
    ("no email", _all(reach("HAS_EMAIL", is_true=False)), ["cy"]),
    ("email unsubscribed", _all(reach("EMAIL_UNSUBSCRIBED")), ["dee"]),
    ("web device", _all(app("PLATFORM", "EQUALS", "PLATFORM_WEB")), ["ben", "dee"]),
    ("app version", _all(app("APP_VERSION", "STARTS_WITH", "5.")), ["ana"]),
    ("push token type", _all(app("PUSH_TOKEN_TYPE", "EQUALS", "PUSH_TOKEN_TYPE_APNS")), ["cy"]),
    ("device make", _all(app("DEVICE_MAKE", "EQUALS", "Samsung")), ["ana"]),
    ("did an event ever", _all(ev("Purchased")), ["ana", "ben"]),
    (
        "did an event 3 times in 30 days",
        _all(ev("Purchased", last_days=30, count=("GREATER_THAN_OR_EQUAL", 3))),
        ["ana"],
    ),
    (
        "did with a property filter, counted",
        _all(
            ev(
                "Purchased",
                last_days=30,
                count=("GREATER_THAN_OR_EQUAL", 2),
                where=[condition("amount", "GREATER_THAN", 40)],
            )
        ),
        ["ana"],
    ),
    ("did not in 30 days", _all(ev("Purchased", last_days=30, did_not=True)), ["ben", "cy", "dee"]),
    (
        "at most once in 30 days",
        _all(ev("Purchased", last_days=30, count=("LESS_THAN_OR_EQUAL", 1))),
        ["ben", "cy", "dee"],
    ),
    ("exactly zero times", _all(ev("Purchased", count=("EQUALS", 0))), ["cy", "dee"]),
    ("exactly once ever", _all(ev("Purchased", count=("EQUALS", 1))), ["ben"]),
    ("any event in 7 days", _all(ev("", last_days=7)), ["ana", "ben", "cy"]),
    (
        "did A and not B in 7 days",
        _all(ev("Added To Cart", last_days=7), ev("Purchased", last_days=7, did_not=True)),
        ["ben", "cy"],
    ),
    ("first time in 30 days", _all(ev("Purchased", last_days=30, occurrence="FIRST_TIME")), ["ana"]),
    (
        "last time between 60 and 30 days ago",
        _all(
            ev(
                "Purchased",
                occurrence="LAST_TIME",
                window=pb.TimeWindow(between=pb.TimeRange(start_time=_ago(60), end_time=_ago(30))),
            )
        ),
        ["ben"],
    ),
    ("since a date", _all(ev("App Launched", window=pb.TimeWindow(since=_ago(200)))), ["dee"]),
    (
        "constant property across two events",
        _all(
            pb.Condition(
                constant_property=pb.ConstantPropertyCondition(
                    property="product_id",
                    events=[did("Viewed Product", last_days=30), did("Added To Cart", last_days=30)],
                )
            )
        ),
        ["ana"],
    ),
    (
        "any of",
        pb.Audience(
            filter=pb.SegmentFilter(
                any_of=[profile("CITY", "EQUALS", "Mumbai"), profile("CITY", "EQUALS", "Berlin")]
            )
        ),
        ["cy", "dee"],
    ),
    (
        "none of",
        pb.Audience(filter=pb.SegmentFilter(none_of=[prop("plan", "EQUALS", "gold")])),
        ["ben", "dee"],
    ),
    (
        "nested groups",
        _all(
            profile("COUNTRY", "EQUALS", "US"),
            pb.Condition(
                group=pb.SegmentFilter(
                    any_of=[prop("vip", "EQUALS", True), reach("HAS_PHONE", is_true=False)]
                )
            ),
        ),
        ["ana", "ben"],
    ),
]


@pytest.mark.parametrize(("audience", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_each_condition_selects_exactly_its_users(
    acct: Clients, audience: pb.Audience, expected: list[str]
) -> None:
    assert await _selected(acct, audience) == expected


async def test_channels_count_only_reachable_users(acct: Clients) -> None:
    everyone = _all(prop("zzz", "NOT_EXISTS"))
    estimate = await acct.segmentation.EstimateReach(
        pb.EstimateReachRequest(audience=everyone, channel=pb.CHANNEL_SMS)
    )
    assert (estimate.user_count, estimate.reachable_count) == (4, 1)
    assert await _selected(acct, everyone, pb.CHANNEL_SMS) == ["ana"]  # cy unsubscribed, ben has no phone
    assert await _selected(acct, everyone, pb.CHANNEL_WEB_POPUP) == ["ben", "dee"]
    assert await _selected(acct, everyone, pb.CHANNEL_SEGMENT) == ["ana", "ben", "cy", "dee"]


async def test_a_stream_can_include_whom_it_leaves_out_flagged(acct: Clients) -> None:
    """What a campaign records as "not reachable" or "left out by the random cap"."""
    everyone = _all(prop("zzz", "NOT_EXISTS"))

    async def flags(**fields: object) -> dict[str, tuple[bool, bool]]:
        request = pb.StreamAudienceRequest(audience=everyone, include_left_out=True, page_size=2, **fields)  # type: ignore[arg-type]
        return {
            m.user_id: (m.unreachable, m.outside_sample)
            async for page in acct.segmentation.StreamAudience(request)
            for m in page.members
        }

    # SMS reaches only ana: the others come flagged, none dropped.
    assert await flags(channel=pb.CHANNEL_SMS) == {
        "ana": (False, False),
        "ben": (True, False),
        "cy": (True, False),
        "dee": (True, False),
    }
    # A sample of two draws from the reachable users; the other two come flagged.
    sampled = await flags(channel=pb.CHANNEL_SEGMENT, sample_size=2, sample_seed="seed-1")
    assert sorted(sampled.values()) == [(False, False), (False, False), (False, True), (False, True)]
    chosen = {u for u, (_, outside) in sampled.items() if not outside}
    plain = pb.StreamAudienceRequest(
        audience=everyone, channel=pb.CHANNEL_SEGMENT, sample_size=2, sample_seed="seed-1"
    )
    assert chosen == {
        m.user_id async for page in acct.segmentation.StreamAudience(plain) for m in page.members
    }


async def _upload(clients: Clients, kind: int, *chunks: list[str]) -> pb.CustomList:
    async def messages() -> AsyncIterator[pb.UploadListRequest]:
        yield pb.UploadListRequest(list=pb.CustomList(display_name="uploaded", identity_kind=kind))  # type: ignore[arg-type]
        for rows in chunks:
            yield pb.UploadListRequest(rows=rows)

    return await clients.segmentation.UploadList(messages())


async def test_a_custom_list_is_an_audience_and_a_condition(acct: Clients) -> None:
    uploaded = await _upload(
        acct, pb.IDENTITY_KIND_EMAIL, ["ana@x.io", "BEN@X.IO"], ["nobody@x.io", "not an email", ""]
    )
    assert (
        uploaded.row_count,
        uploaded.matched_count,
        uploaded.unmatched_count,
        uploaded.rejected_count,
    ) == (5, 2, 1, 2)
    assert [(r.line, r.reason) for r in uploaded.rejected_rows] == [
        (4, "not an email address"),
        (5, "empty row"),
    ]
    assert await _selected(acct, pb.Audience(list=uploaded.name)) == ["ana", "ben"]
    in_list = pb.Condition(in_list=uploaded.name)
    assert await _selected(acct, _all(in_list, profile("AGE", "GREATER_THAN", 18))) == ["ana"]
    phones = await _upload(acct, pb.IDENTITY_KIND_PHONE, ["+919800000000", "+14155550101", "12345"])
    assert (phones.matched_count, phones.rejected_count) == (2, 1)
    assert await _selected(acct, pb.Audience(list=phones.name), pb.CHANNEL_SMS) == ["ana"]
    got = await acct.segmentation.GetList(pb.GetListRequest(name=uploaded.name))
    assert got == uploaded


async def test_a_segment_can_use_another(acct: Clients) -> None:
    gold = await acct.segmentation.CreateSegment(
        pb.CreateSegmentRequest(
            segment=pb.Segment(
                display_name="gold", filter=pb.SegmentFilter(all_of=[prop("plan", "EQUALS", "gold")])
            )
        )
    )
    us_gold = await acct.segmentation.CreateSegment(
        pb.CreateSegmentRequest(
            segment=pb.Segment(
                display_name="US gold",
                filter=pb.SegmentFilter(
                    all_of=[pb.Condition(in_segment=gold.name), profile("COUNTRY", "EQUALS", "US")]
                ),
            )
        )
    )
    assert await _selected(acct, pb.Audience(segment=us_gold.name)) == ["ana"]
    with pytest.raises(grpc.aio.AioRpcError) as in_use:
        await acct.segmentation.DeleteSegment(pb.DeleteSegmentRequest(name=gold.name))
    assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION and us_gold.name in (
        in_use.value.details() or ""
    )


async def test_events_are_recorded_once_and_can_update_profiles(acct: Clients) -> None:
    again = await acct.segmentation.IngestEvents(pb.IngestEventsRequest(events=EVENTS[:3]))
    assert (again.accepted_count, again.duplicate_count) == (0, 3)
    assert await _selected(acct, _all(ev("Purchased", last_days=30, count=("GREATER_THAN_OR_EQUAL", 3)))) == [
        "ana"
    ]
    update = pb.Event(user_id="newcomer", name="herald.profile", client_event_id="newcomer-1")
    update.properties.update({"plan": "gold"})
    sent = await acct.segmentation.IngestEvents(pb.IngestEventsRequest(events=[update]))
    assert sent.accepted_count == 1
    stored = await acct.segmentation.GetUser(pb.GetUserRequest(name="users/newcomer"))
    assert dict(stored.properties) == {"plan": "gold"}
    assert await _selected(acct, _all(prop("plan", "EQUALS", "gold"), reach("HAS_EMAIL", is_true=False))) == [
        "cy",
        "newcomer",
    ]


async def test_events_with_large_properties_are_recorded_and_matched(platform: Platform) -> None:
    """Properties too large for an index entry (a long description, hundreds of keys) are kept
    whole, and conditions on them match as on any event."""
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "large")
    acct = Clients.open(platform.addresses, key)
    await acct.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[user("ana"), user("ben"), user("cy")]))
    big = pb.Event(user_id="ana", name="Ordered Large", client_event_id="large-1")
    big.properties.update({"product_id": "p-9", "description": "d" * 12_000, "amount": 700})
    wide = pb.Event(user_id="ben", name="Ordered Large", client_event_id="large-2")
    wide.properties.update({f"attribute_{i}": f"value {i}" for i in range(600)} | {"product_id": "p-9"})
    wide.properties.update({"amount": 20})
    viewed = [
        pb.Event(user_id=u, name="Viewed Large", client_event_id=f"large-view-{u}") for u in ("ana", "ben")
    ]
    for v in viewed:
        v.properties.update({"product_id": "p-9" if v.user_id == "ana" else "p-1"})
    sent = await acct.segmentation.IngestEvents(pb.IngestEventsRequest(events=[big, wide, *viewed]))
    assert sent.accepted_count == 4
    again = await acct.segmentation.IngestEvents(pb.IngestEventsRequest(events=[big, wide]))
    assert again.duplicate_count == 2
    ordered = "Ordered Large"
    assert await _selected(acct, _all(ev(ordered, where=[condition("amount", "GREATER_THAN", 500)]))) == [
        "ana"
    ]
    assert await _selected(
        acct, _all(ev(ordered, where=[condition("attribute_599", "EQUALS", "value 599")]))
    ) == ["ben"]
    assert await _selected(acct, _all(ev(ordered, where=[condition("product_id", "EQUALS", "p-9")]))) == [
        "ana",
        "ben",
    ]
    same_product = pb.ConstantPropertyCondition(
        property="product_id", events=[did("Viewed Large"), did(ordered)]
    )
    assert await _selected(acct, _all(pb.Condition(constant_property=same_product))) == ["ana"]
    await acct.close()


async def test_profiles_keep_their_system_fields_and_devices(acct: Clients) -> None:
    ana = await acct.segmentation.GetUser(pb.GetUserRequest(name="users/ana"))
    assert (ana.email, ana.phone, ana.gender, ana.date_of_birth) == (
        "ana@x.io",
        "+14155550101",
        pb.GENDER_FEMALE,
        "1990-06-15",
    )
    assert (ana.location.city, round(ana.location.latitude, 2)) == ("San Francisco", 37.77)
    assert [(d.device_id, d.push_token_type) for d in ana.devices] == [("a1", pb.PUSH_TOKEN_TYPE_GCM)]
    request = pb.StreamAudienceRequest(
        audience=_all(prop("vip", "EXISTS")), attribute_keys=["email", "city", "devices", "plan"]
    )
    [member] = [m async for page in acct.segmentation.StreamAudience(request) for m in page.members]
    attributes = member.attributes
    assert (attributes["email"], attributes["city"], attributes["plan"]) == (
        "ana@x.io",
        "San Francisco",
        "gold",
    )
    devices = json_format.MessageToDict(member)["attributes"]["devices"]
    assert devices[0]["push_token"] == "t-a"


async def _violations(call: Any) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    return field_violations(raised.value)


async def test_bad_filters_name_the_exact_path(acct: Clients) -> None:
    def estimate(*conditions: pb.Condition) -> Any:
        return acct.segmentation.EstimateReach(pb.EstimateReachRequest(audience=_all(*conditions)))

    assert "audience.filter.all_of[0].property.value" in await _violations(
        estimate(prop("plan", "GREATER_THAN", 5))
    )
    assert "audience.filter.all_of[0].property.operator" in await _violations(
        estimate(prop("score", "STARTS_WITH", "x"))
    )
    assert "audience.filter.all_of[1].event.count.value" in await _violations(
        estimate(prop("plan", "EXISTS"), ev("Purchased", count=("GREATER_THAN_OR_EQUAL", -1)))
    )
    backwards = pb.TimeWindow(between=pb.TimeRange(start_time=_ago(1), end_time=_ago(2)))
    assert "audience.filter.all_of[0].event.window.between.end_time" in await _violations(
        estimate(ev("Purchased", window=backwards))
    )
    assert set(
        await _violations(
            estimate(
                pb.Condition(
                    radius=pb.RadiusCondition(
                        circles=[circle(95, 0, 10), circle(0, 0, 0), circle(0, 0, 25_000)]
                    )
                )
            )
        )
    ) == {
        "audience.filter.all_of[0].radius.circles[0].latitude",
        "audience.filter.all_of[0].radius.circles[1].radius_km",
        "audience.filter.all_of[0].radius.circles[2].radius_km",
    }
    assert "audience.filter.all_of[0].profile.value" in await _violations(
        estimate(profile("GENDER", "EQUALS", "GENDER_ROBOT"))
    )
    deep = pb.SegmentFilter(all_of=[prop("plan", "EXISTS")])
    for _ in range(16):
        deep = pb.SegmentFilter(all_of=[pb.Condition(group=deep)])
    assert "audience.filter" in await _violations(
        acct.segmentation.EstimateReach(pb.EstimateReachRequest(audience=pb.Audience(filter=deep)))
    )
    wide = [prop("plan", "EXISTS") for _ in range(201)]
    assert "audience.filter" in await _violations(estimate(*wide))


async def test_bad_events_are_refused_and_nothing_is_written(acct: Clients) -> None:
    good = pb.Event(user_id="ana", name="Opened", client_event_id="bad-batch-1")
    nameless = pb.Event(user_id="ana", client_event_id="bad-batch-2")
    ahead = pb.Event(user_id="ana", name="Opened", client_event_id="bad-batch-3", time=_ago(-2))
    typed = pb.Event(user_id="ana", name="Purchased", client_event_id="bad-batch-4")
    typed.properties.update({"amount": "lots"})
    found = await _violations(
        acct.segmentation.IngestEvents(pb.IngestEventsRequest(events=[good, nameless, ahead, typed]))
    )
    assert set(found) == {"events[1].name", "events[2].time", "events[3].properties.amount"}
    assert await _selected(acct, _all(ev("Opened"))) == []
    too_many = [pb.Event(user_id="ana", name="x", client_event_id=f"many-{i}") for i in range(1001)]
    assert "events" in await _violations(
        acct.segmentation.IngestEvents(pb.IngestEventsRequest(events=too_many))
    )
    # Over 1 MB: refused before it is even decoded.
    heavy = pb.Event(user_id="ana", name="x", client_event_id="heavy")
    heavy.properties.update({"blob": "x" * 1_100_000})
    assert "request" in await _violations(
        acct.segmentation.IngestEvents(pb.IngestEventsRequest(events=[heavy]))
    )


async def test_recorded_events_are_announced_on_jetstream(
    platform: Platform, acct: Clients, js: JetStreamContext
) -> None:
    marker = f"announced-{uuid.uuid4().hex}"
    event = pb.Event(user_id="ben", name="Shared Link", client_event_id=marker)
    await acct.segmentation.IngestEvents(pb.IngestEventsRequest(events=[event]))
    subjects = Subjects(platform.settings.namespace)

    async def announced() -> events_pb2.EventsIngested | None:
        last = await last_message(js, subjects.stream("segmentation"), subjects.events_ingested)
        if last is None:
            return None
        message = events_pb2.EventsIngested.FromString(last.data or b"")
        return message if message.events and message.events[0].client_event_id == marker else None

    await eventually(announced)
    message = await announced()
    assert message is not None
    account = (await acct.accounts.GetAccount(accounts_pb.GetAccountRequest())).name
    assert message.account == account
    assert [(e.user_id, e.name) for e in message.events] == [("ben", "Shared Link")]
    assert message.events[0].HasField("time")  # set to when it was received
