"""OpenTelemetry traces: one publish is followed across gRPC calls and NATS messages, through the
scheduler, dispatch and the provider call; log lines carry the trace id; off by default."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import structlog
from nats.js import JetStreamContext
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common import tracing
from herald_common.bus import Subjects
from herald_sandbox.segment_api import SegmentApi
from herald_scheduler.main import CONSUMER as SCHEDULER_CAMPAIGNS
from tests.conftest import Platform, eventually
from tests.helpers import (
    completed_stats,
    condition,
    create_segment,
    create_segment_destination_for,
    segment_export_campaign,
    user,
)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.use(None)
        provider.shutdown()


def _named(found: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


async def _taken_up(js: JetStreamContext, platform: Platform, durable: str) -> None:
    """Until the consumer has handled every message it was given."""

    async def idle() -> bool:
        stream = Subjects(platform.settings.namespace).stream("campaign")
        info = await js.consumer_info(stream, durable)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    await eventually(idle)


async def test_one_publish_is_followed_through_the_scheduler_dispatch_and_the_provider_call(
    platform: Platform, segment_api: SegmentApi, spans: InMemorySpanExporter, js: JetStreamContext
) -> None:
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-{n}", cohort=tag) for n in range(2)])
    )
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(platform, segment_api)
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    # A batch continues the trace of its first message: the draft's change is taken up first, so
    # the publish starts a batch of its own.
    await _taken_up(js, platform, SCHEDULER_CAMPAIGNS)
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    assert (await completed_stats(platform, created.name)).sent == 2

    found = spans.get_finished_spans()
    [publish] = _named(found, "/herald.campaign.v1.CampaignService/PublishCampaign")
    assert publish.kind == SpanKind.SERVER
    trace_id = publish.context.trace_id

    def of_trace(name: str) -> list[ReadableSpan]:
        return [s for s in _named(found, name) if s.context.trace_id == trace_id]

    # The scheduler hears of the publish, plans the run (reading the audience from segmentation)...
    assert of_trace("consume scheduler-campaigns"), sorted({s.name for s in found})
    [planning] = of_trace("plan run")
    audience = of_trace("/herald.segmentation.v1.SegmentationService/StreamAudience")
    assert (
        audience and audience[0].parent is not None and audience[0].parent.span_id == planning.context.span_id
    )
    # ...dispatch delivers the batch, and its request to Segment is a span of the same trace.
    [delivering] = of_trace("consume dispatch-segment")
    calls = [
        s for s in of_trace("POST 127.0.0.1") if s.parent and s.parent.span_id == delivering.context.span_id
    ]
    assert calls and calls[0].kind == SpanKind.CLIENT
    assert calls[0].attributes is not None and calls[0].attributes["http.response.status_code"] == 200


def test_log_lines_carry_the_trace_id(spans: InMemorySpanExporter) -> None:
    assert tracing.log_ids in structlog.get_config()["processors"]
    with tracing.span("work") as current:
        event = tracing.log_ids(None, "info", {"event": "something"})
    assert event["trace_id"] == format(current.get_span_context().trace_id, "032x")
    assert tracing.log_ids(None, "info", {"event": "outside"}) == {"event": "outside"}


def test_tracing_is_off_unless_the_otel_variables_ask() -> None:
    assert not tracing.enabled()
    assert tracing.current_traceparent() is None
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert not tracing.wanted(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}
    )
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none"})
