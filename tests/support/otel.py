"""An OpenTelemetry SDK tracer provider with an in-memory exporter, for tests of TRACING=otel.

OpenTelemetry allows one global tracer provider per process, so it is set once and the exporter
is cleared for each test.
"""

from __future__ import annotations

from typing import Iterator

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from core.foundation import tracing

EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Finished spans of this test; TRACING=otel in this process for its duration (runtimes set it too)."""
    provider = otel_trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        otel_trace.set_tracer_provider(provider)
    EXPORTER.clear()
    tracing.configure("otel", "test-client")
    try:
        yield EXPORTER
    finally:
        tracing.configure("w3c")
