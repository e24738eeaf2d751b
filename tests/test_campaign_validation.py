"""Bad campaign input is refused with a field violation and writes nothing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination_for,
    field_violations,
    segment_export_campaign,
)


async def _all_campaign_names(platform: Platform) -> set[str]:
    names: set[str] = set()
    token = ""
    while True:
        page = await platform.campaigns.ListCampaigns(
            campaign_pb.ListCampaignsRequest(page_size=100, page_token=token)
        )
        names.update(c.name for c in page.campaigns)
        token = page.next_page_token
        if not token:
            return names


@pytest.fixture
async def references(platform: Platform, segment_api: SegmentApi) -> tuple[str, str]:
    segment = await create_segment(platform, condition("tier", "EQUALS", "gold"))
    destination = await create_segment_destination_for(platform, segment_api)
    return segment.name, destination.name


async def _create_fails(platform: Platform, campaign: campaign_pb.Campaign) -> grpc.aio.AioRpcError:
    before = await _all_campaign_names(platform)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    assert await _all_campaign_names(platform) == before, "a refused create must write nothing"
    return raised.value


async def test_campaign_without_audience_is_invalid(platform: Platform, references: tuple[str, str]) -> None:
    _, destination = references
    campaign = segment_export_campaign("", destination, audience=None)
    error = await _create_fails(platform, campaign)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "campaign.audience" in field_violations(error)


async def test_campaign_with_unknown_segment_names_the_field(
    platform: Platform, references: tuple[str, str]
) -> None:
    _, destination = references
    missing = f"segments/{uuid.uuid4()}"
    error = await _create_fails(platform, segment_export_campaign(missing, destination))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert missing in field_violations(error)["campaign.audience.segment"]


async def test_campaign_with_unknown_destination_names_the_field(
    platform: Platform, references: tuple[str, str]
) -> None:
    segment, _ = references
    missing = f"destinations/{uuid.uuid4()}"
    error = await _create_fails(platform, segment_export_campaign(segment, missing))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert missing in field_violations(error)["campaign.destination"]


async def test_every_problem_is_reported_at_once(platform: Platform) -> None:
    campaign = campaign_pb.Campaign(
        display_name=" ",
        destination="not-a-destination",
        segment_export=campaign_pb.SegmentExportContent(event_name=""),
    )
    error = await _create_fails(platform, campaign)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) >= {
        "campaign.display_name",
        "campaign.audience",
        "campaign.destination",
        "campaign.schedule",
        "campaign.segment_export.event_name",
    }


async def test_broken_personalization_is_refused(platform: Platform, references: tuple[str, str]) -> None:
    segment, destination = references
    campaign = segment_export_campaign(segment, destination)
    campaign.segment_export.custom_properties["greeting"] = "Hi {{ profile.first_name "
    campaign.segment_export.custom_properties["secret"] = "{{ settings.api_key }}"
    error = await _create_fails(platform, campaign)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert "not a valid template" in violations["campaign.segment_export.custom_properties[greeting]"]
    assert "settings.api_key" in violations["campaign.segment_export.custom_properties[secret]"]


async def test_templates_that_exceed_rendering_limits_are_refused(
    platform: Platform, references: tuple[str, str]
) -> None:
    segment, destination = references
    campaign = segment_export_campaign(segment, destination)
    campaign.segment_export.custom_properties["spin"] = "{% for i in (1..10000000000) %}x{% endfor %}"
    error = await _create_fails(platform, campaign)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit" in field_violations(error)["campaign.segment_export.custom_properties[spin]"]


async def test_more_than_50_profile_attributes_are_refused(
    platform: Platform, references: tuple[str, str]
) -> None:
    segment, destination = references
    campaign = segment_export_campaign(segment, destination)
    campaign.segment_export.profile_attributes.extend(f"attribute_{i}" for i in range(51))
    error = await _create_fails(platform, campaign)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 50" in field_violations(error)["campaign.segment_export.profile_attributes"]


async def test_malformed_segment_name_is_invalid_not_internal(
    platform: Platform, references: tuple[str, str]
) -> None:
    _, destination = references
    error = await _create_fails(platform, segment_export_campaign("segments/not a uuid!", destination))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "campaign.audience.segment" in field_violations(error)


async def test_create_with_request_id_is_idempotent(platform: Platform, references: tuple[str, str]) -> None:
    segment, destination = references
    request_id = str(uuid.uuid4())
    request = campaign_pb.CreateCampaignRequest(
        campaign=segment_export_campaign(segment, destination), request_id=request_id
    )
    first = await platform.campaigns.CreateCampaign(request)
    again = await platform.campaigns.CreateCampaign(request)
    assert again.name == first.name


async def _published_for_an_hour_from_now(
    platform: Platform, references: tuple[str, str]
) -> campaign_pb.Campaign:
    segment, destination = references
    later = Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    campaign = segment_export_campaign(
        segment, destination, schedule=campaign_pb.Schedule(send_later=campaign_pb.SendLater(send_time=later))
    )
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    return await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))


async def test_stopping_a_scheduled_campaign_cancels_its_run(
    platform: Platform, references: tuple[str, str]
) -> None:
    created = await _published_for_an_hour_from_now(platform, references)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    async def run_pending() -> bool:
        runs = await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
        return [r.state for r in runs.runs] == [scheduler_pb.RunState.RUN_STATE_PENDING]

    await eventually(run_pending)
    runs = await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
    assert runs.runs[0].scheduled_time == created.schedule.send_later.send_time

    stopped = await platform.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=created.name))
    assert stopped.state == campaign_pb.State.STATE_STOPPED

    async def run_cancelled() -> bool:
        runs = await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
        return [r.state for r in runs.runs] == [scheduler_pb.RunState.RUN_STATE_CANCELLED]

    await eventually(run_cancelled)


async def test_send_time_in_the_past_is_refused_at_publish(
    platform: Platform, references: tuple[str, str]
) -> None:
    segment, destination = references
    earlier = Timestamp()
    earlier.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    campaign = segment_export_campaign(
        segment,
        destination,
        schedule=campaign_pb.Schedule(send_later=campaign_pb.SendLater(send_time=earlier)),
    )
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "campaign.schedule.send_later.send_time" in field_violations(raised.value)
    still = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
    assert still.state == campaign_pb.State.STATE_DRAFT


async def test_unknown_campaign_is_not_found(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=f"campaigns/{uuid.uuid4()}"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_draft_can_be_updated_by_mask_and_deleted(
    platform: Platform, references: tuple[str, str]
) -> None:
    segment, destination = references
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment, destination))
    )
    change = campaign_pb.Campaign(
        name=created.name, display_name="Renamed", destination="ignored/not-in-mask"
    )
    change.segment_export.event_name = "Renamed Event"
    updated = await platform.campaigns.UpdateCampaign(
        campaign_pb.UpdateCampaignRequest(
            campaign=change, update_mask=FieldMask(paths=["display_name", "segment_export.event_name"])
        )
    )
    assert updated.display_name == "Renamed"
    assert updated.segment_export.event_name == "Renamed Event"
    assert list(updated.segment_export.profile_attributes) == ["first_name", "plan"], "untouched by the mask"
    assert updated.destination == destination
    assert await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name)) == updated

    await platform.campaigns.DeleteCampaign(campaign_pb.DeleteCampaignRequest(name=created.name))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_updates_change_nothing(platform: Platform, references: tuple[str, str]) -> None:
    segment, destination = references
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment, destination))
    )
    attempts = [
        (
            campaign_pb.Campaign(name=created.name, state=campaign_pb.State.STATE_COMPLETED),
            ["state"],
            "update_mask",
        ),
        (campaign_pb.Campaign(name=created.name), ["display_name"], "campaign.display_name"),
        (
            campaign_pb.Campaign(name=created.name, destination=f"destinations/{uuid.uuid4()}"),
            ["destination"],
            "campaign.destination",
        ),
    ]
    for change, paths, field in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await platform.campaigns.UpdateCampaign(
                campaign_pb.UpdateCampaignRequest(campaign=change, update_mask=FieldMask(paths=paths))
            )
        assert raised.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert field in field_violations(raised.value)
    assert await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name)) == created


async def test_published_campaign_can_be_neither_changed_nor_deleted(
    platform: Platform, references: tuple[str, str]
) -> None:
    created = await _published_for_an_hour_from_now(platform, references)
    with pytest.raises(grpc.aio.AioRpcError) as changed:
        await platform.campaigns.UpdateCampaign(
            campaign_pb.UpdateCampaignRequest(
                campaign=campaign_pb.Campaign(name=created.name, display_name="x"),
                update_mask=FieldMask(paths=["display_name"]),
            )
        )
    assert changed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as deleted:
        await platform.campaigns.DeleteCampaign(campaign_pb.DeleteCampaignRequest(name=created.name))
    assert deleted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await platform.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=created.name))
