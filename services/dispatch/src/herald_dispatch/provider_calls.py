"""Metrics and trace spans of the requests dispatch makes to destinations' APIs: how long each
took, and which the provider throttled. Measured on the one HTTP session every channel shares, so
no channel can leave its requests out; the destination type comes from the batch being delivered."""

from __future__ import annotations

import functools
import time
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

import aiohttp
from opentelemetry.trace import SpanKind

from herald_common import tracing
from herald_common.metrics import Metrics

# The destination type of the batch the current task delivers; "other" for test messages and
# connection checks.
DESTINATION_TYPE: ContextVar[str] = ContextVar("destination_type", default="other")


def provider_call_metrics(metrics: Metrics) -> aiohttp.TraceConfig:
    """A trace config that times each request and counts 429 answers. It runs for every SMS, so
    it keeps to the least: each destination type's histogram is looked up once, and a span is
    made only while traces are exported."""
    config = aiohttp.TraceConfig()
    latency = functools.cache(metrics.provider_seconds.labels)

    async def started(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        context.started = time.perf_counter()
        context.span = None
        if tracing.enabled():
            # A span of the delivery's trace; the URL without its query (which may hold credentials).
            url = params.url.with_query(None)
            context.span = tracing.start_span(
                f"{params.method} {url.host}",
                SpanKind.CLIENT,
                **{
                    "http.request.method": params.method,
                    "url.full": str(url),
                    "herald.destination_type": DESTINATION_TYPE.get(),
                },
            )

    def observe(context: SimpleNamespace) -> str:
        kind = DESTINATION_TYPE.get()
        latency(kind).observe(time.perf_counter() - context.started)
        return kind

    async def ended(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        kind = observe(context)
        if params.response.status == 429:
            metrics.provider_throttled.labels(kind).inc()
        if context.span is not None:
            context.span.set_attribute("http.response.status_code", params.response.status)
            context.span.end()

    async def failed(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        observe(context)
        if context.span is not None:
            context.span.record_exception(params.exception)
            context.span.end()

    config.on_request_start.append(started)
    config.on_request_end.append(ended)
    config.on_request_exception.append(failed)
    return config
