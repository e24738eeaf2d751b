"""Twilio's status callbacks and inbound messages: form-encoded, signed with X-Twilio-Signature
(base64 HMAC-SHA1, keyed by the auth token, of the full URL followed by every POST parameter's
name and value in name order)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald_dispatch.receipts.callbacks import Body, Receipt, Reply

# Final statuses; the others (queued, sending, sent, accepted, ...) are progress.
STATUSES = {"delivered": "delivered", "undelivered": "undelivered", "failed": "failed"}


def signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    payload = url + "".join(f"{key}{value}" for key, value in sorted(params.items()))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class TwilioCallbacks:
    kind = "twilio"
    takes_replies = True

    def path_secret(self, destination: pb.Destination) -> str | None:
        return None

    def signed(self, destination: pb.Destination, url: str, headers: Mapping[str, str], body: Body) -> bool:
        expected = signature(destination.twilio.auth_token, url, body.params)
        return hmac.compare_digest(expected, headers.get("X-Twilio-Signature", ""))

    def receipts(self, body: Body) -> list[Receipt]:
        status = STATUSES.get(body.params.get("MessageStatus", ""))
        if not status:
            return []
        code = body.params.get("ErrorCode", "")
        return [Receipt(body.params.get("MessageSid", ""), status, f"twilio {code}" if code else "")]

    def reply(self, body: Body) -> Reply | None:
        return Reply(body.params.get("From", ""), body.params.get("Body", ""))
