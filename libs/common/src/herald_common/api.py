"""Helpers for AIP-style APIs: resource names, page tokens, timestamps."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from herald_common import clock
from herald_common.errors import invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}\Z")


def parse_name(name: str, collection: str, field: str = "name") -> str:
    """`{collection}/{id}` → id; a malformed name is INVALID_ARGUMENT on `field`."""
    prefix = f"{collection}/"
    if not name:
        raise invalid(field, f"required: a resource name like {collection}/<id>")
    if not name.startswith(prefix) or not _ID.match(name[len(prefix) :]):
        raise invalid(field, f"must look like {collection}/<id>, got {name!r}")
    return name[len(prefix) :]


def parse_uuid_name(name: str, collection: str, field: str = "name") -> uuid.UUID:
    """Like parse_name, for collections whose ids are server-assigned UUIDs."""
    raw = parse_name(name, collection, field)
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise invalid(field, f"{name!r} is not a valid {collection} name") from None


def parse_run_name(name: str, field: str = "name") -> tuple[uuid.UUID, uuid.UUID]:
    """(campaign id, run id) of `campaigns/{campaign}/runs/{run}`."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "campaigns" or parts[2] != "runs":
        raise invalid(field, "must look like campaigns/<id>/runs/<id>")
    try:
        return uuid.UUID(parts[1]), uuid.UUID(parts[3])
    except ValueError:
        raise invalid(field, f"{name!r} is not a valid run name") from None


def stable_id(namespace: uuid.UUID, name: str) -> str:
    """`str(uuid.uuid5(namespace, name))` without the UUID object: delivery and batch ids are
    made this way for every recipient, so the saving counts, and the ids stay the same."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def is_valid_id(value: str) -> bool:
    return bool(_ID.match(value))


def page_size(requested: int, field: str = "page_size") -> int:
    if requested < 0:
        raise invalid(field, "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(*keys: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(keys)).encode()).decode()


def decode_page_token(token: str, arity: int, field: str = "page_token") -> list[str] | None:
    """The keys a token carries, or None for the first page."""
    if not token:
        return None
    try:
        keys = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, json.JSONDecodeError):
        raise invalid(field, "not a token this API returned") from None
    if not isinstance(keys, list) or len(keys) != arity or not all(isinstance(k, str) for k in keys):
        raise invalid(field, "not a token this API returned")
    return keys


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def optional_timestamp(value: datetime | None) -> Timestamp | None:
    return None if value is None else timestamp(value)


def from_timestamp(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def instant(seconds: int, nanos: int) -> datetime:
    """A Timestamp's fields as a UTC datetime: from_timestamp without the message lookups, for
    hot loops."""
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def utcnow() -> datetime:
    """Now, by the one clock of herald_common.clock (a test may set it)."""
    return clock.now()


MAX_ORIGINS = 20


def web_origin(text: str) -> str | None:
    """A web origin (`https://shop.example.com`, `http://localhost:8000`), lower-cased with a
    default port dropped, as browsers send it in `Origin`; None when it is not one."""
    scheme, sep, rest = text.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https") or not rest or len(text) > 300:
        return None
    host, _, port = rest.lower().partition(":") if not rest.startswith("[") else (rest.lower(), "", "")
    if not host or any(c in rest for c in "/?#@ \\") or not rest.isprintable():
        return None
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        return None
    default = {"http": "80", "https": "443"}[scheme]
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")
