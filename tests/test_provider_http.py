"""The SMS client against a server that answers with exact bytes: every framing a provider may use
is read whole, connections are reused only when that is safe, and each way a request can end
says whether the message may have arrived (that decides whether it is ever sent again)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlencode

import pytest
import uvloop

from herald_common.embedded import free_port
from herald_common.netguard import NetworkPolicy
from herald_dispatch.provider_http import (
    MAX_BODY_BYTES,
    Answer,
    AnswerLost,
    NotConnected,
    ProviderHttp,
    Withheld,
    form_body,
)

# What the server does with each request it has read whole: the bytes it answers with (None:
# it closes the connection without answering; "" : it never answers).
Script = Callable[[bytes], bytes | str | None]


class ScriptedServer:
    """Reads requests (head and Content-Length body) and answers each as `script` says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.close_after_answer = False
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.script(request)
                if answer is None:
                    break
                if answer == "":
                    await asyncio.sleep(3600)
                assert isinstance(answer, bytes)
                writer.write(answer)
                await writer.drain()
                lower = answer.lower()
                delimited = b"content-length" in lower or b"chunked" in lower or b" 204 " in lower
                if self.close_after_answer or b"connection: close" in lower or not delimited:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def http() -> AsyncIterator[ProviderHttp]:
    client = ProviderHttp(NetworkPolicy(["127.0.0.0/8"]))
    yield client
    await client.close()


async def _serving(script: Script) -> ScriptedServer:
    server = ScriptedServer(script)
    await server.start()
    return server


async def _post(http: ProviderHttp, url: str, **options: float) -> Answer:
    return await http.post(
        url + "/2010-04-01/Messages.json?x=1",
        b"To=%2B14155550100&Body=Hi",
        content_type="application/x-www-form-urlencoded",
        headers={"Authorization": "Basic QUM6dA==", "Accept": "application/json"},
        connect_timeout=options.get("connect_timeout", 2.0),
        answer_timeout=options.get("answer_timeout", 2.0),
        write_until=options.get("write_until", float("inf")),
    )


def _json(status: str, body: bytes, *extra: bytes) -> bytes:
    head = [f"HTTP/1.1 {status}".encode(), b"Content-Type: application/json; charset=utf-8", *extra]
    return b"\r\n".join([*head, b"Content-Length: %d" % len(body), b"", body])


async def test_a_request_carries_its_form_and_keep_alive_connections_are_reused(http: ProviderHttp) -> None:
    server = await _serving(lambda _: _json("201 Created", b'{"sid": "SM1"}'))
    for _ in range(3):
        answer = await _post(http, server.url)
        assert (answer.status, answer.text) == (201, '{"sid": "SM1"}')
    assert server.connections == 1
    head, body = server.requests[0].split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /2010-04-01/Messages.json?x=1 HTTP/1.1"
    assert b"Authorization: Basic QUM6dA==" in lines
    assert [line for line in lines if line.lower().startswith(b"accept:")] == [b"Accept: application/json"]
    assert f"Host: {server.url.removeprefix('http://')}".encode() in lines
    assert body == b"To=%2B14155550100&Body=Hi"
    await server.stop()


async def test_chunked_close_delimited_and_interim_answers_are_read_whole(http: ProviderHttp) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;x=y\r\n{"a"\r\n5\r\n: 1}\n\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    answers = iter(
        [
            chunked,
            b"HTTP/1.1 100 Continue\r\n\r\n" + _json("429 Too Many Requests", b"{}", b"Retry-After: 7"),
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy, try later",
        ]
    )
    server = await _serving(lambda _: next(answers))
    first = await _post(http, server.url)
    assert (first.status, first.text) == (200, '{"a": 1}\n')
    throttled = await _post(http, server.url)
    assert (throttled.status, throttled.headers["retry-after"]) == (429, "7")
    empty = await _post(http, server.url)
    assert (empty.status, empty.text) == (204, "")
    assert server.connections == 1  # chunked, sized and empty answers leave the connection usable
    closed = await _post(http, server.url)
    assert (closed.status, closed.text) == (503, "busy, try later")
    await server.stop()


async def test_a_request_past_its_moment_writes_nothing(http: ProviderHttp) -> None:
    server = await _serving(lambda _: _json("201 Created", b"{}"))
    with pytest.raises(Withheld):
        await _post(http, server.url, write_until=time.monotonic() - 0.001)
    assert (await _post(http, server.url)).status == 201
    assert len(server.requests) == 1  # only the second
    await server.stop()


async def test_no_connection_means_nothing_was_sent(http: ProviderHttp) -> None:
    with pytest.raises(NotConnected):
        await _post(http, f"http://127.0.0.1:{free_port()}")


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(None, id="closed without an answer"),
        pytest.param("", id="never answered"),
        pytest.param(b"HTTP/1.1 201 Created\r\nContent-Length: 50\r\n\r\n{}", id="closed mid-answer"),
        pytest.param(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\n{}", id="closed mid-chunk"
        ),
        pytest.param(b"SMTP ready\r\n\r\n", id="not HTTP"),
        pytest.param(_json("200 OK", b"x" * (MAX_BODY_BYTES + 1)), id="too large"),
    ],
)
async def test_a_written_request_without_a_whole_answer_may_have_arrived(
    http: ProviderHttp, answer: bytes | str | None
) -> None:
    server = await _serving(lambda _: answer)
    server.close_after_answer = True  # what was sent is all there is
    started = time.monotonic()
    with pytest.raises(AnswerLost):
        await _post(http, server.url, answer_timeout=0.5)
    assert time.monotonic() - started < 5
    assert len(server.requests) == 1
    await server.stop()


async def test_a_connection_the_provider_closed_while_idle_is_not_written_to(http: ProviderHttp) -> None:
    server = await _serving(lambda _: _json("201 Created", b"{}"))
    server.close_after_answer = True  # a provider that drops idle connections at once
    for _ in range(3):
        assert (await _post(http, server.url)).status == 201
        await asyncio.sleep(0.05)
    assert server.connections == 3
    await server.stop()


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(http: ProviderHttp) -> None:
    server = await _serving(lambda _: _json("201 Created", b"{}"))
    with pytest.raises(ValueError, match="header"):
        await http.post(
            server.url,
            b"",
            content_type="application/json",
            headers={"Authorization": "Basic x\r\nX-Injected: 1"},
            connect_timeout=2,
            answer_timeout=2,
        )
    assert server.requests == []
    await server.stop()


async def test_the_client_works_on_the_event_loop_the_services_run_on() -> None:
    """The services run on uvloop, whose transports and sockets differ from asyncio's own."""

    async def scenario() -> None:
        answers = iter(
            [
                _json("201 Created", b'{"sid": "SM1"}'),
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                None,
            ]
        )
        server = await _serving(lambda _: next(answers))
        client = ProviderHttp(NetworkPolicy(["127.0.0.0/8"]))
        assert (await _post(client, server.url)).text == '{"sid": "SM1"}'
        assert (await _post(client, server.url)).text == "ok"
        with pytest.raises(AnswerLost):
            await _post(client, server.url)
        with pytest.raises(Withheld):
            await _post(client, server.url, write_until=0.0)
        with pytest.raises(NotConnected):
            await _post(client, f"http://127.0.0.1:{free_port()}")
        assert len(server.requests) == 3  # nothing from the withheld one
        assert server.connections == 2  # one reused for two answers; one for the third request
        await client.close()
        await server.stop()

    await asyncio.to_thread(uvloop.run, scenario())


def test_a_form_is_encoded_as_urllib_encodes_it() -> None:
    texts = [
        "+14155550100",
        "Hi Ada, 50% off: a&b=c /path?q ~_.- today!",
        "नमस्ते 🎉 ünïcödé\nnew line\ttab",
        "".join(chr(c) for c in range(1, 256)),
        "",
    ]
    for text in texts:
        form = {"To": "+14155550100", "Body": text, "Status Callback": "https://x.example/r?a=1&b=2"}
        assert form_body(form) == urlencode(form).encode()
