"""Outbound requests are checked at the address actually connected to, whatever the URL said (a
name, an IP literal, an IPv6 form carrying an IPv4 address), and redirects are never followed.
Everything stays on loopback: a resolver stub stands for DNS, a local redirector for a hostile
endpoint."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.netguard import NetworkPolicy
from herald_dispatch.provider_http import Answer, NotConnected, ProviderHttp
from tests.conftest import Platform
from tests.helpers import (
    completed_stats,
    condition,
    create_segment,
    create_segment_destination,
    segment_export_campaign,
    user,
)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "169.254.169.254",
        "10.1.2.3",
        "::1",
        "fd00::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    ],
)
def test_private_addresses_are_refused_in_every_form(address: str) -> None:
    assert NetworkPolicy().address_problem(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert NetworkPolicy().address_problem(address) is None


@dataclass
class Recorder:
    """A local HTTP server that counts what reaches it; with `location`, it redirects there."""

    host: str = "127.0.0.1"
    location: str = ""
    requests: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append(f"{request.method} {request.path} {await request.text()}")
            if self.location:
                return web.Response(status=307, headers={"Location": self.location})
            return web.json_response({"success": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def sink() -> AsyncIterator[Recorder]:
    recorder = Recorder(host="127.0.0.2")  # another loopback address: a stand-in for an internal host
    await recorder.start()
    yield recorder
    await recorder.stop()


class StubResolver(AbstractResolver):
    """DNS that answers one address for every name: a name rebound to an internal address."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=self.address, port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        pass


async def _get(policy: NetworkPolicy, url: str, resolver: AbstractResolver | None = None) -> int:
    options = {"resolver": resolver} if resolver else {}
    async with (
        aiohttp.ClientSession(connector=policy.connector(**options)) as http,
        http.get(url, allow_redirects=False) as answer,
    ):
        return answer.status


async def test_the_connected_address_is_checked_for_ip_literals_and_names(sink: Recorder) -> None:
    port = sink.url.rsplit(":", 1)[1]
    closed = NetworkPolicy()  # no private network allowed
    with pytest.raises(aiohttp.ClientConnectorError, match="not connecting"):
        await _get(closed, f"http://127.0.0.2:{port}/admin")
    with pytest.raises(aiohttp.ClientConnectorError, match="not connecting"):
        await _get(closed, f"http://metadata.example:{port}/latest", StubResolver("127.0.0.2"))
    assert sink.requests == []
    # Allowed explicitly (as tests and local development do), the same address is reached.
    assert (
        await _get(
            NetworkPolicy(["127.0.0.0/8"]), f"http://rebound.example:{port}/", StubResolver("127.0.0.2")
        )
        == 200
    )
    assert len(sink.requests) == 1


async def test_sms_messages_are_checked_at_the_connected_address_too(sink: Recorder) -> None:
    """The SMS client connects on its own: it checks each address it connects to, as the session does."""
    port = sink.url.rsplit(":", 1)[1]
    closed = ProviderHttp(NetworkPolicy())
    for url in (f"http://127.0.0.2:{port}/admin", f"http://localhost:{port}/admin"):  # a literal; a name
        with pytest.raises(NotConnected, match="not connecting"):
            await _post(closed, url)
    assert sink.requests == []
    allowed = ProviderHttp(NetworkPolicy(["127.0.0.0/8"]))
    assert (await _post(allowed, f"{sink.url}/messages")).status == 200
    assert sink.requests == ["POST /messages {}"]
    await allowed.close()


async def _post(http: ProviderHttp, url: str) -> Answer:
    return await http.post(
        url, b"{}", content_type="application/json", headers={}, connect_timeout=2, answer_timeout=2
    )


async def test_a_redirecting_segment_endpoint_fails_and_nothing_follows_the_redirect(
    platform: Platform, sink: Recorder
) -> None:
    redirector = Recorder(location=f"{sink.url}/v1/batch")
    await redirector.start()
    try:
        tag = uuid.uuid4().hex[:8]
        await platform.segmentation.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-{i}", cohort=tag) for i in range(3)])
        )
        segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
        destination = await create_segment_destination(platform, redirector.url, f"wk_{tag}")
        created = await platform.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(
                campaign=segment_export_campaign(segment.name, destination.name)
            )
        )
        await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        stats = await completed_stats(platform, created.name)
        assert (stats.sent, stats.failed) == (0, 3)
        assert [r.reason for r in stats.failure_reasons] == ["Segment answered 307"]
        assert len(redirector.requests) == 1 and f"wk_{tag}" in redirector.requests[0]
        assert sink.requests == []  # the write key never went where the redirect pointed
    finally:
        await redirector.stop()
