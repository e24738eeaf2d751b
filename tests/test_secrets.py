"""Destination credentials: sealed at rest under a key-encryption key, rotatable, and never in a
response, a log line, an event or a database row in clear."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import asyncpg
import nats
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common.bus import Subjects
from herald_common.db import Database, make_engine
from herald_common.secret_box import Sealed, SecretBox, SecretKeysError, new_key_setting
from herald_dispatch import main as dispatch_main
from herald_dispatch.destinations import reseal
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.harness import create_account, fresh_settings, keyed_channel
from tests.helpers import (
    condition,
    create_segment_destination,
    matching,
    segment_export_campaign,
    user,
)
from tests.processes import ServiceProcesses, environment

SCHEMAS = ("campaign", "segmentation", "scheduler", "dispatch")


def test_sealed_values_open_only_with_their_key_and_row() -> None:
    box = SecretBox.from_setting(new_key_setting("k2") + "," + new_key_setting("k1"))
    sealed = box.seal(b"wk_live_secret", b"row-1")
    assert sealed.key_id == "k2" and b"wk_live_secret" not in sealed.data
    assert box.open(sealed, b"row-1") == b"wk_live_secret"
    with pytest.raises(SecretKeysError, match="does not open"):
        box.open(sealed, b"row-2")  # copied onto another row
    with pytest.raises(SecretKeysError, match="does not list"):
        box.open(Sealed("k9", sealed.data), b"row-1")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("", "HERALD_SECRET_KEYS is not set"),
        ("k1:not base64!", "not base64"),
        ("k1:" + "QUJD", "32 bytes"),
        ("bad id:" + new_key_setting("x").split(":")[1], "key id"),
        (new_key_setting("k1") + "," + new_key_setting("k1"), "listed twice"),
    ],
)
def test_malformed_key_settings_are_explained(setting: str, message: str) -> None:
    with pytest.raises(SecretKeysError, match=message):
        SecretBox.from_setting(setting)


async def test_dispatch_will_not_start_without_keys(platform: Platform) -> None:
    with pytest.raises(SecretKeysError, match="HERALD_SECRET_KEYS"):
        await dispatch_main.start(replace(platform.settings, secret_keys=""), port=0)


async def test_credentials_are_resealed_under_a_new_key(platform: Platform, segment_api: SegmentApi) -> None:
    write_key = next(iter(segment_api.write_keys))
    destination = await create_segment_destination(platform, segment_api.url, write_key)
    destination_id = uuid.UUID(destination.name.removeprefix("destinations/"))
    current = platform.settings.secret_keys
    rotated = new_key_setting("next")
    database = Database(make_engine(platform.settings.database_url, pool_size=1))
    try:
        # Rotate: the new key first, the old one still listed; every row moves to the new key.
        assert await reseal(database, SecretBox.from_setting(f"{rotated},{current}")) >= 1
        connection = await asyncpg.connect(platform.settings.database_url.replace("+asyncpg", ""))
        try:
            key_id, config = await connection.fetchrow(
                "SELECT key_id, config FROM dispatch.destinations WHERE id = $1", destination_id
            )
            assert key_id == "next"
            assert SecretBox.from_setting(rotated).open(Sealed(key_id, config), destination_id.bytes)
        finally:
            await connection.close()
    finally:
        # And back, so the running dispatch (which knows only its own key) reads them again.
        await reseal(database, SecretBox.from_setting(f"{current},{rotated}"))
        await database.dispose()
    got = await platform.dispatch.GetDestination(dispatch_pb.GetDestinationRequest(name=destination.name))
    assert got.segment.write_key != write_key and got.segment.write_key.endswith(write_key[-4:])


async def _rows_containing(database_url: str, needles: list[str]) -> list[str]:
    connection = await asyncpg.connect(database_url)
    try:
        tables = await connection.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema = ANY($1::text[]) AND table_type = 'BASE TABLE'",
            list(SCHEMAS),
        )
        found = []
        for schema, table in tables:
            for needle in needles:
                count = await connection.fetchval(
                    f'SELECT count(*) FROM "{schema}"."{table}" AS r WHERE r::text LIKE $1', f"%{needle}%"
                )
                if count:
                    found.append(f"{schema}.{table}")
        return found
    finally:
        await connection.close()


async def _stream_messages_containing(nats_url: str, namespace: str, needle: bytes) -> list[str]:
    connection = await nats.connect(nats_url)
    js = connection.jetstream()
    found = []
    try:
        for stream in Subjects(namespace).streams():
            info = await js.stream_info(stream)
            for sequence in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
                try:
                    message = await js.get_msg(stream, sequence)
                except nats.js.errors.NotFoundError:
                    continue
                if needle in (message.data or b""):
                    found.append(f"{stream}#{sequence}")
    finally:
        await connection.close()
    return found


async def test_a_write_key_appears_nowhere_in_clear(servers: tuple[str, str], tmp_path: Path) -> None:
    """The export runs end to end in service processes logging at debug level, with a failing
    first request; then every log, response, event and database row is searched for the key."""
    write_key = f"wk_SCRUB_{uuid.uuid4().hex}"
    segment_api = SegmentApi(write_keys={write_key})
    await segment_api.start()
    segment_api.fail_next(2, status=500)
    async with fresh_settings(*servers) as settings:
        services = ServiceProcesses(environment(settings, LOG_LEVEL="debug"), tmp_path / "logs")
        await services.start()
        responses: list[str] = []
        try:
            _, key = await create_account(services.address("campaign"), settings.bootstrap_token)
            async with (
                keyed_channel(services.address("segmentation"), key) as segmentation_channel,
                keyed_channel(services.address("dispatch"), key) as dispatch_channel,
                keyed_channel(services.address("campaign"), key) as campaign_channel,
            ):
                segmentation = segmentation_grpc.SegmentationServiceStub(segmentation_channel)
                dispatch = dispatch_grpc.DispatchServiceStub(dispatch_channel)
                campaigns = campaign_grpc.CampaignServiceStub(campaign_channel)
                tag = uuid.uuid4().hex[:8]
                await segmentation.UpsertUsers(
                    segmentation_pb.UpsertUsersRequest(
                        users=[user(f"{tag}-{i}", cohort=tag, first_name=f"U{i}") for i in range(30)]
                    )
                )
                segment = await segmentation.CreateSegment(
                    segmentation_pb.CreateSegmentRequest(
                        segment=segmentation_pb.Segment(
                            display_name="scrub",
                            filter=matching(condition("cohort", "EQUALS", tag)),
                        )
                    )
                )
                destination = await dispatch.CreateDestination(
                    dispatch_pb.CreateDestinationRequest(
                        destination=dispatch_pb.Destination(
                            display_name="scrub",
                            segment=dispatch_pb.SegmentConfig(
                                write_key=write_key, endpoint_url=segment_api.url
                            ),
                        )
                    )
                )
                responses.append(str(destination))
                responses.append(
                    str(
                        await dispatch.GetDestination(
                            dispatch_pb.GetDestinationRequest(name=destination.name)
                        )
                    )
                )
                responses.append(str(await dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest())))
                created = await campaigns.CreateCampaign(
                    campaign_pb.CreateCampaignRequest(
                        campaign=segment_export_campaign(segment.name, destination.name)
                    )
                )
                await campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

                async def completed() -> bool:
                    got = await campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
                    return got.state == campaign_pb.State.STATE_COMPLETED

                await eventually(completed, within=60)
                stats = await campaigns.GetCampaignStats(
                    campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
                )
                responses.append(str(stats))
                assert stats.sent == 30
        finally:
            await services.stop()
            await segment_api.stop()
        assert {e["writeKey"] for e in segment_api.events.values()} == {write_key}  # it was used

        assert [r for r in responses if write_key in r] == []
        logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").iterdir())
        assert '"level": "debug"' in logs or '"level": "info"' in logs  # the services did log
        assert write_key not in logs
        hex_key = write_key.encode().hex()
        assert await _rows_containing(settings.database_url, [write_key, hex_key]) == []
        assert (
            await _stream_messages_containing(settings.nats_url, settings.namespace, write_key.encode()) == []
        )
