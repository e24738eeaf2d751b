"""Metrics and trace spans of the requests dispatch makes to destinations' APIs: how long each
took, and which the provider throttled. Measured on both HTTP clients every channel shares (the
session, and the SMS client), so no channel can leave its requests out; the destination type comes
from the batch being delivered."""

from __future__ import annotations

import functools
import time
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from opentelemetry.trace import SpanKind

from herald_common import tracing
from herald_common.metrics import Metrics

# The destination type of the batch the current task delivers; "other" for test messages and
# connection checks.
DESTINATION_TYPE: ContextVar[str] = ContextVar("destination_type", default="other")


class ProviderCallMetrics:
    """Times each request and counts 429 answers. It runs for every SMS, so it keeps to the least:
    each destination type's histogram is looked up once, and a span is made only while traces are
    exported."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._latency = functools.cache(metrics.provider_seconds.labels)

    def started(self, method: str, url: str) -> tuple[float, Any]:
        span = None
        if tracing.enabled():
            # A span of the delivery's trace; the URL without its query (which may hold credentials).
            parts = urlsplit(url)
            shown = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
            span = tracing.start_span(
                f"{method} {parts.hostname}",
                SpanKind.CLIENT,
                **{
                    "http.request.method": method,
                    "url.full": shown,
                    "herald.destination_type": DESTINATION_TYPE.get(),
                },
            )
        return time.perf_counter(), span

    def ended(self, token: tuple[float, Any], status: int) -> None:
        kind = self._observe(token)
        if status == 429:
            self.metrics.provider_throttled.labels(kind).inc()
        span = token[1]
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            span.end()

    def failed(self, token: tuple[float, Any], error: BaseException) -> None:
        self._observe(token)
        span = token[1]
        if span is not None:
            span.record_exception(error)
            span.end()

    def _observe(self, token: tuple[float, Any]) -> str:
        kind = DESTINATION_TYPE.get()
        self._latency(kind).observe(time.perf_counter() - token[0])
        return kind


def provider_call_metrics(calls: ProviderCallMetrics) -> aiohttp.TraceConfig:
    """`calls` as a trace config of the aiohttp session (exports, lookups, credential checks)."""
    config = aiohttp.TraceConfig()

    async def started(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        context.token = calls.started(params.method, str(params.url))

    async def ended(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        calls.ended(context.token, params.response.status)

    async def failed(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        calls.failed(context.token, params.exception)

    config.on_request_start.append(started)
    config.on_request_end.append(ended)
    config.on_request_exception.append(failed)
    return config
