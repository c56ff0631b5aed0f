"""OpenTelemetry export of finished request traces (``--otlp-endpoint``; see trace.py).

Each trace becomes one OpenTelemetry trace: a ``tokenfactory.request`` root span and a child
span per station (``tokenfactory.receive``, ``tokenfactory.prefill_chunk`` under
``tokenfactory.prefill``, ...), with the recorded start and end times and the tokens, bytes and
attributes as span attributes (``tokenfactory.tokens``, ``tokenfactory.bytes``,
``tokenfactory.<attribute>``). The SDK's batch processor sends them over OTLP/HTTP (protobuf)
from its own thread, so the event loop never waits on the collector; a collector that is down
costs dropped spans and a log line, never a failed request.

The provider is private to the app (the process-wide global one is left alone). Needs
``opentelemetry-sdk`` and ``opentelemetry-exporter-otlp-proto-http``.
"""
from __future__ import annotations

from urllib.parse import urlparse

SERVICE_NAME = "tokenfactory"
PREFIX = "tokenfactory."


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a bare ``http://host:4318`` gets the standard ``/v1/traces``."""
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:4318, "
                         f"got {endpoint!r}")
    if parsed.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def otlp_endpoint_arg(value: str) -> str:
    """argparse ``type=`` for ``--otlp-endpoint``: the URL as given, or a one-line error (a bad
    URL, or the OpenTelemetry packages missing)."""
    import argparse
    try:
        traces_url(value)
        _require_sdk()
    except (ValueError, RuntimeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _require_sdk() -> None:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"--otlp-endpoint needs the OpenTelemetry SDK ({exc.name} is missing):"
                           " pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"
                           ) from None


def _attr(value):
    """An OpenTelemetry attribute value (None is not one: the attribute is left out)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return None if value is None else str(value)


class OtelExport:
    def __init__(self, endpoint: str | None, *, exporter=None, batch: bool = True):
        _require_sdk()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=5)
        self.provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter) if batch
                                         else SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("tokenfactory.api.trace")

    def export(self, doc: dict) -> None:
        """Turn one ``RequestTrace.to_dict()`` into spans and hand them to the processor."""
        from opentelemetry import trace as ot
        from opentelemetry.context import Context

        t0_ns = int(doc["start_unix"] * 1e9)
        spans = doc["spans"]
        made: dict[int, object] = {}
        for s in spans:
            start = s["start_s"]
            if start is None:   # a station the request never reached (e.g. refused early)
                continue
            dur = s["duration_s"] or 0.0
            parent = made.get(s["parent_id"]) if s["parent_id"] is not None else None
            # the root starts a new trace whatever span is current in the caller
            context = ot.set_span_in_context(parent) if parent is not None else Context()
            attrs = {PREFIX + k: _attr(v) for k, v in s["attributes"].items()}
            attrs.update({PREFIX + "tokens": s["tokens"], PREFIX + "bytes": s["bytes"],
                          PREFIX + "self_s": s["self_s"]})
            if s["parent_id"] is None:
                attrs.update({PREFIX + "request_id": doc["request_id"],
                              PREFIX + "response_id": doc["response_id"],
                              PREFIX + "prompt_tokens": doc["prompt_tokens"],
                              PREFIX + "cached_tokens": doc["cached_tokens"],
                              PREFIX + "output_tokens": doc["output_tokens"]})
                for k, v in (doc.get("cost") or {}).items():
                    attrs[PREFIX + "cost." + k] = _attr(v)
            attrs = {k: v for k, v in attrs.items() if v is not None}
            start_ns = t0_ns + int(start * 1e9)
            span = self.tracer.start_span(PREFIX + s["name"], context=context,
                                          attributes=attrs, start_time=start_ns)
            span.end(end_time=start_ns + int(dur * 1e9))
            made[s["span_id"]] = span

    def flush(self, timeout_ms: int = 5000) -> bool:
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()
