"""Templates and the profile values they read are bounded: a template that would build a huge
value, take long, or load another template is refused when saved or previewed; a profile that
makes one render exceed a bound fails that delivery only; oversized profile values are refused
when they arrive."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import personalization
from tests.helpers import field_violations, user
from tests.test_sms_campaign import SmsAccount, _completed, _send, _sms_campaign, account, twilio

__all__ = ["account", "twilio"]

# Each replace multiplies the text tenfold: five of them would need 100,000 characters, the
# attack's fifty would need gigabytes.
MULTIPLYING = "{{ 'a'" + " | replace: 'a', 'aaaaaaaaaa'" * 50 + " }}"
# Each filter on its own is small; together they would run for minutes.
SLOW = (
    "{% for i in (1..100) %}{% for j in (1..100) %}"
    "{{ 'x' | append: 'y' | upcase | downcase | append: 'z' | upcase | downcase | append: 'w' | upcase }}"
    "{% endfor %}{% endfor %}"
)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (MULTIPLYING, "would make a value over 32,768 characters"),
        ("{% include 'other' %}", "unexpected tag 'include'"),
        ("{% render 'other' %}", "unexpected tag 'render'"),
    ],
)
async def test_a_template_that_cannot_stay_in_bounds_is_refused_on_save_and_on_preview(
    account: SmsAccount, body: str, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as saved:
        await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=_sms_campaign(account, body=body))
        )
    assert saved.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in field_violations(saved.value)["campaign.sms.body"]
    with pytest.raises(grpc.aio.AioRpcError) as previewed:
        await account.clients.campaigns.PreviewMessage(
            campaign_pb.PreviewMessageRequest(body=body, user_id=f"{account.tag}-00")
        )
    assert previewed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in field_violations(previewed.value)["body"]
    listed = await account.clients.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())
    assert not [c for c in listed.campaigns if c.sms.body == body]  # nothing was saved


def test_a_render_has_a_cpu_budget() -> None:
    with pytest.raises(personalization.PersonalizationError, match="takes longer than 50 ms"):
        personalization.render(SLOW, {})
    assert personalization.problem(SLOW) == "exceeds a rendering limit: rendering takes longer than 50 ms"


async def test_a_profile_that_pushes_a_render_past_a_bound_fails_that_delivery_only(
    account: SmsAccount,
) -> None:
    # The body is fine for everyone but two users: one whose code makes `join` build more than the
    # bound, one whose rendered text is longer than an SMS may be.
    huge = user(f"{account.tag}-02", cohort=account.tag, code="c" * 12_000)
    huge.phone = "+14155550002"
    long = user(f"{account.tag}-04", cohort=account.tag, code="c" * 534)
    long.phone = "+14155550004"
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[huge, long]))
    body = "Code: {{ profile.code | split: '' | join: '--' }}"
    name = await _send(account, _sms_campaign(account, body=body))
    stats = await _completed(account, name)
    assert (stats.sent, stats.failed) == (28, 2)
    reasons = {r.reason for r in stats.failure_reasons}
    assert "personalization failed: join would make a value over 32,768 characters" in reasons
    assert "the rendered message is 1,606 characters; at most 1,600" in reasons


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({"bio": "x" * 16_385}, "users[0].properties.bio"),
        ({"tags": ["t"] * 257}, "users[0].properties.tags"),
        ({"bad\x00key": "v"}, "users[0].properties.bad\\0key"),
        ({"note": "nul\x00inside"}, "users[0].properties.note"),
        ({f"k{i}": i for i in range(1001)}, "users[0].properties"),
    ],
)
async def test_oversized_or_unstorable_profile_values_are_refused_on_arrival(
    account: SmsAccount, properties: dict[str, Any], field: str
) -> None:
    member = user(f"{account.tag}-bounds", cohort=account.tag)
    member.properties.update(properties)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[member]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(refused.value)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await account.clients.segmentation.GetUser(pb.GetUserRequest(name=f"users/{account.tag}-bounds"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_profile_events_cannot_take_a_profile_past_a_thousand_properties(account: SmsAccount) -> None:
    member = f"{account.tag}-wide"
    await account.clients.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(users=[user(member, **{f"a{i}": i for i in range(900)})])
    )
    event = pb.Event(user_id=member, name="herald.profile", client_event_id=f"{member}-1")
    event.properties.update({f"b{i}": i for i in range(150)})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await account.clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=[event]))
    assert field_violations(refused.value)["events[0].properties"] == (
        "the profile would hold 1,050 properties; at most 1,000"
    )
    stored = await account.clients.segmentation.GetUser(pb.GetUserRequest(name=f"users/{member}"))
    assert len(stored.properties) == 900  # nothing written


async def test_concurrent_profile_events_cannot_share_out_the_thousand_property_limit(
    account: SmsAccount,
) -> None:
    """Two calls that each fit, but not together, arriving at once: one is refused, whichever
    comes second, and the profile never holds more than 1,000 properties."""
    member = f"{account.tag}-raced"
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[user(member, plan="free")]))

    def adding(prefix: str) -> pb.IngestEventsRequest:
        event = pb.Event(user_id=member, name="herald.profile", client_event_id=f"{member}-{prefix}")
        event.properties.update({f"{prefix}{i}": i for i in range(600)})
        return pb.IngestEventsRequest(events=[event])

    answers = await asyncio.gather(
        *(account.clients.segmentation.IngestEvents(adding(p)) for p in ("a", "b")), return_exceptions=True
    )
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused[0])["events[0].properties"] == (
        "the profile would hold 1,201 properties; at most 1,000"
    )
    stored = await account.clients.segmentation.GetUser(pb.GetUserRequest(name=f"users/{member}"))
    assert len(stored.properties) == 601
