"""Deadlines that follow the caller's: a call made while serving an RPC gets at most the time that
RPC has left, so nobody keeps working for a caller that has given up."""

from __future__ import annotations

import time
from contextvars import ContextVar

# When the RPC being served must be answered (monotonic seconds); None outside an RPC or when
# the caller set no deadline.
_deadline: ContextVar[float | None] = ContextVar("rpc_deadline", default=None)


def serving(time_remaining: float | None) -> None:
    """Called as an RPC starts, with what its caller allowed."""
    _deadline.set(None if time_remaining is None else time.monotonic() + time_remaining)


def timeout(default: float) -> float:
    """Seconds an outgoing call may take: `default`, or less if the RPC being served ends sooner."""
    deadline = _deadline.get()
    if deadline is None:
        return default
    return max(0.0, min(default, deadline - time.monotonic()))
