"""OpenTelemetry traces across gRPC calls and NATS messages.

Off by default: a process traces only when the standard variables ask for it
(`OTEL_TRACES_EXPORTER=otlp`, or an `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); the OTLP exporter reads the other `OTEL_*` variables
itself. While off, spans are no-ops and nothing is added to calls or messages.

Context travels as W3C `traceparent`: in gRPC metadata, in NATS message headers, and where work
continues later in another task (the outbox, a run the scheduler plans, deliveries waiting for
their time) in the row that carries the work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer = trace.NoOpTracer()
_provider: Any = None


def enabled() -> bool:
    return _provider is not None


def use(provider: Any) -> None:
    """Traces through this TracerProvider (None: tracing off)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("herald") if provider is not None else trace.NoOpTracer()


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return exporter == "otlp" or bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_from_env(service: str) -> None:
    """A service process: exports spans over OTLP when the OTEL_* variables ask for it."""
    if not wanted():
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": f"herald-{service}", "service.namespace": "herald"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use(provider)


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def current_traceparent() -> str | None:
    """The current span's context, to carry to where the work goes on (None when not tracing)."""
    if _provider is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


def inject(carrier: dict[str, str]) -> None:
    """Adds the current context to outgoing headers or metadata (nothing when not tracing)."""
    if _provider is not None:
        _PROPAGATOR.inject(carrier)


def _parent(carrier: Mapping[str, str] | None) -> otel_context.Context | None:
    if not carrier or TRACEPARENT not in carrier:
        return None
    return _PROPAGATOR.extract(dict(carrier))


@contextlib.contextmanager
def span(
    name: str,
    kind: SpanKind = SpanKind.INTERNAL,
    *,
    parent: Mapping[str, str] | str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span, current inside the block; its parent is the current span, or the one `parent`
    carries (headers, metadata, or a stored traceparent)."""
    if _provider is None:
        yield trace.INVALID_SPAN
        return
    carrier = {TRACEPARENT: parent} if isinstance(parent, str) else parent
    context = _parent(carrier)
    with _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes) as current:
        yield current


def start_span(name: str, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Span:
    """A span ended by the caller (for callbacks that begin and end in different places)."""
    if _provider is None:
        return trace.INVALID_SPAN
    return _tracer.start_span(name, kind=kind, attributes=attributes)


def log_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the trace and span ids of the current span, on every log line."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event
