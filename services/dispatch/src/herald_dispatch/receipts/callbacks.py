"""What each provider's callback module declares: how its requests are authenticated, and what
receipts and replies they carry. The server knows nothing of any provider beyond this."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from herald.dispatch.v1 import dispatch_service_pb2 as pb


@dataclass(frozen=True)
class Body:
    """A callback's body: its parameters as text (form fields, or a JSON object's), and the whole
    parsed document (the JSON value, or the same parameters)."""

    params: Mapping[str, str]
    document: object


@dataclass(frozen=True)
class Receipt:
    message_id: str
    status: str  # delivered, undelivered or failed
    error_code: str


@dataclass(frozen=True)
class Reply:
    """A text a phone sent to one of the account's numbers."""

    phone: str  # E.164
    text: str


class Callbacks(Protocol):
    kind: str  # the destination config's name: twilio, vonage, ...
    # Whether replies (STOP) come to this provider's inbound URL.
    takes_replies: bool

    def path_secret(self, destination: pb.Destination) -> str | None:
        """The secret a URL token derives from, for callbacks that are not signed; None when
        the provider signs them."""
        ...

    def signed(self, destination: pb.Destination, url: str, headers: Mapping[str, str], body: Body) -> bool:
        """Whether a callback's signature verifies (called when `path_secret` is None)."""
        ...

    def receipts(self, body: Body) -> list[Receipt]:
        """The final receipts a callback carries (none for progress such as queued or sent).
        Raises ValueError for a body that is not this provider's callback."""
        ...

    def reply(self, body: Body) -> Reply | None:
        """The reply an inbound callback carries, if any."""
        ...


def path_token(destination: pb.Destination, secret: str) -> str:
    """The secret path part of a callback URL, derived from the destination's own secret (so it
    changes when that secret does) and its name."""
    return hmac.new(secret.encode(), destination.name.encode(), hashlib.sha256).hexdigest()[:32]


class Unsigned:
    """Defaults of a provider whose callbacks come to a secret URL and carry no replies."""

    takes_replies = False

    def signed(self, destination: pb.Destination, url: str, headers: Mapping[str, str], body: Body) -> bool:
        return False

    def reply(self, body: Body) -> Reply | None:
        return None
