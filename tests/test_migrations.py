"""Each service's migrations build exactly the tables its code declares."""

from __future__ import annotations

import re
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from herald_campaign import storage as campaign_storage
from herald_common.db import make_engine
from herald_dispatch import storage as dispatch_storage
from herald_scheduler import storage as scheduler_storage
from herald_segmentation import storage as segmentation_storage
from tests.conftest import Platform

STORAGE = [campaign_storage, dispatch_storage, scheduler_storage, segmentation_storage]
# Month partitions of the events table are made as events arrive, not by migrations.
_EVENT_PARTITION = re.compile(r"events_\d{4}_\d{2}")


def _compared(name: str | None, type_: str, storage: Any) -> bool:
    if type_ == "schema":
        return bool(name == storage.SCHEMA)
    return not (type_ == "table" and name is not None and _EVENT_PARTITION.fullmatch(name))


@pytest.mark.parametrize("storage", STORAGE, ids=[s.SCHEMA for s in STORAGE])
async def test_migrated_schema_matches_declared_tables(platform: Platform, storage: Any) -> None:
    engine = make_engine(platform.settings.database_url, pool_size=1, max_overflow=0)

    def differences(connection: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_schemas": True,
                "include_name": lambda name, type_, _: _compared(name, type_, storage),
                "version_table_schema": storage.SCHEMA,
            },
        )
        return list(compare_metadata(context, storage.metadata))

    try:
        async with engine.connect() as connection:
            found = await connection.run_sync(differences)
    finally:
        await engine.dispose()
    assert found == []
