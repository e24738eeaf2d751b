"""A local stand-in for Netcore's bulk push SMS API, as far as it is documented:

- POST (or GET) /BulkSms/SingleMsgApi with feedid, username, password, To (digits, no `+`), Text
  and senderid as form (or query) parameters, and India's DLT ids as entityid and templateid;
- answers in XML. The schema is not published; this fake answers the shape integrations parse:
  `<RESULT REQID="..."><MID SUBMITDATE="..." ID="1"/></RESULT>` when accepted, and
  `<RESULT><REQUEST-ERROR><ERROR><CODE>..</CODE><DESC>..</DESC></ERROR></REQUEST-ERROR></RESULT>`
  for bad credentials or parameters;
- no de-duplication.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from herald_sandbox import LocalServer

NUMBER = re.compile(r"^[1-9]\d{6,14}$")


@dataclass
class NetcoreMessage:
    request_id: str
    to: str
    sender: str
    text: str
    # The other parameters it came with (entityid, templateid, unicode, ...).
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class NetcoreApi(LocalServer):
    feed_id: str
    username: str
    password: str
    messages: list[NetcoreMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        LocalServer.__init__(self)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/BulkSms/SingleMsgApi", self._send)
        return await self.serve(app)

    @staticmethod
    def _error(code: str, desc: str) -> web.Response:
        error = f"<ERROR><CODE>{code}</CODE><DESC>{desc}</DESC></ERROR>"
        body = f"<RESULT><REQUEST-ERROR>{error}</REQUEST-ERROR></RESULT>"
        return web.Response(text=body, content_type="application/xml")

    async def _send(self, request: web.Request) -> web.Response:
        params = {**request.query, **(await request.post())}
        form = {k: str(v) for k, v in params.items()}
        if (form.get("feedid"), form.get("username"), form.get("password")) != (
            self.feed_id,
            self.username,
            self.password,
        ):
            return self._error("102", "Invalid feedid, username or password")
        to, text, sender = form.get("To", ""), form.get("Text", ""), form.get("senderid", "")
        if not NUMBER.match(to):
            return self._error("109", "Invalid mobile number")
        if not text or not sender:
            return self._error("106", "Text and senderid are required")
        request_id = uuid.uuid4().hex[:20]
        known = ("feedid", "username", "password", "To", "Text", "senderid")
        extra = {k: v for k, v in form.items() if k not in known}
        self.messages.append(NetcoreMessage(request_id, to, sender, text, extra))
        mid = '<MID SUBMITDATE="2026-11-23 12:00:00" ID="1" TAG="" TID="1"/>'
        body = f'<RESULT REQID="{request_id}">{mid}</RESULT>'
        return web.Response(text=body, content_type="application/xml")
