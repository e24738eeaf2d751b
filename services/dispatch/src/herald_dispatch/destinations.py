"""Destination configuration: validation, storage, masking of credentials."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald_common import api
from herald_common.db import Database
from herald_common.errors import NotFound, Validator
from herald_common.paging import keyset_page
from herald_dispatch.storage import destinations

TYPE_NAMES = {pb.DestinationType.DESTINATION_TYPE_SEGMENT: "segment"}
_CONFIG_TYPES = {"segment": pb.DestinationType.DESTINATION_TYPE_SEGMENT}


def _valid_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _mask(secret: str) -> str:
    return "*" * max(len(secret) - 4, 4) + secret[-4:] if len(secret) > 4 else "****"


def _validate(destination: pb.Destination, check: Validator) -> None:
    check.require(bool(destination.display_name.strip()), "destination.display_name", "required")
    config = destination.WhichOneof("config")
    if not check.require(
        config is not None, "destination.config", "exactly one destination config is required"
    ):
        return
    if config == "segment":
        segment = destination.segment
        check.require(bool(segment.write_key.strip()), "destination.segment.write_key", "required")
        check.require(
            _valid_http_url(segment.endpoint_url),
            "destination.segment.endpoint_url",
            "required: an http or https URL",
        )


def _message(row: Any, *, reveal_secrets: bool) -> pb.Destination:
    destination = pb.Destination.FromString(row.config)
    destination.name = f"destinations/{row.id}"
    destination.create_time.CopyFrom(api.timestamp(row.created_at))
    if not reveal_secrets and destination.HasField("segment"):
        destination.segment.write_key = _mask(destination.segment.write_key)
    return destination


class Destinations:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def create(self, destination: pb.Destination, request_id: str) -> pb.Destination:
        check = Validator()
        _validate(destination, check)
        check.require(len(request_id) <= 200, "request_id", "at most 200 characters")
        check.raise_if_any()
        config_name = destination.WhichOneof("config") or ""
        stored = pb.Destination()
        stored.CopyFrom(destination)
        stored.ClearField("name")
        stored.ClearField("create_time")
        stored.display_name = destination.display_name.strip()
        stored.type = _CONFIG_TYPES[config_name]
        async with self.database.transaction() as session:
            statement = (
                insert(destinations)
                .values(
                    id=uuid.uuid4(),
                    display_name=stored.display_name,
                    type=config_name,
                    config=stored.SerializeToString(),
                    request_id=request_id or None,
                )
                .on_conflict_do_nothing(index_elements=[destinations.c.request_id])
                .returning(*destinations.c)
            )
            row = (await session.execute(statement)).first()
            if row is None:  # the same request_id created it before
                row = (
                    await session.execute(
                        sa.select(destinations).where(destinations.c.request_id == request_id)
                    )
                ).one()
        return _message(row, reveal_secrets=False)

    async def get(self, name: str) -> pb.Destination:
        return await self.load(name, "name", reveal_secrets=False)

    async def load(self, name: str, field: str, *, reveal_secrets: bool) -> pb.Destination:
        destination_id = api.parse_uuid_name(name, "destinations", field)
        async with self.database.transaction() as session:
            row = (
                await session.execute(sa.select(destinations).where(destinations.c.id == destination_id))
            ).first()
        if row is None:
            raise NotFound(name, field)
        return _message(row, reveal_secrets=reveal_secrets)

    async def load_many(self, names: set[str]) -> dict[str, pb.Destination]:
        """Destinations with credentials, for workers; unknown or malformed names are left out."""
        ids = []
        for name in names:
            try:
                ids.append(api.parse_uuid_name(name, "destinations"))
            except Exception:
                continue
        if not ids:
            return {}
        async with self.database.transaction() as session:
            rows = (await session.execute(sa.select(destinations).where(destinations.c.id.in_(ids)))).all()
        return {f"destinations/{row.id}": _message(row, reveal_secrets=True) for row in rows}

    async def list(self, size: int, token: str) -> tuple[list[pb.Destination], str]:
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(session, destinations, size, token)
        return [_message(r, reveal_secrets=False) for r in rows], next_token

    async def delete(self, name: str) -> None:
        destination_id = api.parse_uuid_name(name, "destinations")
        async with self.database.transaction() as session:
            result = await session.execute(sa.delete(destinations).where(destinations.c.id == destination_id))
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise NotFound(name)
