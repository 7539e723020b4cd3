"""OpenTelemetry for every component: traces that follow an event from the ERP transaction to
the target's HTTP call, and metrics served on ``/metrics`` (Prometheus) and by OTLP.

* **Traces** are on when an OTLP endpoint is configured by the standard variables
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or
  ``OTEL_TRACES_EXPORTER=otlp|console``), off otherwise (no span is even created).
  ``OTEL_SDK_DISABLED=true`` turns everything off. Spans are exported by a batch processor
  whose queue drops when full: a collector that is down never blocks or crashes the pipeline.
* **Context** travels in the W3C ``traceparent`` header: ``emit()`` stores the ERP's current
  context in the outbox row; the relay's ``send <topic>`` PRODUCER span continues it and
  replaces the record's header; the worker's ``process <topic>`` CONSUMER span continues that;
  the HTTP call is its child; a retry hop is a ``send <retry topic>`` span under the failed
  ``process`` span, so one trace covers every attempt.
* **Metrics** always exist (cheap) and are served on ``/metrics`` by the health server of the
  relay and of each worker; with ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._METRICS_ENDPOINT``)
  they are also pushed by OTLP. Names follow the OpenTelemetry messaging conventions, plus the
  pipeline's own under ``pipeline.*``.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_tracer_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None
_registry: CollectorRegistry | None = None
_metrics: Metrics | None = None
_component = "pipeline"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def traces_configured() -> str | None:
    """'otlp', 'console' or None, from the standard OTEL_* variables."""
    if _env_true("OTEL_SDK_DISABLED"):
        return None
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter in ("none",):
        return None
    if exporter in ("otlp", "console"):
        return exporter
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        return "otlp"
    return None


def _metrics_push_configured() -> bool:
    if _env_true("OTEL_SDK_DISABLED"):
        return False
    if os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )


def setup(
    component: str,
    *,
    span_exporter: SpanExporter | None = None,
    metric_readers: Iterable[MetricReader] = (),
) -> None:
    """Configure tracing and metrics for this process (idempotent; tests pass an in-memory
    ``span_exporter`` and readers, which replace the previous setup)."""
    global _tracer_provider, _meter_provider, _registry, _metrics, _component
    with _lock:
        _component = component
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"erp-pipeline-{component}"),
             "service.namespace": "erp-pipeline"}
        )
        kind = traces_configured()
        if span_exporter is not None:
            tp = TracerProvider(resource=resource)
            tp.add_span_processor(SimpleSpanProcessor(span_exporter))
            _tracer_provider = tp
        elif kind is not None:
            tp = TracerProvider(resource=resource)
            tp.add_span_processor(BatchSpanProcessor(_exporter(kind), max_queue_size=8192))
            _tracer_provider = tp
        else:
            _tracer_provider = None
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        _registry = CollectorRegistry()
        readers: list[MetricReader] = [PrometheusMetricReader(registry=_registry),
                                       *metric_readers]
        if _metrics_push_configured():
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        if _meter_provider is not None:
            _meter_provider.shutdown(timeout_millis=1000)
        _meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        _metrics = Metrics(_meter_provider.get_meter("erp-pipeline"), _registry)


def _exporter(kind: str) -> SpanExporter:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(timeout=5)


def shutdown() -> None:
    """Flush spans and metrics (bounded) before the process exits."""
    with _lock:
        if _tracer_provider is not None:
            _tracer_provider.force_flush(timeout_millis=2000)
            _tracer_provider.shutdown()
        if _meter_provider is not None:
            _meter_provider.shutdown(timeout_millis=2000)


def metrics() -> Metrics:
    """The process's instruments (set up with defaults on first use)."""
    if _metrics is None:
        setup(_component)
    assert _metrics is not None
    return _metrics


def prometheus_text() -> bytes:
    """What ``/metrics`` serves."""
    metrics()
    assert _registry is not None
    return generate_latest(_registry)


# -- traces ----------------------------------------------------------------------------------


def tracing() -> bool:
    return _tracer_provider is not None


def _tracer() -> trace.Tracer:
    assert _tracer_provider is not None
    return _tracer_provider.get_tracer("erp-pipeline")


def context_of(traceparent: str | None) -> Context | None:
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def traceparent_of(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_traceparent() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return traceparent_of(ctx) if ctx.is_valid else None


def send_span(topic: str, parent: str | SpanContext | None, attributes: Mapping[str, Any],
              links: Iterable[SpanContext] = ()) -> str | None:
    """A PRODUCER span ``send <topic>`` under ``parent``; returns the traceparent the record
    must carry (None when tracing is off)."""
    if _tracer_provider is None:
        return None
    if isinstance(parent, SpanContext):
        ctx: Context | None = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    else:
        ctx = context_of(parent)
    span = _tracer().start_span(
        f"send {topic}", context=ctx, kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "kafka", "messaging.operation.type": "send",
                    "messaging.operation.name": "send", "messaging.destination.name": topic,
                    **attributes},
        links=[Link(c) for c in links if c.is_valid],
    )
    span.end()
    return traceparent_of(span.get_span_context())


@contextlib.contextmanager
def process_span(topic: str, traceparent: str | None, attributes: Mapping[str, Any]
                 ) -> Iterator[Span | None]:
    """The CONSUMER span ``process <topic>`` around a handler, current while it runs (so the
    connector's HTTP call is its child). Yields None when tracing is off."""
    if _tracer_provider is None:
        yield None
        return
    with _tracer().start_as_current_span(
        f"process {topic}", context=context_of(traceparent), kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "kafka", "messaging.operation.type": "process",
                    "messaging.operation.name": "process", "messaging.destination.name": topic,
                    **attributes},
        record_exception=False, set_status_on_exception=False,
    ) as span:
        yield span


@contextlib.contextmanager
def batch_span(name: str, traceparents: Iterable[str | None], attributes: Mapping[str, Any],
               max_links: int = 128) -> Iterator[Span | None]:
    """A CONSUMER span over a batch write, linked to (up to ``max_links``) events' traces."""
    if _tracer_provider is None:
        yield None
        return
    links = []
    for tp in traceparents:
        ctx = trace.get_current_span(context_of(tp)).get_span_context() if tp else None
        if ctx is not None and ctx.is_valid:
            links.append(Link(ctx))
            if len(links) >= max_links:
                break
    with _tracer().start_as_current_span(
        name, kind=SpanKind.CONSUMER, links=links,
        attributes={"messaging.system": "kafka", "messaging.operation.type": "process",
                    **attributes},
    ) as span:
        yield span


def fail(span: Span | None, exc: BaseException) -> None:
    if span is not None:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
        span.set_attribute("error.type", type(exc).__name__)


@contextlib.contextmanager
def client_span(name: str, attributes: Mapping[str, Any]) -> Iterator[Span | None]:
    """A CLIENT span (an HTTP call, a SQL write) under the current span."""
    if _tracer_provider is None:
        yield None
        return
    with _tracer().start_as_current_span(name, kind=SpanKind.CLIENT, attributes=dict(attributes),
                                         record_exception=True) as span:
        yield span


# -- metrics ---------------------------------------------------------------------------------


class FastHistogram:
    """A per-event histogram served on /metrics (``record(value, attributes)`` like OTel's);
    attribute names become label names with ``.`` → ``_``, missing ones empty.

    A prometheus_client collector of its own: a value is binned with one bisect under one
    lock (about 0.9 µs; prometheus_client's Histogram takes a lock per bucket counter and the
    sum, about 1.8 µs, and the OTel SDK's about 20 µs: a no-op event records two)."""

    def __init__(self, name: str, doc: str, attributes: tuple[str, ...],
                 buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self._name = name.removesuffix("_seconds")
        self._doc = doc
        self._names = attributes
        self._labels = [a.replace(".", "_") for a in attributes]
        self._bounds = sorted(float(b) for b in buckets)
        self._le = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        # label values → [count per bucket (the last one: above every bound)..., sum]
        self._series: dict[tuple[tuple[str, Any], ...], tuple[tuple[str, ...], list[float]]] = {}
        registry.register(self)

    def record(self, value: float, attributes: Mapping[str, Any]) -> None:
        counts = self._counts(attributes)
        i = bisect.bisect_left(self._bounds, value)  # the first bound ≥ value: "le"
        with self._lock:
            counts[i] += 1
            counts[-1] += value

    def bound(self, attributes: Mapping[str, Any]) -> Callable[[float], None]:
        """``record`` for one label set, its series found once: for callers that record every
        event under a few label sets they keep (the worker's per-event histograms)."""
        counts, bounds, lock, bisect_left = (
            self._counts(attributes), self._bounds, self._lock, bisect.bisect_left)

        def record(value: float) -> None:
            i = bisect_left(bounds, value)
            with lock:
                counts[i] += 1
                counts[-1] += value

        return record

    def _counts(self, attributes: Mapping[str, Any]) -> list[float]:
        key = tuple(attributes.items())
        series = self._series.get(key)
        if series is None:  # a new label set: added under the lock collect() reads under
            labels = tuple(str(attributes.get(a, "")) for a in self._names)
            with self._lock:
                series = self._series.setdefault(
                    key, (labels, [0.0] * (len(self._bounds) + 2)))
        return series[1]

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self._name, self._doc, labels=self._labels,
                                      unit="seconds")]

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labels,
                                       unit="seconds")
        with self._lock:
            snapshot = [(labels, list(counts)) for labels, counts in self._series.values()]
        for labels, counts in snapshot:
            cumulative, buckets = 0.0, []
            for le, n in zip(self._le, counts, strict=False):
                cumulative += n
                buckets.append((le, cumulative))
            buckets.append(("+Inf", cumulative + counts[-2]))
            family.add_metric(list(labels), buckets, counts[-1])
        return [family]


Gauge = Callable[[], Iterable[tuple[float, Mapping[str, Any]]]]


class Metrics:
    """Every instrument, created once per process. Observable gauges read from sources that
    runtimes register (and remove on close) with :meth:`observe`."""

    def __init__(self, meter: Meter, registry: CollectorRegistry) -> None:
        self._sources: dict[str, dict[int, Gauge]] = {}
        m = meter
        self.sent = m.create_counter(
            "messaging.client.sent.messages", "{message}",
            "Records a producer sent and Kafka acknowledged")
        self.consumed = m.create_counter(
            "messaging.client.consumed.messages", "{message}", "Records a consumer received")
        # Recorded once per event: prometheus_client's histogram costs ~2 µs an observation
        # where the OTel SDK's costs ~20 µs (measured here), a fifth of a no-op event's trip.
        # These two are therefore served on /metrics but not pushed by OTLP.
        self.process_duration = FastHistogram(
            "messaging_process_duration_seconds", "Time a handler (or a batch write) took",
            ("messaging.system", "messaging.consumer.group.name", "messaging.destination.name",
             "messaging.operation.name", "outcome"),
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry)
        self.operation_duration = m.create_histogram(
            "messaging.client.operation.duration", "s",
            "Time from producing a batch to Kafka's last acknowledgement",
            explicit_bucket_boundaries_advisory=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                 0.5, 1, 2.5, 5, 10])
        self.dead_lettered = m.create_counter(
            "pipeline.dead_lettered", "{event}", "Events sent to a DLQ, by group and error class")
        self.retries = m.create_counter(
            "pipeline.retries", "{event}", "Events sent to a retry tier, by group and tier")
        self.end_to_end = FastHistogram(
            "pipeline_end_to_end_duration_seconds",
            "From the event's time in the ERP to applied by a worker",
            ("messaging.consumer.group.name",),
            (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600), registry)
        for name, unit, doc in (
            ("pipeline.outbox.backlog", "{row}", "Outbox rows not yet published"),
            ("pipeline.outbox.oldest_age", "s", "Age of the oldest unpublished outbox row"),
            ("pipeline.relay.leader", "1", "1 when this relay process leads its shard"),
            ("pipeline.relay.wal.retained", "By", "WAL the server keeps for a WAL-engine slot "
                                                  "(from its restart_lsn)"),
            ("pipeline.relay.wal.lag", "By", "WAL written since a WAL-engine slot's confirmed "
                                             "position (not yet read by its relay)"),
            ("pipeline.parked_keys", "{key}", "Keys waiting behind a retried or dead-lettered "
                                              "event (strict ordering)"),
            ("pipeline.stalled_keys", "{key}", "Keys whose head event has waited longer than "
                                               "the retry tiers' delays plus a margin"),
            ("pipeline.breaker.state", "1", "Circuit breaker: 0 closed, 1 half-open, 2 open"),
            ("pipeline.consumer.lag", "{message}", "Records behind the partition's end"),
            ("pipeline.consumer.lag_age", "s", "Age of the newest record consumed while behind "
                                               "(0 when caught up)"),
        ):
            self._sources[name] = {}
            m.create_observable_gauge(name, [self._callback(name)], unit, doc)

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for fn in list(self._sources[name].values()):
                try:
                    out += [Observation(v, dict(a)) for v, a in fn()]
                except Exception:  # a source must never break the scrape
                    continue
            return out

        return observe

    def observe(self, name: str, fn: Gauge) -> Callable[[], None]:
        """Register a gauge source; returns the function that removes it."""
        key = id(fn)
        self._sources[name][key] = fn

        def remove() -> None:
            self._sources[name].pop(key, None)

        return remove
