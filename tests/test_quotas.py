"""Per-account quotas: a call rate and a batch size, answered with RESOURCE_EXHAUSTED and what
to do about it."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from tests.conftest import Platform
from tests.harness import Clients, create_account
from tests.helpers import field_violations, user


async def _account(platform: Platform, quota: accounts_pb.Quota) -> tuple[str, Clients]:
    """A new account with its own quota, and clients calling with its admin key."""
    name, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, "limited", quota
    )
    return name, Clients.open(platform.addresses, key)


def _details(error: grpc.aio.AioRpcError) -> tuple[list[str], float | None]:
    """The QuotaFailure subjects and the RetryInfo delay (seconds) an error carries."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    subjects: list[str] = []
    delay = None
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToMilliseconds() / 1000
    return subjects, delay


async def test_a_batch_over_the_account_limit_is_refused_and_writes_nothing(platform: Platform) -> None:
    account, clients = await _account(platform, accounts_pb.Quota(max_batch_size=10))
    try:
        got = await clients.accounts.GetAccount(accounts_pb.GetAccountRequest())
        assert got.quota.max_batch_size == 10
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await clients.segmentation.UpsertUsers(
                segmentation_pb.UpsertUsersRequest(users=[user(f"quota-{i}") for i in range(11)])
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 10 users" in (refused.value.details() or "")
        assert _details(refused.value) == ([account], None)  # waiting would not help
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await clients.segmentation.GetUser(segmentation_pb.GetUserRequest(name="users/quota-0"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        done = await clients.segmentation.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(users=[user(f"quota-{i}") for i in range(10)])
        )
        assert done.upserted_count == 10
    finally:
        await clients.close()


async def test_calls_past_the_account_rate_are_told_when_to_retry(platform: Platform) -> None:
    account, clients = await _account(platform, accounts_pb.Quota(requests_per_second=5))
    try:
        outcomes: list[grpc.aio.AioRpcError | None] = []
        started = time.monotonic()
        for _ in range(30):
            try:
                await clients.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest())
                outcomes.append(None)
            except grpc.aio.AioRpcError as error:
                outcomes.append(error)
        elapsed = time.monotonic() - started
        refused = [e for e in outcomes if e is not None]
        # A burst of twice the rate, then the rate itself.
        assert 10 <= outcomes.count(None) <= 10 + 5 * elapsed + 1
        assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
        subjects, delay = _details(refused[-1])
        assert subjects == [account]
        assert delay is not None and 0 < delay <= 0.2
        await asyncio.sleep(delay)
        await clients.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest())
        # Other accounts are not held back.
        await platform.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest())
    finally:
        await clients.close()


async def test_quotas_are_checked_when_the_account_is_created(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await create_account(
            platform.address("campaign"),
            platform.settings.bootstrap_token,
            quota=accounts_pb.Quota(requests_per_second=-1, max_batch_size=5000),
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad.value)) == {
        "account.quota.requests_per_second",
        "account.quota.max_batch_size",
    }
