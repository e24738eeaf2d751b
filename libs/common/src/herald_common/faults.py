"""Which failures pass by themselves (a database failover, a NATS restart) and which do not."""

from __future__ import annotations

import grpc
import nats.errors
import sqlalchemy.exc
from asyncpg import exceptions as pg_errors


class NotReady(Exception):
    """What a message needs has not arrived yet (an event it refers to); try again shortly."""


# gRPC codes a caller may retry: the callee was unreachable, overloaded or failed unexpectedly.
RETRYABLE_GRPC_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    NotReady,
    OSError,
    TimeoutError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    pg_errors.PostgresConnectionError,
    pg_errors.CannotConnectNowError,
    pg_errors.OperatorInterventionError,
    pg_errors.InterfaceError,
    pg_errors.TooManyConnectionsError,
    # PostgreSQL ended one of two transactions that waited for each other: run again, it passes.
    pg_errors.DeadlockDetectedError,
    nats.errors.Error,
)


def is_transient(error: BaseException) -> bool:
    """True when retrying later may succeed without anybody changing anything."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in RETRYABLE_GRPC_CODES
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return True
    orig = error.orig if isinstance(error, sqlalchemy.exc.DBAPIError) else None
    if orig is not None and orig is not error and is_transient(orig):
        return True
    cause = error.__cause__
    return isinstance(error, _TRANSIENT_TYPES) or (cause is not None and is_transient(cause))
