"""API keys: every call needs one, its role bounds what it may do, and a revoked key is refused by
every service within seconds."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import nats
import pytest
from nats.js import JetStreamContext

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.accounts.v1 import account_service_pb2_grpc as accounts_grpc
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.events.v1 import events_pb2
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_pb_grpc
from herald_campaign import accounts
from herald_campaign import servicer as campaign_servicer
from herald_common.auth import KEY_PREFIX, ROLE_PERMISSIONS, KeyRegistry, Unauthenticated, api_keys_bucket
from herald_dispatch import servicer as dispatch_servicer
from herald_scheduler import servicer as scheduler_servicer
from herald_segmentation import servicer as segmentation_servicer
from tests.conftest import Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import condition, field_violations, matching, user

Role = accounts_pb.Role


def _key(name: str, role: Any) -> accounts_pb.ApiKey:
    """A key of the role; a publishable one for this test's site."""
    origins = ["https://shop.example.com"] if role == Role.ROLE_PUBLISHABLE else []
    return accounts_pb.ApiKey(display_name=name, role=role, allowed_origins=origins)


@pytest.fixture
async def keys(platform: Platform) -> AsyncIterator[Callable[[Any], Awaitable[Clients]]]:
    """Makes clients calling with a new key of the platform's account with the given role."""
    opened: list[Clients] = []

    async def with_role(role: Any) -> Clients:
        created = await platform.accounts.CreateApiKey(
            accounts_pb.CreateApiKeyRequest(api_key=_key("test", role))
        )
        clients = Clients.open(platform.addresses, created.key)
        opened.append(clients)
        return clients

    yield with_role
    for clients in opened:
        await clients.close()


def _reads(clients: Clients) -> list[Awaitable[Any]]:
    """One read of each service."""
    return [
        clients.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest()),
        clients.segmentation.ListSegments(segmentation_pb.ListSegmentsRequest()),
        clients.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=f"campaigns/{uuid.uuid4()}")),
        clients.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest()),
    ]


async def _code(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_calls_without_a_valid_key_are_unauthenticated(platform: Platform) -> None:
    for key in ("", "nonsense", "hrld_0123456789abcdef_wrongsecret", "Bearer"):
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        async with grpc.aio.insecure_channel(platform.address("dispatch")) as channel:
            dispatch = dispatch_grpc.DispatchServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest(), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "key" in (refused.value.details() or "")


async def test_each_role_may_do_what_it_is_for_and_nothing_more(
    platform: Platform, keys: Callable[[Any], Awaitable[Clients]]
) -> None:
    viewer = await keys(Role.ROLE_VIEWER)
    assert [await _code(c) for c in _reads(viewer)] == [grpc.StatusCode.OK] * 4
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await viewer.segmentation.CreateSegment(
            segmentation_pb.CreateSegmentRequest(
                segment=segmentation_pb.Segment(
                    display_name="x",
                    filter=matching(condition("a", "EXISTS")),
                )
            )
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "viewer" in (denied.value.details() or "")

    ingest = await keys(Role.ROLE_INGEST)
    upserted = await ingest.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user("ingested-1", plan="gold")])
    )
    assert upserted.upserted_count == 1
    assert [await _code(c) for c in _reads(ingest)] == [grpc.StatusCode.PERMISSION_DENIED] * 4

    sent = await ingest.segmentation.IngestEvents(
        segmentation_pb.IngestEventsRequest(
            events=[segmentation_pb.Event(user_id="ingested-1", name="Opened", client_event_id="role-1")]
        )
    )
    assert sent.accepted_count == 1

    publishable = await keys(Role.ROLE_PUBLISHABLE)
    assert [await _code(c) for c in _reads(publishable)] == [grpc.StatusCode.PERMISSION_DENIED] * 4
    browser_event = segmentation_pb.Event(user_id="visitor-1", name="Page Viewed", client_event_id="role-2")
    sent = await publishable.segmentation.IngestEvents(
        segmentation_pb.IngestEventsRequest(events=[browser_event])
    )
    assert sent.accepted_count == 1
    assert (
        await _code(
            publishable.segmentation.UpsertUsers(segmentation_pb.UpsertUsersRequest(users=[user("p-1")]))
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )

    editor = await keys(Role.ROLE_EDITOR)
    assert [await _code(c) for c in _reads(editor)] == [grpc.StatusCode.OK] * 4
    assert (
        await _code(
            editor.accounts.CreateApiKey(
                accounts_pb.CreateApiKeyRequest(
                    api_key=accounts_pb.ApiKey(display_name="x", role=Role.ROLE_ADMIN)
                )
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (await editor.accounts.GetAccount(accounts_pb.GetAccountRequest())).name == platform.account


async def test_a_revoked_key_is_refused_by_every_service_within_seconds(
    platform: Platform, keys: Callable[[Any], Awaitable[Clients]]
) -> None:
    editor = await keys(Role.ROLE_EDITOR)
    assert [await _code(c) for c in _reads(editor)] == [grpc.StatusCode.OK] * 4
    listed = await platform.accounts.ListApiKeys(accounts_pb.ListApiKeysRequest())
    newest = listed.api_keys[0]
    assert newest.role == Role.ROLE_EDITOR and newest.prefix.startswith("hrld_")

    revoked_at = time.monotonic()
    revoked = await platform.accounts.RevokeApiKey(accounts_pb.RevokeApiKeyRequest(name=newest.name))
    assert revoked.HasField("revoke_time")
    while [await _code(c) for c in _reads(editor)] != [grpc.StatusCode.UNAUTHENTICATED] * 4:
        assert time.monotonic() - revoked_at < 5, "a revoked key still works after 5 s"
        await asyncio.sleep(0.05)
    # The admin key that revoked it still works.
    assert [await _code(c) for c in _reads(platform.clients)] == [grpc.StatusCode.OK] * 4


async def test_keys_are_listed_without_their_secret(platform: Platform) -> None:
    created = await platform.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(api_key=accounts_pb.ApiKey(display_name="ci", role=Role.ROLE_VIEWER))
    )
    assert created.key.startswith(created.api_key.prefix + "_")
    listed = await platform.accounts.ListApiKeys(accounts_pb.ListApiKeysRequest(page_size=1000))
    assert created.api_key in listed.api_keys
    assert created.key not in str(listed)


async def test_account_and_key_requests_are_checked(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await platform.accounts.CreateApiKey(
            accounts_pb.CreateApiKeyRequest(api_key=accounts_pb.ApiKey(display_name=""))
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad.value)) == {"api_key.display_name", "api_key.role"}

    # Only the bootstrap token creates accounts; an admin key cannot, a wrong token is refused.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await platform.accounts.CreateAccount(
            accounts_pb.CreateAccountRequest(account=accounts_pb.Account(display_name="x"))
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await create_account(platform.address("campaign"), "not-the-token")
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Another account's key cannot be revoked; it answers as if it did not exist.
    other_account, other_key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token
    )
    other = Clients.open(platform.addresses, other_key)
    try:
        [other_admin] = (await other.accounts.ListApiKeys(accounts_pb.ListApiKeysRequest())).api_keys
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await platform.accounts.RevokeApiKey(accounts_pb.RevokeApiKeyRequest(name=other_admin.name))
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await other.accounts.GetAccount(accounts_pb.GetAccountRequest())).name == other_account
    finally:
        await other.close()

    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await platform.accounts.RevokeApiKey(accounts_pb.RevokeApiKeyRequest(name="keys/1"))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bootstrap_account_creation_is_idempotent(platform: Platform) -> None:
    async with grpc.aio.insecure_channel(platform.address("campaign")) as channel:
        stub: Any = accounts_grpc.AccountServiceStub(channel)
        metadata = (("authorization", f"Bootstrap {platform.settings.bootstrap_token}"),)
        request = accounts_pb.CreateAccountRequest(
            account=accounts_pb.Account(display_name="Acme"), request_id=f"acme-{time.time_ns()}"
        )
        first = await stub.CreateAccount(request, metadata=metadata)
        again = await stub.CreateAccount(request, metadata=metadata)
    assert first.key and first.admin_key.role == Role.ROLE_ADMIN
    assert again.account == first.account and not again.key  # the key is shown once only


async def test_listed_keys_show_when_they_were_last_used(
    platform: Platform, keys: Callable[[Any], Awaitable[Clients]]
) -> None:
    viewer = await keys(Role.ROLE_VIEWER)

    async def listed_viewer() -> accounts_pb.ApiKey:
        listed = await platform.accounts.ListApiKeys(accounts_pb.ListApiKeysRequest())
        return listed.api_keys[0]

    assert not (await listed_viewer()).HasField("last_use_time")
    await viewer.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest())  # used at another service
    deadline = time.monotonic() + 15
    while not (await listed_viewer()).HasField("last_use_time"):
        assert time.monotonic() < deadline, "the use was not reported"
        await asyncio.sleep(0.5)
    key = await listed_viewer()
    assert key.last_use_time.ToDatetime() >= key.create_time.ToDatetime()


async def test_a_method_without_a_declared_permission_stops_the_service_at_start() -> None:
    from herald_common.auth import Authenticator, KeyRegistry
    from herald_common.grpc_server import GrpcServer
    from herald_dispatch.servicer import PERMISSIONS

    service = "herald.dispatch.v1.DispatchService"
    incomplete = {m: p for m, p in PERMISSIONS.items() if not m.endswith("/DeleteDestination")}
    with pytest.raises(RuntimeError, match="DeleteDestination"):
        GrpcServer([service], lambda server: None, Authenticator(KeyRegistry(), "t", ""), incomplete)
    GrpcServer([service], lambda server: None, Authenticator(KeyRegistry(), "t", ""), PERMISSIONS)


async def test_keys_of_a_deleted_account_are_refused_by_every_service_within_seconds(
    platform: Platform,
) -> None:
    bootstrap = (("authorization", f"Bootstrap {platform.settings.bootstrap_token}"),)
    doomed, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, "doomed"
    )
    clients = Clients.open(platform.addresses, key)
    try:
        assert [await _code(c) for c in _reads(clients)] == [grpc.StatusCode.OK] * 4
        async with grpc.aio.insecure_channel(platform.address("campaign")) as channel:
            operator: Any = accounts_grpc.AccountServiceStub(channel)
            for name, code in (
                ("accounts/nonsense", "INVALID_ARGUMENT"),
                (f"accounts/{uuid.uuid4()}", "NOT_FOUND"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await operator.DeleteAccount(
                        accounts_pb.DeleteAccountRequest(name=name), metadata=bootstrap
                    )
                assert refused.value.code().name == code
            deleted_at = time.monotonic()
            deleted = await operator.DeleteAccount(
                accounts_pb.DeleteAccountRequest(name=doomed), metadata=bootstrap
            )
        assert deleted.name == doomed and deleted.HasField("delete_time")
        while [await _code(c) for c in _reads(clients)] != [grpc.StatusCode.UNAUTHENTICATED] * 4:
            assert time.monotonic() - deleted_at < 5, "a deleted account's key still works after 5 s"
            await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await clients.accounts.GetAccount(accounts_pb.GetAccountRequest())
        assert "account of this API key was deleted" in (refused.value.details() or "")
        # Other accounts go on.
        assert [await _code(c) for c in _reads(platform.clients)] == [grpc.StatusCode.OK] * 4
    finally:
        await clients.close()


async def test_oversized_or_malformed_credentials_get_a_clear_refusal(platform: Platform) -> None:
    async with grpc.aio.insecure_channel(platform.address("segmentation")) as channel:
        stub: Any = segmentation_pb_grpc.SegmentationServiceStub(channel)
        request = segmentation_pb.ListSegmentsRequest()
        long_key = f"hrld_{'a' * 16}_{'s' * 4000}"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListSegments(request, metadata=(("authorization", f"Bearer {long_key}"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "malformed API key" in (refused.value.details() or "")
        # Metadata past gRPC's limit never reaches a servicer: refused before any work is done.
        huge = (("authorization", f"Bearer {platform.admin_key}"), ("x-padding", "p" * 64_000))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListSegments(request, metadata=huge)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()


def test_a_publishable_key_opens_only_the_browser_operations() -> None:
    """Of every RPC of every service, a publishable (browser) key may call only these."""
    tables = [accounts.PERMISSIONS, campaign_servicer.PERMISSIONS, scheduler_servicer.PERMISSIONS]
    tables += [segmentation_servicer.PERMISSIONS, dispatch_servicer.PERMISSIONS]
    allowed = ROLE_PERMISSIONS["ROLE_PUBLISHABLE"]
    callable_ = sorted(m for table in tables for m, needed in table.items() if needed in allowed)
    assert callable_ == [
        "/herald.segmentation.v1.SegmentationService/IngestEvents",
        "/herald.segmentation.v1.SegmentationService/MergeVisitor",
    ]


async def test_a_flood_with_a_publishable_key_leaves_the_server_keys_quota_alone(platform: Platform) -> None:
    # An account allowed 5 calls a second (bursts of 10) with its server keys.
    _, key = await create_account(
        platform.address("campaign"),
        platform.settings.bootstrap_token,
        "flooded",
        quota=accounts_pb.Quota(requests_per_second=5),
    )
    admin = Clients.open(platform.addresses, key)
    created = await admin.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(api_key=_key("website", Role.ROLE_PUBLISHABLE))
    )
    browser = Clients.open(platform.addresses, created.key)
    try:
        visits = [
            segmentation_pb.IngestEventsRequest(
                events=[segmentation_pb.Event(user_id="visitor", name="Viewed", client_event_id=f"f{i}")]
            )
            for i in range(300)
        ]
        # In waves under the replica's limit on calls in flight, which would refuse some too.
        started = time.monotonic()
        flood: list[grpc.StatusCode] = []
        for wave in range(0, len(visits), 50):
            flood += await asyncio.gather(
                *(_code(browser.segmentation.IngestEvents(v)) for v in visits[wave : wave + 50])
            )
        elapsed = time.monotonic() - started
        # The publishable keys have a quota of their own (50 a second, bursts of 100)...
        assert 100 <= flood.count(grpc.StatusCode.OK) <= 100 + 50 * elapsed + 5
        assert set(flood) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        # ...so the admin's calls still go through.
        for _ in range(8):
            await admin.accounts.GetAccount(accounts_pb.GetAccountRequest())
    finally:
        await browser.close()
        await admin.close()


async def test_an_older_key_state_published_late_does_not_bring_a_revoked_key_back(
    platform: Platform, js: JetStreamContext
) -> None:
    created = await platform.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(
            api_key=accounts_pb.ApiKey(display_name="late", role=Role.ROLE_VIEWER)
        )
    )
    key_id = created.key.removeprefix(KEY_PREFIX).partition("_")[0]
    viewer = Clients.open(platform.addresses, created.key)
    try:
        await viewer.segmentation.ListSegments(segmentation_pb.ListSegmentsRequest())
        await platform.accounts.RevokeApiKey(accounts_pb.RevokeApiKeyRequest(name=created.api_key.name))

        async def refused() -> bool:
            code = await _code(viewer.segmentation.ListSegments(segmentation_pb.ListSegmentsRequest()))
            return code == grpc.StatusCode.UNAUTHENTICATED

        await eventually(refused, within=10)
        # The key's first state (active) arrives again after its revocation, as an outbox that
        # publishes out of order would send it.
        bucket = await js.key_value(api_keys_bucket(platform.settings.namespace))
        first = (await bucket.history(key_id))[0].value or b""
        assert not events_pb2.ApiKeyState.FromString(first).revoked
        await bucket.put(key_id, first)
        # A process starting now reads every state kept and holds the newest: revoked.
        starting = KeyRegistry()
        await starting.start(bucket)
        try:
            with pytest.raises(Unauthenticated, match="revoked"):
                await starting.check(created.key)
        finally:
            await starting.stop()
        # And the running services, which saw the late state arrive too, still refuse the key.
        for _ in range(5):
            assert await refused()
            await asyncio.sleep(0.1)
    finally:
        await viewer.close()


async def test_a_made_up_key_is_refused_from_memory(platform: Platform) -> None:
    connection = await nats.connect(platform.settings.nats_url)
    bucket = await connection.jetstream().key_value(api_keys_bucket(platform.settings.namespace))
    registry = KeyRegistry(platform.settings.service_token)
    await registry.start(bucket)
    await registry.stop()
    await connection.close()  # from here on, asking the bucket would fail
    made_up = f"{KEY_PREFIX}0123456789abcdef_{'s' * 43}"
    with pytest.raises(Unauthenticated, match="unknown API key"):
        await registry.check(made_up)
    # Only an id this installation made, and not seen yet (created a moment ago), is asked for.
    just_created = registry.new_key()
    with pytest.raises(Exception) as asked:
        await registry.check(just_created.key)
    assert not isinstance(asked.value, Unauthenticated)
