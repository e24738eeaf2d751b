"""Where destinations may send: public https endpoints, and private networks only when allowed.

A destination URL is user input that the platform then calls; without this, it could be pointed at
the cloud metadata service or an internal admin port. Addresses are checked when a destination is
saved and again on every connection, so a name that later resolves elsewhere is refused too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetworkPolicy:
    def __init__(self, allowed_networks: Iterable[str] = ()) -> None:
        self.allowed: list[IpNetwork] = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def _allowed_private(self, address: IpAddress) -> bool:
        return any(address in network for network in self.allowed)

    def address_problem(self, address: str) -> str | None:
        """Why the destination may not be called at `address`, or None."""
        ip = ipaddress.ip_address(address.split("%")[0])
        if self._allowed_private(ip):
            return None
        if not ip.is_global or ip.is_multicast:
            return f"{ip} is a private, loopback, link-local or reserved address"
        return None

    async def url_problem(self, url: str) -> str | None:
        """Why `url` cannot be a destination endpoint, or None when it can."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "must be an https URL"
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return "has an invalid port"
        try:
            addresses = await _resolve(parts.hostname, port)
        except OSError:
            # Not resolvable from here now; every connection is checked again when it is made.
            addresses = []
        for address in addresses:
            problem = self.address_problem(address)
            if problem:
                return problem
        if parts.scheme == "http" and not (
            addresses and all(self._allowed_private(ipaddress.ip_address(a.split("%")[0])) for a in addresses)
        ):
            return "must use https"
        return None

    def connector(self, **options: Any) -> aiohttp.TCPConnector:
        """A connector that refuses disallowed addresses at connection time."""
        return aiohttp.TCPConnector(resolver=_GuardedResolver(self), **options)


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class _GuardedResolver(AbstractResolver):
    def __init__(self, policy: NetworkPolicy) -> None:
        self.policy = policy
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        allowed = [r for r in results if self.policy.address_problem(r["host"]) is None]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses destinations may not use")
        return allowed

    async def close(self) -> None:
        await self.inner.close()
