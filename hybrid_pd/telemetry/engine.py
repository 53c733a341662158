"""Tracing inside vLLM engine processes, and the per-request trace hand-off.

Engines are started by ``hybrid-pd serve`` (or anyone) with two environment variables:

* ``HYBRID_PD_TELEMETRY_DB`` -- SQLAlchemy URL or path of the span database (the same
  file the proxy writes; WAL makes several writers safe);
* ``HYBRID_PD_ROLE`` -- ``prefill`` / ``decode`` (resource attribute ``hybrid_pd.role``).

The standard ``OTEL_*`` variables add OTLP next to it (see :mod:`.setup`).  Neither set:
no provider is built and every span call is OpenTelemetry's no-op (one attribute check).

The request's trace crosses processes inside ``kv_transfer_params`` (the only per-request
channel a KV connector sees): the proxy adds ``{"hybrid_pd_trace": {"traceparent": ...,
"request_id": ...}}`` (``proxy.with_trace``), the connector's scheduler copies it into the
connector metadata, and the worker parents its spans on it (:func:`context_of`).  W3C
``traceparent`` text, never pickle.

Spans still queued when an engine process exits would be lost, so the first
:func:`engine_tracer` call registers :func:`shutdown_engine_tracing` with ``atexit``:
it flushes every sink within :data:`SHUTDOWN_TIMEOUT_S` and closes them.  vLLM's engine
core and workers turn SIGTERM/SIGINT into ``SystemExit``, so ``atexit`` runs on their
normal shutdown; a SIGKILL or ``os._exit`` skips it (the spans still queued then are lost
and, the process being gone, uncounted).  A connector may also call
:func:`shutdown_engine_tracing` from its own ``shutdown()``; calling it twice is harmless.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from hybrid_pd import settings

# Aliases of the settings names, kept only while proxy.py, launch.py and
# tests/test_vllm_tracing.py still read them from here; new code imports settings.
ENV_DB = settings.ENV_TELEMETRY_DB
ENV_ROLE = settings.ENV_ROLE
PARAMS_KEY = settings.TRACE_PARAMS_KEY

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_tracer: trace.Tracer | None = None
_W3C = TraceContextTextMapPropagator()
# Bound on the exit flush: the batch delay plus a few SQLite lock waits, and short enough
# that vLLM's own shutdown timeouts (which then kill the process) are not reached.
SHUTDOWN_TIMEOUT_S = 10.0
_atexit_registered = False


def shutdown_engine_tracing(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> dict[str, Any] | None:
    """Flush and close this engine's sinks (bounded); later spans are counted as dropped."""
    from hybrid_pd.telemetry import setup

    try:
        return setup.shutdown(timeout_s)
    except Exception as exc:  # at exit: report, never raise
        logger.error("hybrid-pd telemetry: flushing at shutdown failed: %s", exc)
        return None


def _wants_tracing(env: Mapping[str, str]) -> bool:
    if env.get(settings.ENV_TELEMETRY_DB):
        return True
    exporters = env.get("OTEL_TRACES_EXPORTER", "")
    if exporters:
        return exporters.strip().lower() != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def engine_tracer(engine_id: str | None = None) -> trace.Tracer:
    """This engine process's tracer (configured on first call from the environment).

    Not installed as the global provider: vLLM's own ``--otlp-traces-endpoint`` tracing
    may own that slot in the same process.
    """
    global _tracer
    with _lock:
        if _tracer is not None:
            return _tracer
        if not _wants_tracing(os.environ):
            _tracer = trace.NoOpTracer()
            return _tracer
        from hybrid_pd.telemetry import setup

        role = os.environ.get(settings.ENV_ROLE, "engine")
        try:
            tel = setup.configure_tracing(
                f"hybrid-pd-{role}", role, db_url=os.environ.get(settings.ENV_TELEMETRY_DB) or None,
                engine_id=engine_id, set_global=False,
            )
            _tracer = tel.tracer()
            global _atexit_registered
            if not _atexit_registered:
                atexit.register(shutdown_engine_tracing)
                _atexit_registered = True
        except Exception as exc:  # telemetry must never stop an engine
            logger.error("hybrid-pd telemetry disabled in this engine: %s", exc)
            _tracer = trace.NoOpTracer()
        return _tracer


# Keys of the hand-off: the W3C trace context, the proxy's request id and, in D's, the
# base URL of the P engine that prefilled the request (where D fetches P's integrity
# digests, hybrid_pd.connector.integrity).
HAND_OFF_KEYS = ("traceparent", "tracestate", "request_id", "prefill_url")


def from_params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The trace hand-off from a request's ``kv_transfer_params`` (None if absent/bad)."""
    if not params:
        return None
    info = params.get(settings.TRACE_PARAMS_KEY)
    if not isinstance(info, Mapping):
        return None
    out = {k: v for k, v in info.items() if k in HAND_OFF_KEYS
           and isinstance(v, str) and len(v) < 512}
    return out or None


def context_of(info: Mapping[str, str] | None) -> Context | None:
    """Parent context for spans of a request (None: start a new trace)."""
    if not info or "traceparent" not in info:
        return None
    return _W3C.extract(dict(info))
