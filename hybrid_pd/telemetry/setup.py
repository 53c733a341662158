"""One call per process: ``configure_tracing(service_name, role, db_url=..., otlp=...)``.

Builds a ``TracerProvider`` whose resource says who is speaking (``service.name``,
``hybrid_pd.role``, ``hybrid_pd.engine_id``, ``process.pid``, ``host.name``) and hangs the sinks on it
side by side, each behind its OWN ``BatchSpanProcessor`` so a slow or dead sink (an OTLP
endpoint that is down, a locked database) never delays the other or a serving thread:

* SQLite (or any SQLAlchemy URL) through :class:`SQLiteSpanExporter` when ``db_url``;
* OTLP from the OTel SDK, configured by the standard environment variables
  (``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``..._PROTOCOL`` = ``grpc`` |
  ``http/protobuf``, ``..._HEADERS``, ``..._TIMEOUT``, ``..._INSECURE``, ``OTEL_BSP_*``);
  ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``) picks the exporters.

``otlp=None`` (default) means "follow the environment": OTLP is on when
``OTEL_TRACES_EXPORTER`` names it, or, when that is unset, when an OTLP endpoint variable
is set.  We do not default to the spec's "otlp to localhost:4317" because a serving
process with nobody listening would log export failures forever.  The default protocol is
``grpc``, as for vLLM's ``--otlp-traces-endpoint``, so one endpoint serves both.

Nothing is lost silently: a counting ``SpanProcessor`` counts spans started and ended,
each sink's :class:`~.counters.CountingBatchSpanProcessor` counts the spans its full
queue refuses the moment it refuses them (``dropped_queue``, counter reason
``queue_full``), each sink counts what it delivered and dropped, and after ``shutdown()``
(which flushes) ``ended == exported + dropped + dropped_queue`` per sink.  When a SQLite
sink is configured, every sink's drops are also written to its ``telemetry_drops`` table
so the dashboard can show them.

Idempotent: a second call returns the same :class:`Telemetry`, and warns if the
arguments differ.  After :func:`shutdown` a new configuration may be built.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import counters
from hybrid_pd.telemetry.counters import CountingBatchSpanProcessor, DropHook
from hybrid_pd.telemetry.sqlite_exporter import SQLiteSpanExporter

logger = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "hybrid_pd"

# Our batch defaults, used unless the matching OTEL_BSP_* variable is set.  A bigger queue
# than the SDK's 2048 because per-layer spans come in bursts (52 layers x requests), and
# a longer delay/batch so SQLite takes its write lock a few times a second, not per span.
_BSP_DEFAULTS = {
    "OTEL_BSP_MAX_QUEUE_SIZE": ("max_queue_size", 65536),
    "OTEL_BSP_SCHEDULE_DELAY": ("schedule_delay_millis", 500),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("max_export_batch_size", 2048),
}

_SUPPORTED_PROTOCOLS = ("grpc", "http/protobuf")


class SpanCounter(SpanProcessor):
    """Counts spans started and ended in this provider (the "created" side of the ledger)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = 0
        self.ended = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        with self._lock:
            self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.ended += 1


class CountingExporter(SpanExporter):
    """Wraps a sink that does not count for itself (OTLP, console): delivered vs dropped."""

    def __init__(self, sink: str, inner: SpanExporter, on_drop: DropHook | None = None) -> None:
        self.sink = sink
        self.inner = inner
        self.on_drop = on_drop
        self.exported = 0
        self.dropped = 0
        self.last_error: str | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # the SDK would log and swallow it; we also count it
            self.last_error = f"{type(exc).__name__}: {exc}"
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += n
            counters.record_exported(self.sink, n)
        else:
            self.dropped += n
            counters.record_dropped(self.sink, "export_failed", n)
            if self.on_drop is not None:
                self.on_drop(self.sink, "export_failed", n)
            logger.warning("telemetry: %s dropped %d spans (%d so far)", self.sink, n, self.dropped)
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def stats(self) -> dict[str, Any]:
        return {"exported": self.exported, "dropped": self.dropped, "last_error": self.last_error}


@dataclass(frozen=True)
class TelemetryConfig:
    """The arguments of configure_tracing, compared for idempotency."""

    service_name: str
    role: str
    engine_id: str
    db_url: str | None
    sinks: tuple[str, ...]  # resolved exporter names, e.g. ("sqlite", "otlp-grpc")


@dataclass
class Telemetry:
    """A configured provider and its sinks (returned by :func:`configure_tracing`)."""

    config: TelemetryConfig
    provider: TracerProvider
    counter: SpanCounter
    sinks: dict[str, SQLiteSpanExporter | CountingExporter] = field(default_factory=dict)
    is_global: bool = False
    processors: dict[str, CountingBatchSpanProcessor] = field(default_factory=dict)
    _shut: bool = False

    @property
    def sqlite(self) -> SQLiteSpanExporter | None:
        s = self.sinks.get("sqlite")
        return s if isinstance(s, SQLiteSpanExporter) else None

    def tracer(self, name: str = INSTRUMENTATION_NAME) -> trace.Tracer:
        return self.provider.get_tracer(name)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def stats(self) -> dict[str, Any]:
        """``created``/``ended`` spans and, per sink, ``exported``/``dropped`` plus the rest.

        ``dropped_queue``: spans the sink's queue refused, counted as they were refused
        (queue full: the sink was slower than span creation; or ended after shutdown).
        The rest of ``ended - exported - dropped - dropped_queue`` is ``pending`` (still
        queued) before shutdown; after it, a remainder (an export still running when the
        shutdown bound ran out) is added to ``dropped_queue``.  So
        ``ended == exported + dropped + dropped_queue + pending`` for every sink, always.
        """
        out: dict[str, Any] = {"created": self.counter.started, "ended": self.counter.ended, "sinks": {}}
        for name, sink in self.sinks.items():
            s = sink.stats()
            proc = self.processors.get(name)
            queued_out = proc.dropped if proc is not None else 0
            rest = self.counter.ended - s["exported"] - s["dropped"] - queued_out
            s["pending"], s["dropped_queue"] = (0, queued_out + rest) if self._shut else (rest, queued_out)
            out["sinks"][name] = s
        return out

    def shutdown(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Flush every sink within ``timeout_s`` overall, close them, return final :meth:`stats`."""
        global _current
        with _lock:
            if not self._shut:
                deadline = time.monotonic() + timeout_s
                for proc in self.processors.values():
                    proc.shutdown_deadline = deadline
                self.provider.shutdown()  # each processor exports what is queued, bounded
                self._shut = True
                for name, s in self.stats()["sinks"].items():
                    proc = self.processors.get(name)
                    late = s["dropped_queue"] - (proc.dropped if proc is not None else 0)
                    if late > 0:  # an export outlived the bound: count it, never lose silently
                        counters.record_dropped(name, "shutdown", late)
                    if s["dropped_queue"] > 0:
                        logger.warning(
                            "telemetry: %s lost %d spans to a full queue or a late shutdown "
                            "(sink slower than span creation; raise OTEL_BSP_MAX_QUEUE_SIZE)",
                            name, s["dropped_queue"],
                        )
            if _current is self:
                _current = None
        return self.stats()


_lock = threading.RLock()
_current: Telemetry | None = None


def resolve_exporters(otlp: bool | None, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Which non-SQLite exporters to build: names among ``otlp-grpc``, ``otlp-http``, ``console``.

    Pure function of ``otlp`` and the environment (tests call it directly).
    """
    env = os.environ if env is None else env
    if otlp is False:
        return ()
    listed = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if otlp is None:
        if listed:
            wanted = [n for n in listed if n != "none"] if "none" not in listed else []
        elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            wanted = ["otlp"]
        else:
            wanted = []
    else:  # otlp=True: OTLP regardless, plus console if the environment asks for it
        wanted = ["otlp"] + (["console"] if "console" in listed else [])
    out: list[str] = []
    for name in wanted:
        if name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            ).strip().lower()
            if protocol not in _SUPPORTED_PROTOCOLS:
                raise ValueError(
                    f"OTLP protocol {protocol!r} is not supported by the OpenTelemetry Python "
                    f"SDK exporters; use one of {', '.join(_SUPPORTED_PROTOCOLS)} "
                    "(OTEL_EXPORTER_OTLP_PROTOCOL / OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)"
                )
            out.append("otlp-grpc" if protocol == "grpc" else "otlp-http")
        elif name == "console":
            out.append("console")
        else:
            logger.warning("OTEL_TRACES_EXPORTER=%r: unknown exporter %r ignored", listed, name)
    return tuple(dict.fromkeys(out))


def _build_exporter(name: str) -> SpanExporter:
    # Constructed without arguments on purpose: the SDK exporters then read endpoint,
    # headers, timeout, compression and TLS settings from the OTEL_* variables themselves.
    if name == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as H

        return H()
    if name == "console":
        return ConsoleSpanExporter()
    raise ValueError(f"unknown exporter {name!r}")


def _bsp(sink: str, exporter: SpanExporter, on_drop: DropHook | None) -> CountingBatchSpanProcessor:
    kwargs: dict[str, Any] = {}
    for env_name, (arg, default) in _BSP_DEFAULTS.items():
        if env_name not in os.environ:  # the SDK reads the variable itself when arg is None
            kwargs[arg] = default
    return CountingBatchSpanProcessor(sink, exporter, on_drop=on_drop, **kwargs)


def _add_sinks(
    provider: TracerProvider,
    names: tuple[str, ...],
    db_url: str | os.PathLike[str] | None,
    sqlite_options: Mapping[str, Any] | None,
) -> tuple[dict[str, SQLiteSpanExporter | CountingExporter], dict[str, CountingBatchSpanProcessor]]:
    """Build each named sink and hang it on ``provider`` behind its own batch processor.

    The SQLite sink, if any, also records every sink's drops (``note_drop``), and its
    processor is added last: the provider shuts processors down in order, so the other
    sinks' final drops are known when the SQLite exporter writes its last drop rows.
    """
    sinks: dict[str, SQLiteSpanExporter | CountingExporter] = {}
    on_drop: DropHook | None = None
    if "sqlite" in names:
        assert db_url is not None
        sq = SQLiteSpanExporter(db_url, **(sqlite_options or {}))
        sq.set_origin(provider.resource)
        sinks["sqlite"], on_drop = sq, sq.note_drop
    for name in names:
        if name != "sqlite":
            sinks[name] = CountingExporter(name, _build_exporter(name), on_drop)
    procs: dict[str, CountingBatchSpanProcessor] = {}
    for name in sorted(sinks, key=lambda n: n == "sqlite"):
        # The SQLite exporter counts its own drops itself (note_drop from _drop).
        procs[name] = _bsp(name, sinks[name], on_drop)
        provider.add_span_processor(procs[name])
    return {n: sinks[n] for n in names}, procs


def _install_global(provider: TracerProvider) -> bool:
    """Make ``provider`` OpenTelemetry's global one; False if another got there first."""
    trace.set_tracer_provider(provider)  # OTel allows this once per process
    if trace.get_tracer_provider() is provider:
        return True
    logger.warning(
        "another global TracerProvider is installed; hybrid-pd spans go through "
        "Telemetry.tracer() only"
    )
    return False


def default_engine_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def configure_tracing(
    service_name: str,
    role: str,
    db_url: str | os.PathLike[str] | None = None,
    otlp: bool | None = None,
    *,
    engine_id: str | None = None,
    resource_attributes: Mapping[str, str | int | float | bool] | None = None,
    extra_processors: Sequence[SpanProcessor] = (),
    set_global: bool = True,
    sqlite_options: Mapping[str, Any] | None = None,
) -> Telemetry:
    """Configure this process's tracing once; see the module docstring.

    ``db_url``: SQLAlchemy URL or plain path of the span database (None: no database).
    ``otlp``: True / False / None (follow ``OTEL_*``).  ``extra_processors`` are added
    after ours (tests hang an InMemorySpanExporter there).  ``set_global`` installs the
    provider as OpenTelemetry's global one (possible once per process; OTel refuses a
    second, in which case use ``Telemetry.tracer()``).
    """
    global _current
    engine_id = engine_id or default_engine_id(role)
    names = (("sqlite",) if db_url is not None else ()) + resolve_exporters(otlp)
    cfg = TelemetryConfig(
        service_name=service_name,
        role=role,
        engine_id=engine_id,
        db_url=None if db_url is None else os.fspath(db_url),
        sinks=names,
    )
    with _lock:
        if _current is not None:
            if _current.config != cfg:
                logger.warning(
                    "tracing already configured (%s); keeping it and ignoring %s", _current.config, cfg
                )
            return _current

        resource = Resource.create(
            {
                **(resource_attributes or {}),
                A.RESOURCE_SERVICE_NAME: service_name,
                A.RESOURCE_ROLE: role,
                A.RESOURCE_ENGINE_ID: engine_id,
                A.RESOURCE_PID: os.getpid(),
            }
        )
        # host.name unless the caller or OTEL_RESOURCE_ATTRIBUTES named it (merge: theirs win)
        resource = Resource({A.RESOURCE_HOST_NAME: socket.gethostname()}).merge(resource)
        provider = TracerProvider(resource=resource)
        counter = SpanCounter()
        # The counter goes first so that a span counts as created even if a later
        # processor misbehaves.
        provider.add_span_processor(counter)
        sinks, procs = _add_sinks(provider, names, db_url, sqlite_options)
        for p in extra_processors:
            provider.add_span_processor(p)
        is_global = _install_global(provider) if set_global else False
        _current = Telemetry(cfg, provider, counter, sinks, is_global, procs)
        logger.info(
            "tracing: service=%s role=%s engine=%s sinks=%s", service_name, role, engine_id,
            ",".join(names) or "none",
        )
        return _current


def current() -> Telemetry | None:
    """The configured :class:`Telemetry` of this process, if any."""
    return _current


def shutdown(timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Flush and close the current configuration; returns its final stats (None if none)."""
    t = _current
    return t.shutdown(timeout_s) if t is not None else None
