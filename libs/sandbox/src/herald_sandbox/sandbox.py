"""The sandbox: every destination kind's stand-in on one local port, so a newcomer can run each
README example end to end without sending anything off the machine.

One front server (default 127.0.0.1:8097) routes `/<kind>/...` to that kind's stand-in (the same
fakes the tests use: real wire formats, limits, errors and receipts) and records every request in
a journal (`<data dir>/sandbox/requests.jsonl`), which `make sandbox-log` prints. A destination
points at it with `endpoint_url: http://127.0.0.1:8097/<kind>` and the sandbox credentials below.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from herald_sandbox.exotel_api import ExotelApi
from herald_sandbox.mparticle_api import MparticleApi
from herald_sandbox.msg91_api import Msg91Api
from herald_sandbox.netcore_api import NetcoreApi
from herald_sandbox.segment_api import SegmentApi
from herald_sandbox.twilio_api import TwilioApi
from herald_sandbox.vonage_api import VonageApi

DEFAULT_PORT = 8097
# What a destination in the sandbox is configured with (each stand-in checks them, as the real
# API checks real ones).
CREDENTIALS: dict[str, dict[str, str]] = {
    "segment": {"write_key": "sandbox-write-key"},
    "mparticle": {"api_key": "sandbox-key", "api_secret": "sandbox-secret"},
    "twilio": {"account_sid": "AC" + "5a" * 16, "auth_token": "sandbox-auth-token", "from": "+15005550006"},
    "vonage": {"api_key": "sandbox1", "api_secret": "sandbox-secret16", "sender": "Herald"},
    "msg91": {"authkey": "sandbox-authkey", "sender": "HERALD", "flow_template_id": "5a" * 12},
    "exotel": {
        "api_key": "sandbox-key",
        "api_token": "sandbox-token",
        "account_sid": "sandbox",
        "sender": "HERALD",
        "dlt_entity_id": "1" * 19,
    },
    "netcore": {"feed_id": "sandbox", "username": "919000000000", "password": "sandbox", "sender": "HERALD"},
}
# Headers left out of the journal: they carry the credentials.
_SECRET_HEADERS = {"authorization", "authkey"}
MAX_JOURNAL_BODY = 64 * 1024


def _stand_ins() -> dict[str, Any]:
    c = CREDENTIALS
    return {
        "segment": SegmentApi(write_keys={c["segment"]["write_key"]}),
        "mparticle": MparticleApi(c["mparticle"]["api_key"], c["mparticle"]["api_secret"]),
        "twilio": TwilioApi(c["twilio"]["account_sid"], c["twilio"]["auth_token"]),
        "vonage": VonageApi(c["vonage"]["api_key"], c["vonage"]["api_secret"]),
        "msg91": Msg91Api(c["msg91"]["authkey"], templates={c["msg91"]["flow_template_id"]: {"VAR1"}}),
        "exotel": ExotelApi(
            c["exotel"]["api_key"],
            c["exotel"]["api_token"],
            c["exotel"]["account_sid"],
            {c["exotel"]["sender"]},
        ),
        "netcore": NetcoreApi(c["netcore"]["feed_id"], c["netcore"]["username"], c["netcore"]["password"]),
    }


class Sandbox:
    """The stand-ins behind one recording front server."""

    def __init__(self, journal: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.journal = journal
        self.host = host
        self.port = port
        self.stand_ins = _stand_ins()
        self.urls: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    def endpoint(self, kind: str) -> str:
        return f"http://{self.host}:{self.port}/{kind}"

    async def start(self) -> int:
        for kind, stand_in in self.stand_ins.items():
            self.urls[kind] = (await stand_in.start()).rstrip("/")
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self._http = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{kind}/{rest:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self.port

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        base = self.urls.get(kind)
        if base is None:
            return web.json_response(
                {"error": f"no sandbox destination {kind!r}; one of {sorted(self.urls)}"}, status=404
            )
        body = await request.read()
        target = f"{base}/{request.match_info['rest']}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        assert self._http is not None
        async with self._http.request(
            request.method, target, params=request.query, data=body, headers=headers
        ) as answer:
            answered = await answer.read()
            self._record(kind, request, body, answer.status)
            kept = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "retry-after")}
            return web.Response(status=answer.status, body=answered, headers=kept)

    def _record(self, kind: str, request: web.Request, body: bytes, status: int) -> None:
        text = body[:MAX_JOURNAL_BODY].decode("utf-8", "replace")
        try:
            shown: Any = json.loads(text)
        except ValueError:
            shown = text
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "destination": kind,
            "method": request.method,
            "path": "/" + request.match_info["rest"],
            "query": dict(request.query),
            "headers": {k: v for k, v in request.headers.items() if k.lower() not in _SECRET_HEADERS},
            "body": shown,
            "status": status,
        }
        with self.journal.open("a") as journal:
            journal.write(json.dumps(entry) + "\n")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()
        for stand_in in self.stand_ins.values():
            await stand_in.stop()


def journal_path(data_dir: Path) -> Path:
    return data_dir / "sandbox" / "requests.jsonl"


async def _serve(
    data_dir: Path, port: int, ready: Callable[[Sandbox], Awaitable[None]] | None = None
) -> None:
    sandbox = Sandbox(journal_path(data_dir), port=port)
    await sandbox.start()
    print(
        f"Sandbox destinations: http://127.0.0.1:{sandbox.port}/<kind> (journal {sandbox.journal})",
        flush=True,
    )
    if ready is not None:
        await ready(sandbox)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sandbox.stop()


def show_log(data_dir: Path, last: int) -> str:
    """The journal's last `last` requests, one block each, for people."""
    path = journal_path(data_dir)
    if not path.exists():
        return f"no sandbox requests yet ({path} does not exist; start `HERALD_SANDBOX=1 make run`)"
    lines = path.read_text().splitlines()[-last:]
    blocks = []
    for line in lines:
        entry = json.loads(line)
        request = f"{entry['destination']:<9} {entry['method']} {entry['path']}"
        head = f"{entry['time']}  {request}  -> {entry['status']}"
        body = entry["body"] if isinstance(entry["body"], str) else json.dumps(entry["body"], indent=2)
        blocks.append(head + "\n" + "\n".join("    " + b for b in body.splitlines()))
    return "\n".join(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path(".data"))
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--log", action="store_true", help="print the journal instead of serving")
    parser.add_argument("--last", type=int, default=50, help="with --log: how many requests")
    args = parser.parse_args()
    if args.log:
        print(show_log(args.data_dir, args.last))
        return
    uvloop.run(_serve(args.data_dir, args.port))


if __name__ == "__main__":
    main()
