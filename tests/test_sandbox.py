"""The sandbox: local stand-ins for every destination kind behind one port, recording what they
receive, so a campaign can be tried end to end without sending anything off the machine."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_sandbox.sandbox import CREDENTIALS, Sandbox, journal_path
from tests.conftest import Platform
from tests.helpers import completed_stats, condition, create_segment, segment_export_campaign, user


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    running = Sandbox(journal_path(tmp_path), port=0)
    await running.start()
    yield running
    await running.stop()


async def test_a_campaign_to_the_sandbox_is_recorded_and_shown(
    platform: Platform, sandbox: Sandbox, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(
            users=[user(f"{tag}-{n}", cohort=tag, first_name="Ada") for n in range(2)]
        )
    )
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await platform.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="Sandbox Segment",
                segment=dispatch_pb.SegmentConfig(
                    write_key=CREDENTIALS["segment"]["write_key"], endpoint_url=sandbox.endpoint("segment")
                ),
            )
        )
    )
    # A Twilio destination in the sandbox: its credentials are checked with the stand-in, as
    # Twilio checks real ones.
    twilio = CREDENTIALS["twilio"]
    config = dispatch_pb.TwilioConfig(
        account_sid=twilio["account_sid"],
        auth_token=twilio["auth_token"],
        endpoint_url=sandbox.endpoint("twilio"),
    )
    setattr(config, "from", twilio["from"])  # `from` is a Python keyword
    texting = await platform.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="Sandbox Twilio",
                twilio=config,
            )
        )
    )
    checked = await platform.dispatch.TestDestination(dispatch_pb.TestDestinationRequest(name=texting.name))
    assert checked.ok, checked.detail
    campaign = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=campaign.name))
    assert (await completed_stats(platform, campaign.name)).sent == 2

    # What `make sandbox-log` runs.
    shown = (
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "herald_sandbox.sandbox", "--log", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    ).stdout
    assert "segment   POST /v1/batch  -> 200" in shown
    assert f'"userId": "{tag}-0"' in shown and f'"userId": "{tag}-1"' in shown
    # The journal keeps no authorization header.
    assert "Basic " not in journal_path(tmp_path).read_text()


async def test_every_destination_kind_has_a_stand_in(sandbox: Sandbox) -> None:
    assert set(sandbox.urls) == {"segment", "mparticle", "twilio", "vonage", "msg91", "exotel", "netcore"}
    assert set(CREDENTIALS) == set(sandbox.urls)


def test_the_readme_gives_the_sandbox_credentials() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("## The sandbox") : readme.index("## A Segment export")]
    for kind, credentials in CREDENTIALS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{kind}` |"))
        for field, value in credentials.items():
            assert f"`{field}` `{value}`" in row, (kind, field)
