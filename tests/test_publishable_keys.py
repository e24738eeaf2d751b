"""What a browser-safe publishable key may do: record events, and keep anonymous profiles; set
custom properties on an identified user only with the user's identity signature (an HMAC of the
user id with the account's identity secret, made by the site's server); never touch contact
fields, identities or subscriptions."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from tests.conftest import Platform
from tests.harness import Clients, create_account
from tests.helpers import field_violations, user


@dataclass
class Site:
    admin: Clients
    browser: Clients
    identity_secret: str


@pytest.fixture
async def site(platform: Platform) -> AsyncIterator[Site]:
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "site")
    admin = Clients.open(platform.addresses, key)
    created = await admin.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(
            api_key=accounts_pb.ApiKey(
                display_name="website",
                role=accounts_pb.Role.ROLE_PUBLISHABLE,
                allowed_origins=["https://shop.example.com"],
            )
        )
    )
    browser = Clients.open(platform.addresses, created.key)
    secret = await admin.accounts.GetIdentitySecret(accounts_pb.GetIdentitySecretRequest())
    yield Site(admin, browser, secret.identity_secret)
    await browser.close()
    await admin.close()


def _signature(secret: str, user_id: str) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def _profile_event(user_id: str, signature: str = "", **properties: Any) -> pb.Event:
    event = pb.Event(
        user_id=user_id, name="herald.profile", client_event_id=uuid.uuid4().hex, user_signature=signature
    )
    event.properties.update(properties)
    return event


async def _properties(site: Site, user_id: str) -> dict[str, object]:
    found = await site.admin.segmentation.GetUser(pb.GetUserRequest(name=f"users/{user_id}"))
    return dict(found.properties)


async def test_an_identified_users_properties_change_only_with_the_users_signature(site: Site) -> None:
    await site.admin.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[user("ana", plan="free")]))
    with pytest.raises(grpc.aio.AioRpcError) as unsigned:
        await site.browser.segmentation.IngestEvents(
            pb.IngestEventsRequest(events=[_profile_event("ana", plan="gold")])
        )
    assert unsigned.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0].user_signature" in field_violations(unsigned.value)
    forged = _signature("not-the-secret", "ana")
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await site.browser.segmentation.IngestEvents(
            pb.IngestEventsRequest(events=[_profile_event("ana", forged, plan="gold")])
        )
    assert "events[0].user_signature" in field_violations(wrong.value)
    assert await _properties(site, "ana") == {"plan": "free"}  # nothing written

    signed = _signature(site.identity_secret, "ana")
    await site.browser.segmentation.IngestEvents(
        pb.IngestEventsRequest(events=[_profile_event("ana", signed, plan="gold")])
    )
    assert await _properties(site, "ana") == {"plan": "gold"}


async def test_contact_fields_identities_and_subscriptions_are_never_set_by_a_browser(site: Site) -> None:
    signed = _signature(site.identity_secret, "ben")
    for key in ("email", "phone", "identities", "subscriptions", "sms_unsubscribed"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await site.browser.segmentation.IngestEvents(
                pb.IngestEventsRequest(events=[_profile_event("ben", signed, **{key: "x"})])
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"events[0].properties.{key}" in field_violations(refused.value)


async def test_anonymous_visitors_and_their_events_are_recorded(site: Site) -> None:
    visitor = f"anon:{uuid.uuid4().hex}"
    answer = await site.browser.segmentation.IngestEvents(
        pb.IngestEventsRequest(
            events=[
                _profile_event(visitor, theme="dark"),
                pb.Event(user_id=visitor, name="Page Viewed", client_event_id=uuid.uuid4().hex),
                pb.Event(user_id="ana", name="Page Viewed", client_event_id=uuid.uuid4().hex),
            ]
        )
    )
    assert answer.accepted_count == 3
    assert await _properties(site, visitor) == {"theme": "dark"}


async def test_only_an_admin_reads_the_identity_secret(site: Site, platform: Platform) -> None:
    created = await site.admin.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(
            api_key=accounts_pb.ApiKey(display_name="ops", role=accounts_pb.Role.ROLE_EDITOR)
        )
    )
    editor = Clients.open(platform.addresses, created.key)
    try:
        for caller in (editor, site.browser):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await caller.accounts.GetIdentitySecret(accounts_pb.GetIdentitySecretRequest())
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await editor.close()
    # Each account has its own.
    other = await platform.accounts.GetIdentitySecret(accounts_pb.GetIdentitySecretRequest())
    assert other.identity_secret != site.identity_secret and len(site.identity_secret) == 64
