"""Providers' delivery receipts and inbound replies: a small HTTP server (`server`), one module
per provider for its callback format and signature (`twilio`, `vonage`, `exotel`, `msg91`), and
the recording of receipts (`recording`)."""

from herald_dispatch.receipts.recording import apply_receipts
from herald_dispatch.receipts.server import ReceiptServer, receipt_url, reply_url

__all__ = ["ReceiptServer", "apply_receipts", "receipt_url", "reply_url"]
