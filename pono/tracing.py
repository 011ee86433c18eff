"""OpenTelemetry spans per call, per turn and per stage, built from the call event stream.

The exporter is configured by the standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_TRACES_EXPORTER=otlp|console|none, OTEL_SERVICE_NAME, OTEL_BSP_*); with none of them set, nothing
is traced and nothing is exported.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from pono.events import LATENCY_MARKS, CallEvent, EventType

log = logging.getLogger(__name__)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def exporter_from_env() -> SpanExporter | None:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if kind == "none" or (not kind and not endpoint):
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    if kind not in ("", "otlp"):
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r} is not supported (use otlp, console or none)")
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol not in (None, "", "http/protobuf"):
        raise ValueError(f"OTLP protocol {protocol!r} is not supported here; use http/protobuf")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class CallTracing:
    def __init__(self, exporter: SpanExporter) -> None:
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "pono")})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("pono")
        log.info("tracing calls with %s", type(exporter).__name__)

    @classmethod
    def from_env(cls) -> CallTracing | None:
        exporter = exporter_from_env()
        return cls(exporter) if exporter is not None else None

    def observer(self, call_id: str, transport: str, persona: str | None) -> Any:
        attributes = {"pono.call_id": call_id, "pono.transport": transport, "pono.persona": persona or ""}
        call_span: list[trace.Span] = []

        def observe(event: CallEvent) -> None:
            if event.type is EventType.CALL_STARTED:
                call_span.append(self.tracer.start_span("call", start_time=_ns(event.ts), attributes=attributes))
            elif event.type is EventType.LATENCY and call_span:
                self._turn(call_span[0], event, attributes)
            elif event.type is EventType.CALL_ENDED and call_span:
                call_span[0].set_attribute("pono.end_reason", str(event.data.get("reason")))
                call_span[0].end(end_time=_ns(event.ts))

        return observe

    def _turn(self, parent: trace.Span, event: CallEvent, attributes: dict[str, str]) -> None:
        """One span per turn, from the reference point (end of speech or typed text) to the end of the reply,
        and one child per stage between consecutive latency marks."""
        marks: dict[str, float] = event.data.get("marks", {})
        t0 = float(event.data.get("t0", event.ts))
        context = trace.set_span_in_context(parent)
        turn_attributes = {**attributes, "pono.turn": event.turn if event.turn is not None else -1}
        turn = self.tracer.start_span("turn", context=context, start_time=_ns(t0), attributes=turn_attributes)
        turn_context = trace.set_span_in_context(turn)
        previous = 0.0
        for stage in LATENCY_MARKS:
            if stage not in marks:
                continue
            at = max(previous, float(marks[stage]))
            span = self.tracer.start_span(f"stage.{stage}", context=turn_context, start_time=_ns(t0 + previous),
                                          attributes=turn_attributes)
            span.end(end_time=_ns(t0 + at))
            previous = at
        for model, key, begins in (("llm", "llm_total", "stt_final"), ("tts", "tts_synth", "first_sentence")):
            if key in marks:
                start = float(marks.get(begins, 0.0))
                span = self.tracer.start_span(f"model.{model}", context=turn_context, start_time=_ns(t0 + start),
                                              attributes=turn_attributes)
                span.end(end_time=_ns(t0 + start + float(marks[key])))
        turn.end(end_time=max(_ns(event.ts), _ns(t0 + previous)))

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is batched
