"""No account sees another's data: every RPC of every service, called by a second account against
the first account's resources, reads nothing of it, changes nothing of it and refers to nothing of
it. Another account's resources answer NOT_FOUND, as if they did not exist."""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nats.js import JetStreamContext

import herald
from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.bus import REASON_HEADER, Subjects
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import (
    audience,
    condition,
    create_segment,
    create_segment_destination,
    create_segment_destination_for,
    last_message,
    matching,
    segment_export_campaign,
    user,
)


@dataclass
class World:
    """Account A (the platform's) with one of everything, and account B's clients."""

    a: Platform
    b: Clients
    b_account: str
    cohort: str
    segment: segmentation_pb.Segment
    destination: dispatch_pb.Destination
    campaign: campaign_pb.Campaign
    run: scheduler_pb.Run
    key: accounts_pb.CreateApiKeyResponse
    request_id: str
    b_segment: segmentation_pb.Segment
    b_destination: dispatch_pb.Destination
    custom_list: segmentation_pb.CustomList


Probe = Callable[[World], Awaitable[None]]
WALK: dict[str, Probe] = {}


def probe(service: Any, method: str) -> Callable[[Probe], Probe]:
    """Files a probe under the full name of the RPC it calls across accounts."""
    full_name = f"/{service.DESCRIPTOR.services_by_name[_SERVICES[service]].full_name}/{method}"

    def register(function: Probe) -> Probe:
        WALK[full_name] = function
        return function

    return register


_SERVICES = {
    accounts_pb: "AccountService",
    segmentation_pb: "SegmentationService",
    campaign_pb: "CampaignService",
    scheduler_pb: "SchedulerService",
    dispatch_pb: "DispatchService",
}


def every_rpc() -> set[str]:
    """Every method of every service in our protos, whichever module declares it."""
    found: set[str] = set()
    for module_info in pkgutil.walk_packages(herald.__path__, "herald."):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(module_info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            found.update(f"/{service.full_name}/{method.name}" for method in service.methods)
    return found


async def _refused(call: Awaitable[Any], code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()


# --- accounts ---------------------------------------------------------------------------------


@probe(accounts_pb, "CreateAccount")
async def _create_account(w: World) -> None:
    # Only the operator's bootstrap token creates accounts; an account's admin key cannot.
    request = accounts_pb.CreateAccountRequest(account=accounts_pb.Account(display_name="spawned"))
    await _refused(w.b.accounts.CreateAccount(request), grpc.StatusCode.PERMISSION_DENIED)


@probe(accounts_pb, "DeleteAccount")
async def _delete_account(w: World) -> None:
    request = accounts_pb.DeleteAccountRequest(name=w.a.account)
    await _refused(w.b.accounts.DeleteAccount(request), grpc.StatusCode.PERMISSION_DENIED)
    assert (await w.a.accounts.GetAccount(accounts_pb.GetAccountRequest())).name == w.a.account


@probe(accounts_pb, "ReplayDeadLetters")
async def _replay_dead_letters(w: World) -> None:
    # Dead letters are the installation's, of every account: only the operator replays them.
    request = accounts_pb.ReplayDeadLettersRequest()
    await _refused(w.b.accounts.ReplayDeadLetters(request), grpc.StatusCode.PERMISSION_DENIED)


@probe(accounts_pb, "GetAccount")
async def _get_account(w: World) -> None:
    assert (await w.b.accounts.GetAccount(accounts_pb.GetAccountRequest())).name == w.b_account


@probe(accounts_pb, "GetIdentitySecret")
async def _get_identity_secret(w: World) -> None:
    # Each account's key holders get their own account's secret, never another's.
    b_secret = await w.b.accounts.GetIdentitySecret(accounts_pb.GetIdentitySecretRequest())
    a_secret = await w.a.accounts.GetIdentitySecret(accounts_pb.GetIdentitySecretRequest())
    assert b_secret.identity_secret != a_secret.identity_secret


@probe(accounts_pb, "CreateApiKey")
async def _create_api_key(w: World) -> None:
    created = await w.b.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(
            api_key=accounts_pb.ApiKey(display_name="b reader", role=accounts_pb.Role.ROLE_VIEWER)
        )
    )
    assert created.api_key.name.startswith(f"{w.b_account}/apiKeys/")
    reader = Clients.open(w.a.addresses, created.key)
    try:
        await _refused(reader.segmentation.GetSegment(segmentation_pb.GetSegmentRequest(name=w.segment.name)))
    finally:
        await reader.close()


@probe(accounts_pb, "ListApiKeys")
async def _list_api_keys(w: World) -> None:
    listed = await w.b.accounts.ListApiKeys(accounts_pb.ListApiKeysRequest(page_size=1000))
    assert listed.api_keys
    assert all(k.name.startswith(f"{w.b_account}/") for k in listed.api_keys)


@probe(accounts_pb, "RevokeApiKey")
async def _revoke_api_key(w: World) -> None:
    await _refused(w.b.accounts.RevokeApiKey(accounts_pb.RevokeApiKeyRequest(name=w.key.api_key.name)))
    # A's key still opens A's account.
    keyed = Clients.open(w.a.addresses, w.key.key)
    try:
        assert (await keyed.accounts.GetAccount(accounts_pb.GetAccountRequest())).name == w.a.account
    finally:
        await keyed.close()


@probe(accounts_pb, "UpdateAccountSettings")
async def _update_account_settings(w: World) -> None:
    before = (await w.a.accounts.GetAccount(accounts_pb.GetAccountRequest())).settings
    settings = accounts_pb.AccountSettings(default_timezone="Asia/Tokyo", throttle_per_five_minutes=77)
    updated = await w.b.accounts.UpdateAccountSettings(
        accounts_pb.UpdateAccountSettingsRequest(settings=settings)
    )
    assert updated.name == w.b_account and updated.settings == settings
    # Only the caller's own account changed.
    assert (await w.a.accounts.GetAccount(accounts_pb.GetAccountRequest())).settings == before


# --- segmentation -----------------------------------------------------------------------------


@probe(segmentation_pb, "UpsertUsers")
async def _upsert_users(w: World) -> None:
    # The same user id in B is B's own user; A's profile is untouched.
    await w.b.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user("shared", owner="b", cohort=w.cohort)])
    )
    mine = await w.a.segmentation.GetUser(segmentation_pb.GetUserRequest(name="users/shared"))
    assert mine.properties["owner"] == "a"


@probe(segmentation_pb, "GetUser")
async def _get_user(w: World) -> None:
    await _refused(w.b.segmentation.GetUser(segmentation_pb.GetUserRequest(name="users/only-a")))
    theirs = await w.b.segmentation.GetUser(segmentation_pb.GetUserRequest(name="users/shared"))
    assert theirs.properties["owner"] == "b"


@probe(segmentation_pb, "CreateSegment")
async def _create_segment(w: World) -> None:
    created = await w.b.segmentation.CreateSegment(
        segmentation_pb.CreateSegmentRequest(segment=w.b_segment, request_id=w.request_id)
    )
    assert created.name != w.segment.name  # a request_id is the account's own
    # B's segment cannot refer to A's segment or A's list.
    for reference in (
        segmentation_pb.Condition(in_segment=w.segment.name),
        segmentation_pb.Condition(in_list=w.custom_list.name),
    ):
        segment = segmentation_pb.Segment(
            display_name="x", filter=segmentation_pb.SegmentFilter(all_of=[reference])
        )
        await _refused(w.b.segmentation.CreateSegment(segmentation_pb.CreateSegmentRequest(segment=segment)))


def _purchased() -> segmentation_pb.Audience:
    did = segmentation_pb.Condition(event=segmentation_pb.EventCondition(event_name="Purchased"))
    return segmentation_pb.Audience(filter=segmentation_pb.SegmentFilter(all_of=[did]))


@probe(segmentation_pb, "IngestEvents")
async def _ingest_events(w: World) -> None:
    # The same client event id in B is B's own event, about B's user.
    event = segmentation_pb.Event(user_id="shared", name="Purchased", client_event_id="order-1")
    sent = await w.b.segmentation.IngestEvents(segmentation_pb.IngestEventsRequest(events=[event]))
    assert (sent.accepted_count, sent.duplicate_count) == (1, 0)
    request = segmentation_pb.EstimateReachRequest(audience=_purchased())
    assert (await w.b.segmentation.EstimateReach(request)).user_count == 1
    assert (await w.a.segmentation.EstimateReach(request)).user_count == 1  # only-a, as before


async def _upload(clients: Clients, request_id: str, *rows: str) -> segmentation_pb.CustomList:
    async def messages() -> AsyncIterator[segmentation_pb.UploadListRequest]:
        yield segmentation_pb.UploadListRequest(
            list=segmentation_pb.CustomList(
                display_name="vips", identity_kind=segmentation_pb.IdentityKind.IDENTITY_KIND_USER_ID
            ),
            request_id=request_id,
            rows=list(rows),
        )

    return await clients.segmentation.UploadList(messages())


@probe(segmentation_pb, "UploadList")
async def _upload_list(w: World) -> None:
    theirs = await _upload(w.b, w.request_id, "only-a")
    assert theirs.name != w.custom_list.name
    assert (theirs.matched_count, theirs.unmatched_count) == (0, 1)  # A's user is not B's


@probe(segmentation_pb, "GetList")
async def _get_list(w: World) -> None:
    await _refused(w.b.segmentation.GetList(segmentation_pb.GetListRequest(name=w.custom_list.name)))


@probe(segmentation_pb, "ListLists")
async def _list_lists(w: World) -> None:
    listed = await w.b.segmentation.ListLists(segmentation_pb.ListListsRequest(page_size=1000))
    assert w.custom_list.name not in {item.name for item in listed.lists}


@probe(segmentation_pb, "DeleteList")
async def _delete_list(w: World) -> None:
    await _refused(w.b.segmentation.DeleteList(segmentation_pb.DeleteListRequest(name=w.custom_list.name)))
    await w.a.segmentation.GetList(segmentation_pb.GetListRequest(name=w.custom_list.name))


@probe(segmentation_pb, "GetSegment")
async def _get_segment(w: World) -> None:
    await _refused(w.b.segmentation.GetSegment(segmentation_pb.GetSegmentRequest(name=w.segment.name)))


@probe(segmentation_pb, "ListSegments")
async def _list_segments(w: World) -> None:
    listed = await w.b.segmentation.ListSegments(segmentation_pb.ListSegmentsRequest(page_size=1000))
    assert w.segment.name not in {s.name for s in listed.segments}
    assert w.b_segment.name in {s.name for s in listed.segments}


@probe(segmentation_pb, "DeleteSegment")
async def _delete_segment(w: World) -> None:
    await _refused(w.b.segmentation.DeleteSegment(segmentation_pb.DeleteSegmentRequest(name=w.segment.name)))
    await w.a.segmentation.GetSegment(segmentation_pb.GetSegmentRequest(name=w.segment.name))


@probe(segmentation_pb, "EstimateReach")
async def _estimate_reach(w: World) -> None:
    await _refused(
        w.b.segmentation.EstimateReach(
            segmentation_pb.EstimateReachRequest(audience=audience(w.segment.name))
        )
    )
    # B's segment with the same filter counts B's users only (A has two in the cohort).
    theirs = await w.b.segmentation.EstimateReach(
        segmentation_pb.EstimateReachRequest(audience=audience(w.b_segment.name))
    )
    assert theirs.user_count == 1


@probe(segmentation_pb, "StreamAudience")
async def _stream_audience(w: World) -> None:
    async def members(clients: Clients, segment: str) -> list[segmentation_pb.AudienceMember]:
        request = segmentation_pb.StreamAudienceRequest(audience=audience(segment), attribute_keys=["owner"])
        return [m async for page in clients.segmentation.StreamAudience(request) for m in page.members]

    await _refused(members(w.b, w.segment.name))
    theirs = await members(w.b, w.b_segment.name)
    assert [(m.user_id, m.attributes["owner"]) for m in theirs] == [("shared", "b")]


@probe(segmentation_pb, "MatchUsers")
async def _match_users(w: World) -> None:
    # B asks about A's users by id: only B's own profile of the shared id is there, A's alone is not.
    await _refused(
        w.b.segmentation.MatchUsers(
            segmentation_pb.MatchUsersRequest(audience=audience(w.segment.name), user_ids=["shared"])
        )
    )
    request = segmentation_pb.MatchUsersRequest(user_ids=["shared", "only-a"], attribute_keys=["owner"])
    theirs = (await w.b.segmentation.MatchUsers(request)).members
    assert [(m.user_id, m.attributes_json) for m in theirs] == [("shared", b'{"owner": "b"}')]


@probe(segmentation_pb, "DescribeEvent")
async def _describe_event(w: World) -> None:
    # Only A sends this event: B learns nothing of it, not even its properties' names.
    secret = segmentation_pb.Event(user_id="only-a", name="Only A Did This", client_event_id="secret-1")
    secret.properties.update({"secret_plan": "gold"})
    await w.a.segmentation.IngestEvents(segmentation_pb.IngestEventsRequest(events=[secret]))
    request = segmentation_pb.DescribeEventRequest(event_name="Only A Did This")
    assert dict((await w.a.segmentation.DescribeEvent(request)).property_types) == {
        "secret_plan": segmentation_pb.PROPERTY_TYPE_STRING
    }
    theirs = await w.b.segmentation.DescribeEvent(request)
    assert not theirs.seen and not theirs.property_types


@probe(segmentation_pb, "MergeVisitor")
async def _merge_visitor(w: World) -> None:
    # A's anonymous visitor with the same id as one of B's: B's merge moves only B's visitor.
    for clients, owner in ((w.a, "a"), (w.b, "b")):
        event = segmentation_pb.Event(
            user_id="anon:same", name="Page Viewed", client_event_id=f"visit-{owner}"
        )
        event.properties.update({"owner": owner})
        await clients.segmentation.IngestEvents(segmentation_pb.IngestEventsRequest(events=[event]))
    merge = segmentation_pb.MergeVisitorRequest(anonymous_id="anon:same", user_id="signed-in")
    assert (await w.b.segmentation.MergeVisitor(merge)).moved_event_count == 1
    viewed = segmentation_pb.Condition(event=segmentation_pb.EventCondition(event_name="Page Viewed"))
    request = segmentation_pb.MatchUsersRequest(
        user_ids=["anon:same", "signed-in"],
        audience=segmentation_pb.Audience(filter=segmentation_pb.SegmentFilter(all_of=[viewed])),
    )
    assert [m.user_id for m in (await w.a.segmentation.MatchUsers(request)).members] == ["anon:same"]
    assert [m.user_id for m in (await w.b.segmentation.MatchUsers(request)).members] == ["signed-in"]


@probe(scheduler_pb, "ListQualifications")
async def _list_qualifications(w: World) -> None:
    request = scheduler_pb.ListQualificationsRequest(campaign=w.campaign.name, user_id="only-a")
    await _refused(w.b.scheduler.ListQualifications(request))


# --- campaigns --------------------------------------------------------------------------------


def _b_campaign(w: World, **overrides: Any) -> campaign_pb.Campaign:
    return segment_export_campaign(w.b_segment.name, w.b_destination.name, **overrides)


@probe(campaign_pb, "CreateCampaign")
async def _create_campaign(w: World) -> None:
    # A campaign of B cannot point at A's segment or A's destination.
    for campaign in (
        segment_export_campaign(w.segment.name, w.b_destination.name),
        segment_export_campaign(w.b_segment.name, w.destination.name),
    ):
        await _refused(w.b.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign)))
    # Nor have A's list as its audience, nor an ad-hoc audience built on A's segment.
    on_list = _b_campaign(w)
    on_list.audience.list = w.custom_list.name
    ad_hoc = _b_campaign(w)
    ad_hoc.audience.filter.all_of.add(in_segment=w.segment.name)
    for campaign in (on_list, ad_hoc):
        await _refused(w.b.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign)))
    created = await w.b.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=_b_campaign(w), request_id=w.request_id)
    )
    assert created.name != w.campaign.name


@probe(campaign_pb, "GetCampaign")
async def _get_campaign(w: World) -> None:
    await _refused(w.b.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=w.campaign.name)))


@probe(campaign_pb, "ListCampaigns")
async def _list_campaigns(w: World) -> None:
    listed = await w.b.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest(page_size=1000))
    assert w.campaign.name not in {c.name for c in listed.campaigns}
    by_segment = await w.b.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest(segment=w.segment.name))
    assert list(by_segment.campaigns) == []


@probe(campaign_pb, "UpdateCampaign")
async def _update_campaign(w: World) -> None:
    mask = field_mask_pb2.FieldMask(paths=["display_name"])
    taken = campaign_pb.Campaign(name=w.campaign.name, display_name="taken over")
    await _refused(
        w.b.campaigns.UpdateCampaign(campaign_pb.UpdateCampaignRequest(campaign=taken, update_mask=mask))
    )
    # B's own draft cannot be pointed at A's segment either.
    own = await w.b.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=_b_campaign(w)))
    pointed = campaign_pb.Campaign(name=own.name, audience=campaign_pb.Audience(segment=w.segment.name))
    await _refused(
        w.b.campaigns.UpdateCampaign(
            campaign_pb.UpdateCampaignRequest(
                campaign=pointed, update_mask=field_mask_pb2.FieldMask(paths=["audience"])
            )
        )
    )
    got = await w.a.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=w.campaign.name))
    assert got.display_name == w.campaign.display_name


@probe(campaign_pb, "DeleteCampaign")
async def _delete_campaign(w: World) -> None:
    await _refused(w.b.campaigns.DeleteCampaign(campaign_pb.DeleteCampaignRequest(name=w.campaign.name)))


@probe(campaign_pb, "PublishCampaign")
async def _publish_campaign(w: World) -> None:
    await _refused(w.b.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=w.campaign.name)))


@probe(campaign_pb, "StopCampaign")
async def _stop_campaign(w: World) -> None:
    await _refused(w.b.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=w.campaign.name)))


@probe(campaign_pb, "ExplainDelivery")
async def _explain_delivery(w: World) -> None:
    request = campaign_pb.ExplainDeliveryRequest(campaign=w.campaign.name, user_id="only-a")
    await _refused(w.b.campaigns.ExplainDelivery(request))
    mine = await w.a.campaigns.ExplainDelivery(request)
    assert [d.decision for d in mine.decisions] == [campaign_pb.DECISION_SENT]


@probe(campaign_pb, "PreviewMessage")
async def _preview_message(w: World) -> None:
    # A's user is not B's to render a message for.
    request = campaign_pb.PreviewMessageRequest(body="Hi {{ profile.cohort }}", user_id="only-a")
    await _refused(w.b.campaigns.PreviewMessage(request))
    mine = await w.a.campaigns.PreviewMessage(request)
    assert mine.text == f"Hi {w.cohort}"


@probe(dispatch_pb, "TestDestination")
async def _test_destination(w: World) -> None:
    await _refused(w.b.dispatch.TestDestination(dispatch_pb.TestDestinationRequest(name=w.destination.name)))


@probe(campaign_pb, "SendTestMessage")
async def _send_test_message(w: World) -> None:
    request = campaign_pb.SendTestMessageRequest(campaign=w.campaign.name, phone_numbers=["+14155550100"])
    await _refused(w.b.campaigns.SendTestMessage(request))


@probe(dispatch_pb, "SendTestMessages")
async def _send_test_messages(w: World) -> None:
    request = dispatch_pb.SendTestMessagesRequest(
        destination=w.destination.name, messages=[dispatch_pb.TestMessage(phone="+14155550100", text="hi")]
    )
    await _refused(w.b.dispatch.SendTestMessages(request))


@probe(dispatch_pb, "HaltCampaignDeliveries")
async def _halt_campaign_deliveries(w: World) -> None:
    # Only Herald's services halt deliveries (StopCampaign does); no account key may, its own
    # campaigns included.
    request = dispatch_pb.HaltCampaignDeliveriesRequest(campaign=w.campaign.name)
    await _refused(w.b.dispatch.HaltCampaignDeliveries(request), grpc.StatusCode.PERMISSION_DENIED)
    await _refused(w.a.dispatch.HaltCampaignDeliveries(request), grpc.StatusCode.PERMISSION_DENIED)


@probe(dispatch_pb, "ListDeliveries")
async def _list_deliveries(w: World) -> None:
    request = dispatch_pb.ListDeliveriesRequest(campaign=w.campaign.name, user_id="only-a")
    assert list((await w.b.dispatch.ListDeliveries(request)).deliveries) == []
    assert [d.status for d in (await w.a.dispatch.ListDeliveries(request)).deliveries] == ["sent"]


@probe(campaign_pb, "GetCampaignStats")
async def _get_campaign_stats(w: World) -> None:
    request = campaign_pb.GetCampaignStatsRequest(name=f"{w.campaign.name}/stats")
    await _refused(w.b.campaigns.GetCampaignStats(request))


@probe(campaign_pb, "WatchCampaignStats")
async def _watch_campaign_stats(w: World) -> None:
    async def watched() -> list[campaign_pb.CampaignStats]:
        request = campaign_pb.WatchCampaignStatsRequest(name=f"{w.campaign.name}/stats")
        return [stats async for stats in w.b.campaigns.WatchCampaignStats(request)]

    await _refused(watched())
    run_stats = campaign_pb.GetCampaignStatsRequest(name=f"{w.run.name}/stats")
    await _refused(w.b.campaigns.GetCampaignStats(run_stats))


@probe(campaign_pb, "ExportRunResults")
async def _export_run_results(w: World) -> None:
    async def exported() -> list[campaign_pb.RunResult]:
        request = campaign_pb.ExportRunResultsRequest(run=w.run.name)
        return [result async for result in w.b.campaigns.ExportRunResults(request)]

    await _refused(exported())


# --- scheduler --------------------------------------------------------------------------------


@probe(scheduler_pb, "GetRun")
async def _get_run(w: World) -> None:
    await _refused(w.b.scheduler.GetRun(scheduler_pb.GetRunRequest(name=w.run.name)))


@probe(scheduler_pb, "WatchRun")
async def _watch_run(w: World) -> None:
    async def watched() -> list[scheduler_pb.Run]:
        return [run async for run in w.b.scheduler.WatchRun(scheduler_pb.WatchRunRequest(name=w.run.name))]

    await _refused(watched())


@probe(scheduler_pb, "ListRuns")
async def _list_runs(w: World) -> None:
    listed = await w.b.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=w.campaign.name))
    assert list(listed.runs) == []


# --- dispatch ---------------------------------------------------------------------------------


@probe(dispatch_pb, "CreateDestination")
async def _create_destination(w: World) -> None:
    request = dispatch_pb.CreateDestinationRequest(destination=w.b_destination, request_id=w.request_id)
    created = await w.b.dispatch.CreateDestination(request)
    assert created.name != w.destination.name


@probe(dispatch_pb, "GetDestination")
async def _get_destination(w: World) -> None:
    request = dispatch_pb.GetDestinationRequest(name=w.destination.name)
    await _refused(w.b.dispatch.GetDestination(request))


@probe(dispatch_pb, "ListDestinations")
async def _list_destinations(w: World) -> None:
    listed = await w.b.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest(page_size=1000))
    assert w.destination.name not in {d.name for d in listed.destinations}
    assert w.b_destination.name in {d.name for d in listed.destinations}


@probe(dispatch_pb, "UpdateDestination")
async def _update_destination(w: World) -> None:
    changed = dispatch_pb.Destination(name=w.destination.name, display_name="taken over")
    request = dispatch_pb.UpdateDestinationRequest(
        destination=changed, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
    )
    await _refused(w.b.dispatch.UpdateDestination(request))
    kept = await w.a.dispatch.GetDestination(dispatch_pb.GetDestinationRequest(name=w.destination.name))
    assert kept.display_name != "taken over"


@probe(dispatch_pb, "DeleteDestination")
async def _delete_destination(w: World) -> None:
    request = dispatch_pb.DeleteDestinationRequest(name=w.destination.name)
    await _refused(w.b.dispatch.DeleteDestination(request))
    await w.a.dispatch.GetDestination(dispatch_pb.GetDestinationRequest(name=w.destination.name))


# --- the walk ---------------------------------------------------------------------------------


def test_the_walk_covers_every_rpc_of_every_service() -> None:
    missing = every_rpc() - set(WALK)
    assert not missing, f"RPCs without a cross-account probe in the isolation walk: {sorted(missing)}"
    assert len(every_rpc()) >= 27


@pytest.fixture
async def other(platform: Platform) -> AsyncIterator[tuple[str, Clients]]:
    """A second account, made through the public API, and clients with its admin key."""
    account, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, "other"
    )
    clients = Clients.open(platform.addresses, key)
    yield account, clients
    await clients.close()


async def _world(platform: Platform, other: tuple[str, Clients], segment_api: SegmentApi) -> World:
    cohort = uuid.uuid4().hex
    write_key = next(iter(segment_api.write_keys))
    request_id = f"shared-{uuid.uuid4().hex}"
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(
            users=[user("shared", owner="a", cohort=cohort), user("only-a", owner="a", cohort=cohort)]
        )
    )
    segment = await platform.segmentation.CreateSegment(
        segmentation_pb.CreateSegmentRequest(
            segment=segmentation_pb.Segment(
                display_name="a cohort",
                filter=matching(condition("cohort", "EQUALS", cohort)),
            ),
            request_id=request_id,
        )
    )
    destination = await platform.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="a source",
                segment=dispatch_pb.SegmentConfig(write_key=write_key, endpoint_url=segment_api.url),
            ),
            request_id=request_id,
        )
    )
    campaign = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=segment_export_campaign(segment.name, destination.name), request_id=request_id
        )
    )
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=campaign.name))

    async def finished_run() -> scheduler_pb.Run | None:
        runs = await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=campaign.name))
        done = [r for r in runs.runs if r.state == scheduler_pb.RunState.RUN_STATE_DISPATCHED]
        return done[0] if done else None

    await eventually(finished_run)

    async def completed() -> bool:
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=campaign.name))
        return got.state == campaign_pb.State.STATE_COMPLETED

    await eventually(completed)  # every delivery has its result
    run = await finished_run()
    assert run is not None and run.targeted == 2
    key = await platform.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(
            api_key=accounts_pb.ApiKey(display_name="a editor", role=accounts_pb.Role.ROLE_EDITOR)
        )
    )
    await platform.segmentation.IngestEvents(
        segmentation_pb.IngestEventsRequest(
            events=[segmentation_pb.Event(user_id="only-a", name="Purchased", client_event_id="order-1")]
        )
    )
    custom_list = await _upload(platform.clients, request_id, "only-a", "shared")
    assert custom_list.matched_count == 2
    b_account, b = other
    b_segment = await create_segment(b, condition("cohort", "EQUALS", cohort))
    b_destination = await create_segment_destination(b, segment_api.url, write_key)
    return World(
        platform,
        b,
        b_account,
        cohort,
        segment,
        destination,
        campaign,
        run,
        key,
        request_id,
        b_segment,
        b_destination,
        custom_list,
    )


async def test_no_rpc_reaches_another_accounts_data(
    platform: Platform, other: tuple[str, Clients], segment_api: SegmentApi
) -> None:
    world = await _world(platform, other, segment_api)
    for name, check in WALK.items():
        try:
            await check(world)
        except BaseException as error:
            raise AssertionError(f"{name}: {error}") from error
    # After the walk A still has everything, and its campaign delivered to its own users only.
    got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=world.campaign.name))
    assert got.display_name == world.campaign.display_name
    assert sorted(e["userId"] for e in segment_api.events.values()) == ["only-a", "shared"]
    assert {e["properties"].get("coupon") for e in segment_api.events.values()} == {"VIP20"}


async def test_reports_naming_another_account_are_set_aside(
    platform: Platform, other: tuple[str, Clients], segment_api: SegmentApi, js: JetStreamContext
) -> None:
    """The campaign service counts a run report or delivery outcome only for the account that owns
    the campaign: one naming another account is dead-lettered with the reason."""
    segment = await create_segment(platform, condition("cohort", "EQUALS", uuid.uuid4().hex))
    destination = await create_segment_destination_for(platform, segment_api)
    campaign = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    b_account, _ = other
    subjects = Subjects(platform.settings.namespace)
    outcomes = events.DeliveryOutcomes(
        event_id=str(uuid.uuid4()),
        campaign=campaign.name,
        run=f"{campaign.name}/runs/{uuid.uuid4()}",
        destination=destination.name,
        account=b_account,
        results=[events.DeliveryResult(delivery_id="d1", user_id="u1", status=events.DELIVERY_STATUS_SENT)],
    )
    payload = outcomes.SerializeToString()
    await js.publish(subjects.delivery_outcomes, payload)

    async def dead_lettered() -> dict[str, str] | None:
        last = await last_message(
            js, subjects.stream("deadletter"), subjects.dead_letter("campaign-outcomes")
        )
        return dict(last.headers or {}) if last is not None and last.data == payload else None

    await eventually(dead_lettered)
    headers = await dead_lettered()
    assert headers is not None and headers[REASON_HEADER] == f"{b_account} does not own {campaign.name}"
    stats = await platform.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{campaign.name}/stats")
    )
    assert stats.sent == 0
