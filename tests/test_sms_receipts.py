"""Delivery receipts and replies as each provider really sends them: Vonage signed by every
method its libraries offer (or, unsigned, to a secret URL), Exotel's final statuses, and bodies
that are not a callback at all."""

from __future__ import annotations

import aiohttp
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_dispatch.receipts import vonage
from herald_sandbox.exotel_api import ExotelApi
from herald_sandbox.vonage_api import VonageApi
from tests.conftest import Platform, eventually
from tests.test_sms_campaign import (
    SmsAccount,
    _exotel_config,
    _publish,
    _receipts,
    _sms_campaign,
    _vonage_destination,
    account,
    exotel,
    twilio,
)

__all__ = ["account", "exotel", "twilio"]  # fixtures


def test_vonage_signatures_match_vonage_libraries() -> None:
    """Known answers from Vonage's Python library's own tests (secret "signature_secret")."""
    params = {"param1": "value1", "param2": "value2", "timestamp": "1234567890"}
    sha256 = "280c4320703dbc98bfa22db676655ed2acfbfe8792b062ff7622e67f1183c287"
    assert vonage.signature("signature_secret", params, "sha256") == sha256
    assert vonage.signature("signature_secret", params, "md5") == "724c2bf6ca423c36e20631b11d1c5753"
    special = {"param1": "value&1", "param2": "value=2", "timestamp": "1234567890"}
    assert vonage.signature("signature_secret", special, "md5") == "2bbf0abafb2c55e5af6231513896a2ac"
    assert vonage.verifies("signature_secret", {**params, "sig": sha256.upper()})
    assert not vonage.verifies("signature_secret", {**params, "sig": "0" * 64})
    assert not vonage.verifies("signature_secret", {**params, "sig": ""})


@pytest.mark.parametrize("method", ["md5hash", "md5", "sha1", "sha256", "sha512"])
async def test_vonage_receipts_signed_by_each_method_count(
    platform: Platform, account: SmsAccount, method: str
) -> None:
    fake = VonageApi("a1b2c3d4", "s3cr3tS3cr3tAbCd", signature_secret="vonage-signature-secret")
    fake.signature_method = method
    fake.failing = {"14155550003"}
    await fake.start()
    try:
        campaign = _sms_campaign(account)
        campaign.destination = await _vonage_destination(
            account, fake, signature_secret=fake.signature_secret
        )
        name = await _publish(account, campaign)
        stats = await _receipts(account, name, 30)
        assert (stats.receipts.delivered, stats.receipts.failed) == (29, 1)
        assert set(fake.receipt_answers) == {200}
    finally:
        await fake.stop()


async def test_unsigned_vonage_callbacks_need_the_secret_url(platform: Platform, account: SmsAccount) -> None:
    fake = VonageApi("a1b2c3d4", "s3cr3tS3cr3tAbCd")
    await fake.start()
    try:
        campaign = _sms_campaign(account)
        campaign.destination = await _vonage_destination(account, fake)
        name = await _publish(account, campaign)
        stats = await _receipts(account, name, 30)  # the fake calls the URL with its token
        assert stats.receipts.delivered == 30
        destination = await account.clients.dispatch.GetDestination(
            dispatch_pb.GetDestinationRequest(name=campaign.destination)
        )
        bare_reply = destination.reply_url[: destination.reply_url.rindex("/")]
        bare_receipt = destination.receipt_url[: destination.receipt_url.rindex("/")]
        stop = {"msisdn": "14155550006", "to": "Herald", "text": "STOP", "type": "text"}
        forged_receipt = {"messageId": "0C000000217B7F02", "status": "failed", "err-code": "6"}
        async with aiohttp.ClientSession() as http:
            for url, form in (
                (bare_reply, stop),
                (bare_reply + "/" + "0" * 32, stop),
                (bare_receipt, forged_receipt),
            ):
                async with http.post(url, data=form) as answer:
                    assert answer.status == 403, url
            async with http.post(destination.reply_url, data=stop) as answer:
                assert answer.status == 200

        async def unsubscribed() -> bool:
            got = await account.clients.segmentation.GetUser(
                pb.GetUserRequest(name=f"users/{account.tag}-06")
            )
            return got.subscriptions.sms_unsubscribed

        await eventually(unsubscribed)  # only the STOP through the secret URL counted
        for other in ("00", "01"):
            got = await account.clients.segmentation.GetUser(
                pb.GetUserRequest(name=f"users/{account.tag}-{other}")
            )
            assert not got.subscriptions.sms_unsubscribed
    finally:
        await fake.stop()


async def test_exotel_final_statuses_each_count(account: SmsAccount, exotel: ExotelApi) -> None:
    exotel.failing = {"+14155550005"}
    exotel.dnd = {"+14155550006", "+14155550007"}
    destination = await account.clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(display_name="Exotel", exotel=_exotel_config(exotel))
        )
    )
    campaign = _sms_campaign(account)
    campaign.destination = destination.name
    campaign.sms.dlt_template_id = "1107172768973504659"
    name = await _publish(account, campaign)
    stats = await _receipts(account, name, 30)
    assert (stats.receipts.delivered, stats.receipts.failed) == (27, 3)
    reasons = {r.reason: r.count for r in stats.failure_reasons}
    assert reasons["failed after sending (exotel failed_dnd 30002)"] == 2
    assert reasons["failed after sending (exotel 30005)"] == 1
    # The run's own stats count its receipts too.
    (run,) = (await account.clients.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))).runs
    of_run = await account.clients.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{run.name}/stats")
    )
    assert (of_run.receipts.delivered, of_run.receipts.failed) == (27, 3)
    assert {r.reason: r.count for r in of_run.failure_reasons} == reasons


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"messageId": '),  # JSON cut short
        ("application/json", b'{"text": "\xff\xfe"}'),  # not UTF-8
        ("application/x-www-form-urlencoded", b"status=delivered&messageId=\xc3\x28"),
        ("application/x-www-form-urlencoded", b"text=%ff%fe"),  # escapes of bytes that are not UTF-8
    ],
)
async def test_a_malformed_callback_gets_400_and_changes_nothing(
    platform: Platform, account: SmsAccount, content_type: str, body: bytes
) -> None:
    fake = VonageApi("a1b2c3d4", "s3cr3tS3cr3tAbCd")
    name = await _vonage_destination(account, fake)
    destination = await account.clients.dispatch.GetDestination(dispatch_pb.GetDestinationRequest(name=name))
    async with aiohttp.ClientSession() as http:
        for url in (destination.receipt_url, destination.reply_url):
            async with http.post(url, data=body, headers={"Content-Type": content_type}) as answer:
                assert answer.status == 400, (url, await answer.text())
