"""A local stand-in for MSG91's flow API, faithful to what is documented of it:

- POST /api/v5/flow with the `authkey` header and a JSON body: `template_id`, `sender`,
  `short_url`, optional `route` and `unicode`, and `recipients` (each with `mobiles`, digits
  without `+`, and the template's variables by their exact, case-sensitive names);
- `{"type": "success", "message": <request id>}` when accepted;
- `{"type": "error", "message": ...}` with 401 for an unknown authkey, 418 for a caller whose IP
  is not whitelisted (on demand), and 400 for an unknown template or a missing variable;
- no de-duplication;
- delivery reports to the webhook set in its panel (`webhook_url`), unsigned, per request id:
  version 2 form-encoded with the reports as a JSON string in `data`, version 3 the same as JSON;
  each `report` entry carries the number, `status` (1 delivered, 16 rejected for the numbers told
  so) and `desc`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from herald_sandbox import LocalServer

NUMBER = re.compile(r"^[1-9]\d{6,14}$")


@dataclass
class Msg91Message:
    request_id: str
    mobiles: str
    variables: dict[str, str]
    sender: str
    unicode: bool


@dataclass
class Msg91Api(LocalServer):
    authkey: str
    # Flow templates by id, with the variables each needs.
    templates: dict[str, set[str]]
    ip_whitelisted: bool = True
    messages: list[Msg91Message] = field(default_factory=list)
    # The delivery-report webhook as set in the panel ('' for none), and its version (2 or 3).
    webhook_url: str = ""
    webhook_version: int = 2
    # Numbers (digits) whose messages the operator rejects.
    failing: set[str] = field(default_factory=set)
    webhook_answers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        LocalServer.__init__(self)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/v5/flow", self._flow)
        return await self.serve(app)

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"type": "error", "message": message}, status=status)

    async def _flow(self, request: web.Request) -> web.Response:
        if request.headers.get("authkey") != self.authkey:
            return self._error(401, "Authentication failure")
        if not self.ip_whitelisted:
            return self._error(418, "IP not whitelisted")
        body: Any = await request.json()
        template = self.templates.get(str(body.get("template_id", "")))
        if template is None:
            return self._error(400, "Invalid template id")
        recipients = body.get("recipients") or []
        for recipient in recipients:
            mobiles = str(recipient.get("mobiles", ""))
            missing = template - set(recipient)
            if not NUMBER.match(mobiles) or missing:
                return self._error(400, f"Invalid mobile or missing variables {sorted(missing)}")
        request_id = uuid.uuid4().hex[:24]
        for recipient in recipients:
            variables = {k: str(v) for k, v in recipient.items() if k != "mobiles"}
            self.messages.append(
                Msg91Message(
                    request_id,
                    str(recipient["mobiles"]),
                    variables,
                    str(body.get("sender", "")),
                    body.get("unicode") == "1",
                )
            )
        if self.webhook_url:
            self.in_background(self._report(request_id, [str(r["mobiles"]) for r in recipients]))
        return web.json_response({"type": "success", "message": request_id})

    async def _report(self, request_id: str, numbers: list[str]) -> None:
        report = [
            {
                "date": "2026-11-23 12:00:00",
                "number": number,
                "status": "16" if number in self.failing else "1",
                "desc": "REJECTED" if number in self.failing else "DELIVERED",
            }
            for number in numbers
        ]
        reports = [{"senderId": "HRLDIN", "requestId": request_id, "report": report, "userId": "1"}]
        async with aiohttp.ClientSession() as http:
            if self.webhook_version == 3:
                answer = await http.post(self.webhook_url, json=reports)
            else:
                answer = await http.post(self.webhook_url, data={"data": json.dumps(reports)})
            self.webhook_answers.append(answer.status)
            answer.release()
