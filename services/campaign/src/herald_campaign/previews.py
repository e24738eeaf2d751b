"""A campaign's message as one user would get it: previews, and test messages sent for real."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_campaign.lifecycle import Lifecycle
from herald_campaign.references import References
from herald_campaign.storage import hourly_use
from herald_common import personalization, sms
from herald_common.auth import current_account_id, current_caller
from herald_common.db import Database
from herald_common.errors import FailedPrecondition, Validator
from herald_common.hourly_quota import HourlyQuota
from herald_common.popups import check_popup, rendered, variant_for

MAX_TEST_MESSAGES = 5


# Test messages one API key may send an hour (they are real texts, and cost money).
TEST_MESSAGES_PER_KEY_HOUR = 50


_ENCODINGS = {sms.Encoding.GSM7: pb.SMS_ENCODING_GSM7, sms.Encoding.UCS2: pb.SMS_ENCODING_UCS2}


def _profile_of(user: segmentation_pb.User) -> dict[str, Any]:
    """A user's profile as templates see it: custom properties, and system fields where set (as
    dispatch's recipients carry them)."""
    profile: dict[str, Any] = json_format.MessageToDict(user.properties)
    system = {
        "email": user.email,
        "phone": user.phone,
        "country": user.location.country,
        "region": user.location.region,
        "city": user.location.city,
        "date_of_birth": user.date_of_birth,
    }
    if user.gender:
        system["gender"] = segmentation_pb.Gender.Name(user.gender)
    profile.update({key: value for key, value in system.items() if value})
    return profile


class Previews:
    def __init__(self, database: Database, references: References, lifecycle: Lifecycle) -> None:
        self.references = references
        self.lifecycle = lifecycle
        self.test_messages = HourlyQuota(database, hourly_use)

    async def preview(self, body: str, user_id: str) -> pb.MessagePreview:
        """An SMS body rendered for one user, with how it travels (encoding, length, segments)."""
        check = Validator()
        problem = sms.body_problem(body)
        if problem:
            check.add("body", problem)
        check.require(bool(user_id), "user_id", "required")
        check.raise_if_any()
        user = await self.references.user(user_id, "user_id")
        try:
            text = await personalization.render_off_loop(body, _profile_of(user))
        except personalization.PersonalizationError as error:
            reason = f"the body cannot be rendered for {user_id}: {error}"
            raise FailedPrecondition(f"users/{user_id}", reason) from None
        measured = sms.measure(text)
        return pb.MessagePreview(
            text=text,
            encoding=_ENCODINGS[measured.encoding],
            characters=measured.characters,
            units=measured.units,
            segments=measured.segments,
        )

    async def preview_popup(self, content: pb.WebPopupContent, user_id: str) -> pb.MessagePreview:
        """A web pop-up's messages rendered for one user, and the variant they would get."""
        check = Validator()
        check_popup(content, "web_popup", check)
        check.require(bool(user_id), "user_id", "required")
        check.raise_if_any()
        profile = _profile_of(await self.references.user(user_id, "user_id"))
        chosen, _ = variant_for(content, profile)
        previews = []
        for value, message in [("", content.message), *((v.value, v.message) for v in content.variants)]:
            try:
                shown = rendered(message, profile)
            except personalization.PersonalizationError as error:
                reason = f"the pop-up cannot be rendered for {user_id}: {error}"
                raise FailedPrecondition(f"users/{user_id}", reason) from None
            previews.append(
                pb.PopupPreview(
                    variant=value,
                    title=shown["title"],
                    body=shown["body"],
                    button_text=shown.get("button", {}).get("text", ""),
                    image_url=shown.get("image_url", ""),
                )
            )
        return pb.MessagePreview(popups=previews, chosen_variant=chosen)

    async def send_test(self, request: pb.SendTestMessageRequest) -> pb.SendTestMessageResponse:
        """The campaign's SMS, rendered for each number (empty profile) or test user (their own),
        sent now through its destination; never counted in its stats."""
        check = Validator()
        count = len(request.phone_numbers) + len(request.user_ids)
        check.require(
            1 <= count <= MAX_TEST_MESSAGES,
            "phone_numbers",
            f"1 to {MAX_TEST_MESSAGES} numbers and users in all",
        )
        for i, phone in enumerate(request.phone_numbers):
            check.require(
                bool(sms.E164.match(phone)),
                f"phone_numbers[{i}]",
                "an E.164 number, for example +14155550100",
            )
        for i, user_id in enumerate(request.user_ids):
            check.require(bool(user_id), f"user_ids[{i}]", "required")
        check.raise_if_any()
        caller, account_id = current_caller(), current_account_id()
        sender = f"key:{caller.key_id}" if caller and caller.key_id else f"account:{account_id}"
        await self.test_messages.take(
            account_id, sender, count, TEST_MESSAGES_PER_KEY_HOUR, "test messages per key"
        )
        campaign = await self.lifecycle.get(request.campaign)
        if campaign.WhichOneof("content") != "sms":
            raise FailedPrecondition(request.campaign, f"{request.campaign} is not an SMS campaign")
        body = campaign.sms.body
        results = [pb.TestMessageResult(phone=phone) for phone in request.phone_numbers]
        profiles: list[dict[str, Any]] = [{} for _ in request.phone_numbers]
        for i, user_id in enumerate(request.user_ids):
            user = await self.references.user(user_id, f"user_ids[{i}]")
            results.append(pb.TestMessageResult(phone=user.phone, user_id=user_id))
            profiles.append(_profile_of(user))
        sending: list[pb.TestMessageResult] = []
        for result, profile in zip(results, profiles, strict=True):
            if not result.phone:
                result.detail = "the user has no phone number"
                continue
            try:
                result.text = await personalization.render_off_loop(body, profile)
            except personalization.PersonalizationError as error:
                result.detail = f"personalization failed: {error}"
                continue
            sending.append(result)
        if sending:
            answers = await self.references.send_test_messages(
                campaign.destination, [(r.phone, r.text) for r in sending], campaign.sms.dlt_template_id
            )
            for result, answer in zip(sending, answers, strict=True):
                result.sent, result.detail = answer.sent, answer.detail
        return pb.SendTestMessageResponse(results=results)
