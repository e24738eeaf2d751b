"""Exotel's SMS status callbacks: form-encoded, unsigned, to a URL with a secret token derived from
the API token. Exotel calls once a message reaches a final state: `sent` (delivered to the
handset), `failed`, or `failed_dnd` (the number is on India's do-not-call registry); each with a
DetailedStatus and DetailedStatusCode (20000 DELIVERED_TO_HANDSET; 3xxxx say why it failed)."""

from __future__ import annotations

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald_dispatch.receipts.callbacks import Body, Receipt, Unsigned

STATUSES = {
    "sent": "delivered",
    "delivered": "delivered",
    "failed": "failed",
    "failed_dnd": "failed",
    "undelivered": "undelivered",
    "expired": "undelivered",
}
# Detailed codes that are progress, not a final state, whatever the status says.
IN_PROGRESS_CODES = {"20001", "20002"}  # delivered to the operator, submitted to the carrier


class ExotelCallbacks(Unsigned):
    kind = "exotel"

    def path_secret(self, destination: pb.Destination) -> str | None:
        return destination.exotel.api_token

    def receipts(self, body: Body) -> list[Receipt]:
        raw = body.params.get("Status", "").lower()
        status = STATUSES.get(raw)
        code = body.params.get("DetailedStatusCode", "")
        if not status or code in IN_PROGRESS_CODES:
            return []
        error = ""
        if status != "delivered":
            error = "exotel " + (f"{raw} {code}" if raw == "failed_dnd" else code or raw).strip()
        return [Receipt(body.params.get("SmsSid", ""), status, error)]
