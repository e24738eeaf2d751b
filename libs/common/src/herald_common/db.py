"""PostgreSQL access: one async engine per service, one session per RPC or message, migrations."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import ColumnElement, Connection, MetaData, event, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
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


# A `:name` parameter, as SQLAlchemy's text() finds them (not `::type`, not `\\:`).
_NAMED_PARAMETER = re.compile(r"(?<![:\w\x5c]):(\w+)(?!:)")


# Where a statement runs: in a session, or on a direct connection (`Database.direct_transaction`).
# Code shared by hot paths and others takes either.
Target: TypeAlias = "AsyncSession | asyncpg.Connection"


class Statement:
    """SQL with `:name` parameters, run in a session or on asyncpg directly (as `$1`, `$2`, ...):
    the same text either way, without a session's own cost on a direct connection."""

    def __init__(self, sql: str) -> None:
        self.text = sql  # as a session runs it
        self.clause = sa.text(sql)
        self.names: list[str] = []

        def position(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.names:
                self.names.append(name)
            return f"${self.names.index(name) + 1}"

        self.sql = _NAMED_PARAMETER.sub(position, sql)

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        return [values[name] for name in self.names]

    async def fetch(self, target: Target, **values: Any) -> Sequence[Any]:
        """Every row, each read by position or by column name as an attribute."""
        if isinstance(target, AsyncSession):
            return (await target.execute(self.clause, values)).all()
        return await target.fetch(self.sql, *self.args(values))  # type: ignore[no-any-return]

    async def fetch_row(self, target: Target, **values: Any) -> Any:
        if isinstance(target, AsyncSession):
            return (await target.execute(self.clause, values)).first()
        return await target.fetchrow(self.sql, *self.args(values))

    async def fetch_value(self, target: Target, **values: Any) -> Any:
        if isinstance(target, AsyncSession):
            return await target.scalar(self.clause, values)
        return await target.fetchval(self.sql, *self.args(values))

    async def execute(self, target: Target, **values: Any) -> None:
        if isinstance(target, AsyncSession):
            await target.execute(self.clause, values)
        else:
            await target.execute(self.sql, *self.args(values))


_ASYNCPG_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]


class Built:
    """A statement SQLAlchemy builds (a segment's conditions, say), run in a session or on a
    direct connection, where it is compiled once, as a session would compile it for asyncpg."""

    def __init__(self, statement: sa.Executable) -> None:
        self.statement = statement
        self._compiled: Any = None
        self._json_binds: frozenset[str] = frozenset()  # parameters passed to asyncpg as JSON text

    async def fetch(self, target: Target, **values: Any) -> Sequence[Any]:
        """Every row, each read by position or by column name as an attribute."""
        if isinstance(target, AsyncSession):
            return (await target.execute(self.statement, values)).all()
        if self._compiled is None:
            self._compiled = self.statement.compile(dialect=_ASYNCPG_DIALECT)  # type: ignore[attr-defined]
            self._json_binds = frozenset(
                name for name, bind in self._compiled.binds.items() if isinstance(bind.type, sa.JSON)
            )
        state = self._compiled.construct_expanded_state(values)
        processors = state.processors
        args = [
            self._value(name, value, processors)
            for name, value in zip(state.positiontup or (), state.positional_parameters, strict=True)
        ]
        return await target.fetch(state.statement, *args)  # type: ignore[no-any-return]

    async def execute(self, target: Target, **values: Any) -> None:
        """Runs a statement that returns no rows."""
        if isinstance(target, AsyncSession):
            await target.execute(self.statement, values)
        else:
            await self.fetch(target, **values)

    def _value(self, name: str, value: Any, processors: Mapping[str, Any]) -> Any:
        """A parameter as asyncpg takes it, as the session would pass it: processed, and a JSON
        value as its text (a direct connection's json codec passes text as given)."""
        if name in processors:
            return processors[name](value)
        if name in self._json_binds:
            return json.dumps(value)
        return value


# Connections a service's hot paths hold at once, beside the session pool's.
DIRECT_POOL_SIZE = 10
# How long closing the pool waits for connections still in use before it cuts them.
DIRECT_POOL_CLOSE_SECONDS = 5.0


async def _keep_session_state(_: asyncpg.Connection) -> None:
    """Direct connections set nothing that outlives a transaction, so a released one is not reset
    (asyncpg's default reset costs a round trip each time); an open transaction is still rolled
    back."""


class Row(asyncpg.Record):  # type: ignore[misc]
    """A direct connection's row: its columns read by name as attributes too, as a session's are."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _json_text(value: str) -> str:
    return value


async def _decode_json(connection: asyncpg.Connection) -> None:
    """json and jsonb values read as Python objects and written as the JSON text given, as
    sessions do."""
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(
            type_name, encoder=_json_text, decoder=json.loads, schema="pg_catalog"
        )


class Database:
    """A service's engine and session factory, and a pool of asyncpg connections for hot paths:
    a session costs several hundred microseconds of CPU of its own; a statement on a pooled asyncpg
    connection a small part of that."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._direct: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled asyncpg connection; each statement is a transaction of its own. A connection
        the server closed (a restart, a failover) is replaced as it is taken."""
        pool = self._direct or await self._open_direct()
        async with pool.acquire() as connection:
            yield connection

    @asynccontextmanager
    async def direct_transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled asyncpg connection inside one transaction: committed on success, rolled back
        on error."""
        async with self.connection() as connection, connection.transaction():
            yield connection

    async def _open_direct(self) -> asyncpg.Pool:
        async with self._opening:
            if self._direct is None:
                url = self.engine.url.set(drivername="postgresql")
                self._direct = await asyncpg.create_pool(
                    url.render_as_string(hide_password=False),
                    min_size=0,
                    max_size=DIRECT_POOL_SIZE,
                    reset=_keep_session_state,
                    init=_decode_json,
                    record_class=Row,
                    server_settings=SERVER_SETTINGS,
                )
            return self._direct

    def direct_connections(self) -> tuple[int, int]:
        """How many direct connections are open, and how many of them are in use."""
        pool = self._direct
        if pool is None:
            return 0, 0
        return pool.get_size(), pool.get_size() - pool.get_idle_size()

    async def fetch_row(self, sql: str, *args: Any) -> Any:
        """One statement (asyncpg's `$1` parameters) in a transaction of its own, on asyncpg
        directly: for hot paths, where a session's own work would cost more than the statement."""
        async with self.connection() as connection:
            return await connection.fetchrow(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Every row of one statement, as `fetch_row` runs it."""
        async with self.connection() as connection:
            return await connection.fetch(sql, *args)  # type: ignore[no-any-return]

    async def dispose(self) -> None:
        if self._direct is not None:
            pool, self._direct = self._direct, None
            try:  # waits for connections in use to come back, but not for ever
                await asyncio.wait_for(pool.close(), DIRECT_POOL_CLOSE_SECONDS)
            except TimeoutError:
                pool.terminate()
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
