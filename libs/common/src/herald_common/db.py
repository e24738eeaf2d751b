"""PostgreSQL access: one async engine per service, one session per RPC or message, migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import ColumnElement, Connection, MetaData, event, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_only


def asyncpg_url(url: str) -> str:
    """Accepts postgres://, postgresql:// or postgresql+asyncpg:// URLs."""
    parts = urlsplit(url)
    scheme = "postgresql+asyncpg"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def text_in(column: Any, values: Iterable[str]) -> ColumnElement[bool]:
    """`column = ANY(array)`: one array parameter, where `IN (...)` would bind one per value, so
    the statement text (and its prepared plan) is the same for any number of values."""
    return column == sa.func.any(sa.cast(sa.literal(list(values)), ARRAY(sa.Text)))  # type: ignore[no-any-return]


# Every statement is planned for the values it is run with. PostgreSQL otherwise settles, after
# five runs of a prepared statement, on one generic plan made from the statistics of the moment:
# a plan made while a table was new and empty (a fresh installation, a new month's events) scans
# it whole, and keeps doing so as it grows, until the next ANALYZE, a minute or more later. Hot
# statements here each handle a batch, so planning them every time costs little.
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan"}


def make_engine(database_url: str, **kwargs: Any) -> AsyncEngine:
    # hide_parameters: bound values (credentials, profile data) never reach logs or errors.
    options: dict[str, Any] = {
        "pool_size": 10,
        "max_overflow": 10,
        "hide_parameters": True,
        "connect_args": {"server_settings": SERVER_SETTINGS},
    }
    options.update(kwargs)
    engine = create_async_engine(asyncpg_url(database_url), **options)
    event.listen(engine.sync_engine, "checkout", _replace_closed_connection)
    return engine


def _replace_closed_connection(
    dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    """After a database restart or failover the pooled connections are dead; each is checked as it
    is taken from the pool and replaced if dead, so the restart fails no request. One trivial
    statement, a single round trip where pool_pre_ping spends three."""
    driver = record.driver_connection
    if driver is None:
        return
    if driver.is_closed():
        raise DisconnectionError("connection closed by the server")
    try:
        await_only(driver.execute("SELECT 1"))
    except Exception as error:
        raise DisconnectionError(f"connection unusable: {error!r}") from error


class Database:
    """A service's engine and session factory."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    async def fetch_row(self, sql: str, *args: Any) -> Any:
        """One statement (asyncpg's `$1` parameters) in a transaction of its own, on asyncpg
        directly: for hot paths, where a session's own work would cost more than the statement."""
        async with self.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            return await raw.driver_connection.fetchrow(sql, *args)  # type: ignore[union-attr]

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Every row of one statement, as `fetch_row` runs it."""
        async with self.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            return await raw.driver_connection.fetch(sql, *args)  # type: ignore[union-attr,no-any-return]

    async def dispose(self) -> None:
        await self.engine.dispose()


async def migrate(engine: AsyncEngine, schema: str, migrations_dir: Path) -> None:
    """Brings the service's schema to the newest migration. Replicas starting together take turns."""

    def upgrade(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir))
        config.attributes["connection"] = connection
        config.attributes["schema"] = schema
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        # The lock key is derived from the schema so different services never wait on each other.
        await connection.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"migrate:{schema}"}
        )
        await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await connection.run_sync(upgrade)


def run_alembic_env(target_metadata: MetaData) -> None:
    """Body of every service's migrations/env.py: runs on the connection `migrate` hands over."""
    from alembic import context

    connection = context.config.attributes["connection"]
    schema = context.config.attributes["schema"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table_schema=schema,
        include_schemas=True,
    )
    with context.begin_transaction():
        context.run_migrations()
