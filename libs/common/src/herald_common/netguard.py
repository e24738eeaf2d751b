"""Where destinations may send: public https endpoints, and private networks only when allowed.

A destination URL is user input that the platform then calls; without this, it could be pointed at
the cloud metadata service or an internal admin port. Addresses are checked when a destination is
saved, and on every connection at the address actually connected to (after DNS, for IP literals
too), so a name that later resolves elsewhere is refused. An IPv6 address that carries an IPv4
one (IPv4-mapped, NAT64, 6to4) is judged by that IPv4 address as well. Redirects are never
followed: each caller passes `allow_redirects=False`, and a redirect is an answer like any other.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64 prefixes (RFC 6052's well-known one and RFC 8215's local-use one): the last 32 bits are
# the IPv4 address reached.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, where it carries one."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in prefix for prefix in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class NetworkPolicy:
    def __init__(self, allowed_networks: Iterable[str] = ()) -> None:
        self.allowed: list[IpNetwork] = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def _allowed_private(self, address: IpAddress) -> bool:
        return any(address in network for network in self.allowed)

    def address_problem(self, address: str) -> str | None:
        """Why the destination may not be called at `address`, or None."""
        ip = ipaddress.ip_address(address.split("%")[0])
        for candidate in (ip, _embedded_ipv4(ip)):
            if candidate is None or self._allowed_private(candidate):
                continue
            if not candidate.is_global or candidate.is_multicast:
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
        """A connector that refuses, at the moment it connects, any address not allowed."""
        return aiohttp.TCPConnector(socket_factory=self._socket, **options)

    def _socket(self, address_info: tuple[Any, ...]) -> socket.socket:
        family, kind, protocol, _, address = address_info
        problem = self.address_problem(str(address[0]))
        if problem is not None:
            raise OSError(errno.EACCES, f"not connecting: {problem}")
        return socket.socket(family=family, type=kind, proto=protocol)


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})
