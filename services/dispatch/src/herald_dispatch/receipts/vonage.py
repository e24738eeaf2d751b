"""Vonage's delivery receipts and inbound messages.

Signed callbacks carry `timestamp`, `nonce` and `sig` (enable signing with a signature secret in
the Vonage dashboard). `sig` is a hex digest of `&name=value` for every other parameter in name
order (`&` and `=` in values as `_`), by one of the methods Vonage's libraries offer: HMAC-MD5,
HMAC-SHA1, HMAC-SHA256 or HMAC-SHA512 keyed by the signature secret, or the legacy MD5 hash of
the same text followed by the secret. Every one of them is accepted; the digest's length tells
SHA1, SHA256 and SHA512 apart, and both MD5 forms are tried. Without a signature secret, callbacks
come to a URL with a secret token derived from the API secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald_dispatch.receipts.callbacks import Body, Receipt, Reply

STATUSES = {"delivered": "delivered", "expired": "undelivered", "rejected": "failed", "failed": "failed"}
Digest = Callable[[str, str], str]


def _signed_text(params: Mapping[str, str]) -> str:
    return "".join(
        f"&{key}={value.replace('&', '_').replace('=', '_')}"
        for key, value in sorted(params.items())
        if key != "sig"
    )


def _hmac(algorithm: str) -> Digest:
    def digest(secret: str, text: str) -> str:
        return hmac.new(secret.encode(), text.encode(), algorithm).hexdigest()

    return digest


def _md5_hash(secret: str, text: str) -> str:
    return hashlib.md5((text + secret).encode()).hexdigest()


# Signing methods by the length of their hex digest.
METHODS: dict[str, Digest] = {
    "md5hash": _md5_hash,
    "md5": _hmac("md5"),
    "sha1": _hmac("sha1"),
    "sha256": _hmac("sha256"),
    "sha512": _hmac("sha512"),
}
_BY_LENGTH = {32: ("md5hash", "md5"), 40: ("sha1",), 64: ("sha256",), 128: ("sha512",)}


def signature(secret: str, params: Mapping[str, str], method: str = "md5hash") -> str:
    return METHODS[method](secret, _signed_text(params))


def verifies(secret: str, params: Mapping[str, str]) -> bool:
    given = params.get("sig", "").lower()
    text = _signed_text(params)
    return any(
        hmac.compare_digest(METHODS[method](secret, text), given) for method in _BY_LENGTH.get(len(given), ())
    )


class VonageCallbacks:
    kind = "vonage"
    takes_replies = True

    def path_secret(self, destination: pb.Destination) -> str | None:
        return None if destination.vonage.signature_secret else destination.vonage.api_secret

    def signed(self, destination: pb.Destination, url: str, headers: Mapping[str, str], body: Body) -> bool:
        return verifies(destination.vonage.signature_secret, body.params)

    def receipts(self, body: Body) -> list[Receipt]:
        status = STATUSES.get(body.params.get("status", ""))
        if not status:
            return []
        code = body.params.get("err-code", "0")
        error = f"vonage {code}" if code not in ("", "0") else ""
        return [Receipt(body.params.get("messageId", ""), status, error)]

    def reply(self, body: Body) -> Reply | None:
        msisdn = body.params.get("msisdn", "")
        return Reply("+" + msisdn.lstrip("+"), body.params.get("text", "")) if msisdn else None
