"""mParticle Events API: one batch per user, each with one `custom_event`, packed into
/v2/bulkevents requests of at most 100 batches and under 256 KB; a batch over 128 KB fails alone.

A batch's `source_request_id` and its event's `source_message_id` are the delivery id, the same
on every attempt, so mParticle de-duplicates a batch sent again after a lost answer or a crash.
Answers: 202 (also when only some batches were good), 429 with Retry-After, 5xx retried with
backoff; 400, 401 and 403 are final.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any

import aiohttp
import orjson
from google.protobuf.message import Message

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels, personalization
from herald_common.errors import Validator
from herald_dispatch.channels import Outcome, SendContext, basic_auth, mask_secret
from herald_dispatch.channels.export import (
    MAX_RETRY_SECONDS,
    REQUEST_TIMEOUT,
    ExportRequest,
    PastLimits,
    code_text,
    encode_each,
    outcomes_of,
    packed,
    post_until_answered,
    push_device,
    readable,
)

KIND = channels.for_config("mparticle")
PODS = {
    "US1": "https://s2s.us1.mparticle.com",
    "US2": "https://s2s.us2.mparticle.com",
    "EU1": "https://s2s.eu1.mparticle.com",
    "AU1": "https://s2s.au1.mparticle.com",
}
ENVIRONMENTS = ("production", "development")
DEFAULT_BATCHES_PER_SECOND = 270
MAX_BATCHES_PER_REQUEST = 100
# "The total request size must be under 256kb": a margin for the brackets and commas.
MAX_REQUEST_BYTES = 256 * 1024 - 1024
MAX_BATCH_BYTES = 128 * 1024
MAX_USER_ATTRIBUTES = 100
MAX_VALUE_CHARACTERS = 4096
MAX_LIST_ENTRIES, MAX_LIST_ENTRY_CHARACTERS = 1000, 512
# Profile fields that have a reserved mParticle user attribute (as the JSON reference spells them).
RESERVED = {
    "first_name": "$firstname",
    "last_name": "$lastname",
    "phone": "$mobile",
    "gender": "$gender",
    "country": "$country",
    "region": "$state",
    "city": "$city",
    "zip": "$zip",
    "address": "$address",
}
# `$gender` takes a letter.
GENDER_LETTERS = {"female": "F", "male": "M", "other": "O"}
PLATFORMS = {"android": "Android", "ios": "iOS", "web": "web"}
USER_AGENT = "herald/0.1.0"


def _user_value(key: str, value: Any) -> Any:
    """A profile value as a user attribute: a string, number or boolean, or a list of strings."""
    value = readable(key, value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        entries = [str(v) for v in value]
        if len(entries) > MAX_LIST_ENTRIES or any(len(e) > MAX_LIST_ENTRY_CHARACTERS for e in entries):
            raise PastLimits(
                f"user attribute {key} is a list past mParticle's limits "
                f"({MAX_LIST_ENTRIES} entries of at most {MAX_LIST_ENTRY_CHARACTERS} characters)"
            )
        return entries
    if not isinstance(value, str | int | float | bool):
        value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARACTERS:
        raise PastLimits(
            f"user attribute {key} is {len(value):,} characters; "
            f"mParticle takes at most {MAX_VALUE_CHARACTERS:,}"
        )
    return value


def _age(born: str, on: date) -> int | None:
    try:
        birthday = date.fromisoformat(born)
    except ValueError:
        return None
    return on.year - birthday.year - ((on.month, on.day) < (birthday.month, birthday.day))


class _BatchBuilder:
    """Builds each recipient's batch from the campaign's export content."""

    def __init__(self, context: SendContext) -> None:
        content: campaign_pb.MparticleExportContent = context.campaign.mparticle_export
        self.content = content
        self.environment = context.destination.mparticle.environment
        self.static = {k: v for k, v in content.custom_attributes.items() if personalization.is_static(v)}
        self.templates = {
            k: v for k, v in content.custom_attributes.items() if not personalization.is_static(v)
        }
        self.plan_time: datetime = context.plan_time
        self.timestamp_ms = int(context.plan_time.timestamp() * 1000)

    def _user_attributes(self, profile: dict[str, Any]) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        for key in self.content.profile_attributes:
            if key not in profile or profile[key] in (None, ""):
                continue
            value = _user_value(key, profile[key])
            if key == "gender" and isinstance(value, str):
                value = GENDER_LETTERS.get(value, value)
            attributes[RESERVED.get(key, key)] = value
            if key == "date_of_birth":
                age = _age(str(profile[key]), self.plan_time.date())
                if age is not None:
                    attributes["$age"] = str(age)
        if len(attributes) > MAX_USER_ATTRIBUTES:
            raise PastLimits(
                f"{len(attributes)} user attributes; mParticle takes at most {MAX_USER_ATTRIBUTES}"
            )
        return attributes

    def build(self, recipient: events.Recipient) -> dict[str, Any]:
        profile = orjson.loads(recipient.attributes_json) if recipient.attributes_json else {}
        custom = dict(self.static)
        for key, template in self.templates.items():
            value = personalization.render(template, profile)
            if len(value) > MAX_VALUE_CHARACTERS:
                raise PastLimits(
                    f"custom attribute {key} is {len(value):,} characters; "
                    f"mParticle takes at most {MAX_VALUE_CHARACTERS:,}"
                )
            custom[key] = value
        identities = {"customer_id": recipient.user_id}
        if profile.get("email"):
            identities["email"] = str(profile["email"])
        if profile.get("phone"):
            identities["mobile_number"] = str(profile["phone"])
        batch: dict[str, Any] = {
            "events": [
                {
                    "event_type": "custom_event",
                    "data": {
                        "event_name": self.content.event_name,
                        "custom_event_type": self.content.custom_event_type or "other",
                        "custom_attributes": custom,
                        "source_message_id": recipient.delivery_id,
                        "timestamp_unixtime_ms": self.timestamp_ms,
                    },
                }
            ],
            "user_identities": identities,
            "user_attributes": self._user_attributes(profile),
            "environment": self.environment,
            "source_request_id": recipient.delivery_id,
            "schema_version": 2,
        }
        device = push_device(profile, self.content.push_tokens)
        if device is not None:
            batch["device_info"] = {
                "platform": PLATFORMS.get(device["platform"], "Unknown"),
                "push_token": device["push_token"],
                "device_manufacturer": device.get("make", ""),
                "device_model": device.get("model", ""),
                "os_version": device.get("os_version", ""),
            }
        return batch


def _error_code(text: str) -> str:
    """mParticle's first error code."""
    try:
        payload = json.loads(text)
        code = payload["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return code_text(code)


def _same(body: bytes, headers: dict[str, str]) -> Callable[[int], tuple[bytes, dict[str, str]]]:
    """Every attempt sends the same request: its ids are what mParticle de-duplicates on."""
    return lambda _retries: (body, headers)


def _auth(config: pb.MparticleConfig) -> str:
    return basic_auth(config.api_key, config.api_secret)


def base_url(config: pb.MparticleConfig) -> str:
    return (config.endpoint_url or PODS.get(config.pod.upper(), "")).rstrip("/")


class MparticleChannel:
    kind = KIND
    resend_unknown = True  # mParticle de-duplicates on source_request_id (the delivery id)

    def __init__(self, http: aiohttp.ClientSession, *, max_retry_seconds: float = MAX_RETRY_SECONDS) -> None:
        self.http = http
        self.max_retry_seconds = max_retry_seconds

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        assert isinstance(config, pb.MparticleConfig)
        if config.pod or not config.endpoint_url:
            check.require(
                config.pod.upper() in PODS, f"{field}.pod", f"one of {', '.join(PODS)} (or an endpoint_url)"
            )
        check.require(bool(config.api_key.strip()), f"{field}.api_key", "required")
        check.require(bool(config.api_secret.strip()), f"{field}.api_secret", "required")
        for name in ("api_key", "api_secret"):
            check.require(len(getattr(config, name)) <= 200, f"{field}.{name}", "at most 200 characters")
        check.require(config.environment in ENVIRONMENTS, f"{field}.environment", "production or development")
        check.require(
            0 <= config.batches_per_second <= 100_000,
            f"{field}.batches_per_second",
            "0 (mParticle's default, 270) to 100,000",
        )
        return [config.endpoint_url] if config.endpoint_url else []

    def requests_per_second(self, destination: pb.Destination) -> int:
        # Counted in batches: each request takes a permit per batch it carries.
        return destination.mparticle.batches_per_second or DEFAULT_BATCHES_PER_SECOND

    def mask(self, config: Message) -> None:
        assert isinstance(config, pb.MparticleConfig)
        config.api_secret = mask_secret(config.api_secret)

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        """An empty /v2/bulkevents request: authenticated like any other, recording nothing."""
        config = destination.mparticle
        url = f"{base_url(config)}/v2/bulkevents"
        headers = {"Authorization": _auth(config), "Content-Type": "application/json"}
        try:
            async with self.http.post(
                url, data=b"[]", headers=headers, timeout=REQUEST_TIMEOUT, allow_redirects=False
            ) as answer:
                status = answer.status
        except (TimeoutError, aiohttp.ClientError) as error:
            return False, f"mParticle could not be reached ({type(error).__name__})"
        if 200 <= status < 300:
            return True, f"mParticle accepts the key and secret ({config.environment} feed)"
        if status in (401, 403):
            return False, f"mParticle refused the key and secret (HTTP {status})"
        return False, f"mParticle answered HTTP {status}"

    async def deliver(self, context: SendContext, recipients: Sequence[events.Recipient]) -> list[Outcome]:
        builder = _BatchBuilder(context)
        encoded, outcomes = await encode_each(
            recipients,
            builder.build,
            MAX_BATCH_BYTES,
            lambda size: f"batch is {size:,} bytes; mParticle takes at most 128 KB per batch",
            builder.templates.values(),
        )
        config = context.destination.mparticle
        url = f"{base_url(config)}/v2/bulkevents"
        headers = {
            "Authorization": _auth(config),
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        for request in packed(encoded, MAX_BATCHES_PER_REQUEST, MAX_REQUEST_BYTES):
            body = b"[" + b",".join(item.json for item in request) + b"]"
            export = ExportRequest("mParticle", url, _same(body, headers), _error_code, permits=len(request))
            answered = await post_until_answered(self.http, context, export, self.max_retry_seconds)
            outcomes += outcomes_of(context, request, answered)
        return outcomes
