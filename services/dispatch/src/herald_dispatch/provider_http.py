"""The HTTP/1.1 client SMS messages are posted through: keep-alive connections, one request on a
connection at a time, and nothing more. One message is one request, so the client's own cost per
request is most of what an SMS costs dispatch; a general client (redirects, cookies, compression,
streaming) spends about five times as much CPU per request as this one.

Every way a request can end says whether its bytes may have reached the provider, because a
message that may have arrived is never sent again:
- `NotConnected`: no connection was made (the name did not resolve, every address was refused by
  the network policy or by the host, the TLS handshake failed, connecting took too long);
- `Withheld`: the request was due no later than a moment that had passed when it was about to be
  written, and nothing was written;
- `AnswerLost`: it was written, and no complete answer came (closed, reset, too slow, too large,
  not HTTP): it may have been processed.

Addresses are checked on every connection at the address actually connected to, as the
network policy requires. Limits: an answer's head up to 64 KiB, its body up to 1 MiB; idle
connections are dropped after KEEPALIVE_SECONDS.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
import ssl
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from herald_common.netguard import NetworkPolicy

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
# An idle connection is not reused after this long: the provider may be closing it as it is
# written to, and such a request would end with no answer (so, unknown).
KEEPALIVE_SECONDS = 10.0
_IDLE_PER_HOST = 128
# How often requests under way are checked against their answer timeout: so late, at most, is one
# that is overdue found out.
DEADLINE_CHECK_SECONDS = 0.05
# Request heads kept ready, by URL and headers: more than the destinations one process sends to.
_PREPARED_HEADS = 1024


class NotConnected(Exception):
    """No connection was made: nothing was sent."""


class Withheld(Exception):
    """The request's moment had passed before it was written: nothing was sent."""


class AnswerLost(Exception):
    """The request was written and no complete answer came: it may have been processed."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # names in lower case; a repeated header keeps its last value
    text: str


class RequestObserver(Protocol):
    """Told of each request (for metrics and trace spans): `started` before a connection is taken,
    then `ended` with the answer's status or `failed`."""

    def started(self, method: str, url: str) -> Any: ...

    def ended(self, token: Any, status: int) -> None: ...

    def failed(self, token: Any, error: BaseException) -> None: ...


class _Connection(asyncio.Protocol):
    """One connection, and the answer to the request last written on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self._buffer = bytearray()
        self._answer: asyncio.Future[Answer] | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._keep_alive = True
        self._chunks: bytearray | None = None  # a chunked body read so far

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without subclassing it

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self._fail(AnswerLost("the provider sent bytes nobody asked for"))
            return
        self._buffer += data
        try:
            self._parse()
        except AnswerLost as error:
            self._fail(error)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, error: Exception | None) -> None:
        self.closed = True
        answer = self._answer
        if answer is not None and not answer.done():
            if self._head is not None and self._until_close():
                answer.set_result(self._answered(bytes(self._buffer)))
            else:
                reason = (
                    f"connection closed before a complete answer ({type(error).__name__ if error else 'EOF'})"
                )
                answer.set_exception(AnswerLost(reason))

    # requests

    def send(self, request: bytes, write_until: float) -> asyncio.Future[Answer]:
        """Writes the request, unless `write_until` has passed (then nothing is written)."""
        assert self.transport is not None
        if time.monotonic() > write_until:  # no wait between this and the write
            raise Withheld("its moment passed before it was written")
        self._answer = asyncio.get_running_loop().create_future()
        self._head, self._chunks, self._keep_alive = None, None, True
        self._buffer.clear()
        self.transport.write(request)
        return self._answer

    def too_slow(self, within: float) -> None:
        """The answer did not come within `within` seconds of the request."""
        self._fail(AnswerLost(f"no answer within {within:g} s"))

    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive and time.monotonic() - self.idle_since < KEEPALIVE_SECONDS

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        self.close()

    # parsing

    def _parse(self) -> None:
        while self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise AnswerLost(f"an answer head over {MAX_HEAD_BYTES} bytes")
                return
            status, headers = _parse_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
            if 100 <= status < 200:  # an interim answer: the final one follows
                continue
            self._head = (status, headers)
            connection = headers.get("connection", "").lower()
            self._keep_alive = "close" not in connection and headers.get(":version") != "HTTP/1.0"
        status, headers = self._head
        assert self._answer is not None
        if status in (204, 304):  # never a body, whatever the headers say
            self._answer.set_result(self._answered(b""))
            return
        if _chunked(headers):
            body = self._read_chunks()
            if body is not None:
                self._answer.set_result(self._answered(body))
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                raise AnswerLost(f"an answer of {length!r} bytes")
            if len(self._buffer) >= int(length):
                body = bytes(self._buffer[: int(length)])
                if len(self._buffer) > int(length):  # more than was asked for: not used again
                    self._keep_alive = False
                self._buffer.clear()
                self._answer.set_result(self._answered(body))
            return
        if len(self._buffer) > MAX_BODY_BYTES:
            raise AnswerLost(f"an answer over {MAX_BODY_BYTES} bytes")
        self._keep_alive = False  # the body runs until the connection closes

    def _until_close(self) -> bool:
        assert self._head is not None
        headers = self._head[1]
        return "content-length" not in headers and not _chunked(headers)

    def _read_chunks(self) -> bytes | None:
        """The whole chunked body once it has arrived, else None (the rest is awaited)."""
        if self._chunks is None:
            self._chunks = bytearray()
        while True:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                return None
            size_field = bytes(self._buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise AnswerLost("a malformed chunk size") from None
            if size == 0:  # the last chunk, then trailers up to an empty line
                trailers_end = self._buffer.find(b"\r\n\r\n", line_end)
                if self._buffer[line_end : line_end + 4] == b"\r\n\r\n":
                    trailers_end = line_end
                if trailers_end < 0:
                    return None
                del self._buffer[: trailers_end + 4]
                return bytes(self._chunks)
            if len(self._chunks) + size > MAX_BODY_BYTES:
                raise AnswerLost(f"an answer over {MAX_BODY_BYTES} bytes")
            if len(self._buffer) < line_end + 2 + size + 2:
                return None
            self._chunks += self._buffer[line_end + 2 : line_end + 2 + size]
            del self._buffer[: line_end + 2 + size + 2]

    def _answered(self, body: bytes) -> Answer:
        assert self._head is not None
        status, headers = self._head
        self.idle_since = time.monotonic()
        return Answer(
            status, headers, body.decode(_charset(headers.get("content-type", "")), errors="replace")
        )


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise AnswerLost(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers = {":version": version}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise AnswerLost("a malformed answer header")
        headers[name.strip().lower()] = value.strip()
    return int(code), headers


def _chunked(headers: Mapping[str, str]) -> bool:
    return "chunked" in headers.get("transfer-encoding", "").lower()


@functools.lru_cache(maxsize=64)
def _charset(content_type: str) -> str:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset":
            value = value.strip('"')
            try:
                "".encode(value)
            except LookupError:
                return "utf-8"
            return value
    return "utf-8"


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str  # with its query
    host_header: str


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotConnected(f"not an http(s) URL: {url[:100]!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise NotConnected("an invalid port") from None
    host = parts.hostname
    ascii_host = host.encode("idna").decode() if not host.isascii() else host
    shown = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    default = port == (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(parts.scheme, ascii_host, port, path, shown if default else f"{shown}:{port}")


def _head(target: _Target, headers: Mapping[str, str], content_type: str) -> bytes:
    """The request's head but its length: the caller's headers over the defaults, the body's type ours."""
    given = {name.lower(): (name, value) for name, value in headers.items()}
    given.pop("content-type", None)
    given.pop("content-length", None)
    given.pop("host", None)
    defaults = {"user-agent": ("User-Agent", "Herald"), "accept": ("Accept", "*/*")}
    lines = [f"POST {target.path} HTTP/1.1", f"Host: {target.host_header}"]
    for name, value in {**defaults, **given}.values():
        if any(c in name + value for c in "\r\n\x00") or ":" in name:
            raise ValueError(f"the header {name[:40]!r} holds a character a header may not")
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


# application/x-www-form-urlencoded as urllib's urlencode writes it (quote_plus: nothing left as it
# is but letters, digits and _.-~), by a table lookup per byte rather than a Python call per byte.
_FORM_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_FORM_ESCAPES = {b: ("+" if b == 0x20 else f"%{b:02X}") for b in range(256) if chr(b) not in _FORM_SAFE}


def _form_quote(value: str) -> str:
    return value.encode("utf-8").decode("latin-1").translate(_FORM_ESCAPES)


# The names of a provider's form, and the values it gives every message of a destination (the
# sender, the callback URL): encoded once. A recipient's phone and text are not kept.
_form_quote_repeated = functools.lru_cache(maxsize=1024)(_form_quote)


def form_body(form: Mapping[str, str], repeated: Collection[str] = ()) -> bytes:
    """`form` encoded as an HTML form's POST body; the values of the fields named `repeated` are the
    same for many requests."""
    return "&".join(
        f"{_form_quote_repeated(k)}={_form_quote_repeated(v) if k in repeated else _form_quote(v)}"
        for k, v in form.items()
    ).encode("ascii")


class ProviderHttp:
    """Keep-alive connections to providers, by scheme, host and port. Callers bound how many
    requests are made at once (a connection per request under way)."""

    def __init__(self, policy: NetworkPolicy, observers: Sequence[RequestObserver] = ()) -> None:
        self.policy = policy
        self.observers = list(observers)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._tls = ssl.create_default_context()
        self._heads: dict[tuple[object, ...], tuple[_Target, bytes]] = {}
        # Connections awaiting an answer: (by when, the timeout), looked over by one timer.
        self._awaiting: dict[_Connection, tuple[float, float]] = {}
        self._watching: asyncio.TimerHandle | None = None

    async def post(
        self,
        url: str,
        body: bytes,
        *,
        content_type: str,
        headers: Mapping[str, str],
        connect_timeout: float,
        answer_timeout: float,
        write_until: float = float("inf"),
    ) -> Answer:
        """POSTs `body` and returns the answer; raises NotConnected, Withheld or AnswerLost (see
        the module's notes), or ValueError for a header that cannot be sent."""
        target, head = self._prepared(url, headers, content_type)
        request = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        tokens = [observer.started("POST", url) for observer in self.observers]
        try:
            answer = await self._exchange(target, request, connect_timeout, answer_timeout, write_until)
        except BaseException as error:
            for observer, token in zip(self.observers, tokens, strict=True):
                observer.failed(token, error)
            raise
        for observer, token in zip(self.observers, tokens, strict=True):
            observer.ended(token, answer.status)
        return answer

    def _prepared(self, url: str, headers: Mapping[str, str], content_type: str) -> tuple[_Target, bytes]:
        """Where `url` leads and the head of a request to it: made once for each destination's
        requests, which repeat the same URL and headers."""
        key = (url, content_type, *headers.items())
        prepared = self._heads.get(key)
        if prepared is None:
            target = _target(url)
            prepared = target, _head(target, headers, content_type)
            if len(self._heads) >= _PREPARED_HEADS:
                self._heads.clear()
            self._heads[key] = prepared
        return prepared

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def _exchange(
        self,
        target: _Target,
        request: bytes,
        connect_timeout: float,
        answer_timeout: float,
        write_until: float,
    ) -> Answer:
        key = (target.scheme, target.host, target.port)
        connection = self._pooled(key) or await self._connect(target, connect_timeout)
        try:
            answered = connection.send(request, write_until)
        except Withheld:
            self._release(key, connection)  # nothing was written: it stays usable
            raise
        self._awaiting[connection] = (time.monotonic() + answer_timeout, answer_timeout)
        if self._watching is None:
            self._watch_deadlines()
        try:
            answer = await answered
        except BaseException:
            connection.close()
            raise
        finally:
            del self._awaiting[connection]
        self._release(key, connection)
        return answer

    def _check_deadlines(self) -> None:
        """Fails the requests whose answer is overdue. One timer for every request under way:
        a timer of its own (armed, then cancelled) costs a request more than the rest of its work."""
        now = time.monotonic()
        for connection, (answer_by, within) in list(self._awaiting.items()):
            if now > answer_by:
                connection.too_slow(within)
        self._watching = None
        if self._awaiting:
            self._watch_deadlines()

    def _watch_deadlines(self) -> None:
        loop = asyncio.get_running_loop()
        self._watching = loop.call_later(DEADLINE_CHECK_SECONDS, self._check_deadlines)

    def _pooled(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.reusable:
                return connection
            connection.close()
        return None

    def _release(self, key: tuple[str, str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if connection.reusable and len(idle) < _IDLE_PER_HOST:
            idle.append(connection)
        else:
            connection.close()

    async def _connect(self, target: _Target, within: float) -> _Connection:
        try:
            async with asyncio.timeout(within):
                return await self._open(target)
        except TimeoutError:
            raise NotConnected(f"no connection to {target.host} within {within:g} s") from None
        except OSError as error:  # refused, unreachable, not resolvable, a failed TLS handshake
            raise NotConnected(f"no connection to {target.host}: {error}") from None

    async def _open(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        failures: list[str] = []
        for family, kind, protocol, _, address in infos:
            problem = self.policy.address_problem(str(address[0]))
            if problem is not None:
                failures.append(f"not connecting: {problem}")
                continue
            sock = socket.socket(family=family, type=kind, proto=protocol)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = target.scheme == "https"
                _, connection = await loop.create_connection(
                    _Connection,
                    sock=sock,
                    ssl=self._tls if tls else None,
                    server_hostname=target.host if tls else None,
                )
            except BaseException as error:
                sock.close()
                if not isinstance(error, OSError):
                    raise
                failures.append(f"{address[0]}: {error}")
                continue
            return connection
        raise OSError(errno.ECONNREFUSED, "; ".join(failures) or "no address")
