"""MSG91's delivery-report webhook, set in its panel (it takes none per message): unsigned, to a
URL with a secret token derived from the authkey. Version 2 posts a form whose `data` holds the
JSON; versions 3 and 4 post JSON: a list (or one) of requests, each a `requestId` with its
`report` of per-number statuses (or the status fields beside it)."""

from __future__ import annotations

import json

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald_dispatch.receipts.callbacks import Body, Receipt, Unsigned

# DLR status numbers; the others (submitted, pending, ...) are progress.
STATUSES = {
    "1": "delivered",
    "2": "undelivered",
    "9": "failed",  # NDNC: the number is on India's do-not-call registry (promotional)
    "16": "failed",  # rejected
    "17": "failed",  # blocked number
    "25": "failed",  # rejected
}


class Msg91Callbacks(Unsigned):
    kind = "msg91"

    def path_secret(self, destination: pb.Destination) -> str | None:
        return destination.msg91.authkey

    def receipts(self, body: Body) -> list[Receipt]:
        payload = body.document
        if isinstance(payload, dict) and "data" in payload:
            payload = payload["data"]
            if isinstance(payload, str):
                payload = json.loads(payload)  # ValueError: not a report
        found = []
        for request in payload if isinstance(payload, list) else [payload]:
            if not isinstance(request, dict):
                continue
            reports = request.get("report")
            for report in reports if isinstance(reports, list) else [request]:
                code = str(report.get("status", "")) if isinstance(report, dict) else ""
                status = STATUSES.get(code)
                if status:
                    error = f"msg91 {code}" if status != "delivered" else ""
                    found.append(Receipt(str(request.get("requestId", "")), status, error))
        return found
