"""A local stand-in for MSG91's flow API, faithful to what is documented of it:

- POST /api/v5/flow with the `authkey` header and a JSON body: `template_id`, `sender`,
  `short_url`, optional `route` and `unicode`, and `recipients` (each with `mobiles`, digits
  without `+`, and the template's variables by their exact, case-sensitive names);
- `{"type": "success", "message": <request id>}` when accepted;
- `{"type": "error", "message": ...}` with 401 for an unknown authkey, 418 for a caller whose IP
  is not whitelisted (on demand), and 400 for an unknown template or a missing variable;
- no de-duplication.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import LocalServer

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
        return web.json_response({"type": "success", "message": request_id})
