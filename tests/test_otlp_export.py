"""OTLP export to real receivers from PyPI, side by side with the SQLite sink.

* ``rotel`` (a collector binary, ``--exporter blackhole --debug-log traces``) receives the
  same spans over OTLP/gRPC and over OTLP/HTTP; we parse its debug log.
* ``oteltap`` (embeddable, OTLP/HTTP protobuf only) receives them as protobuf ``Span``s.
* A dead endpoint: OTLP drops are counted, SQLite still stores everything, shutdown is
  bounded.

Each exporter is configured only through the standard ``OTEL_*`` variables.  Ports come
from the OS.  No GPU, NIXL or vLLM required.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Rotel, free_port

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import setup as S


@pytest.fixture(autouse=True)
def _no_leftover_config():
    yield
    S.shutdown()


def emit_standard_spans(tracer: Any, run: str) -> int:
    """The same small trace every time: a proxy request, a transfer and 3 per-layer reads."""
    with tracer.start_as_current_span(A.SPAN_PROXY_REQUEST) as root:
        A.set_attrs(root, {A.REQUEST_ID: run, A.GEN_AI_REQUEST_MODEL: "tiny-nemotron-h",
                           A.GEN_AI_REQUEST_MAX_TOKENS: 46})
        with tracer.start_as_current_span(A.SPAN_KV_TRANSFER) as xfer:
            A.set_attrs(xfer, {A.REQUEST_ID: run})
            for layer, kind in enumerate(("attention", "mamba", "mamba")):
                with tracer.start_as_current_span(A.SPAN_KV_READ) as span:
                    A.set_attrs(span, {A.REQUEST_ID: run, A.KV_LAYER: layer,
                                       A.KV_LAYER_KIND: kind, A.KV_BYTES: 65536 * (layer + 1),
                                       A.KV_NIXL_XFER_US: 12.5, A.KV_BACKEND: "UCX"})
    return 5


def sqlite_spans(db: Path, run: str) -> dict[str, tuple[str, str | None, str]]:
    """span_id -> (name, parent_span_id, trace_id) for one run, as stored in SQLite."""
    with sqlite3.connect(db) as conn:
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
            "SELECT span_id, name, parent_span_id, trace_id FROM spans WHERE request_id = ?",
            (run,))}


# ----------------------------------------------------------------------------- rotel




def test_same_spans_arrive_over_grpc_and_http(rotel: Rotel, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "side_by_side.db"
    seen: dict[str, list[tuple[Any, ...]]] = {}
    for protocol, port in (("grpc", rotel.grpc_port), ("http/protobuf", rotel.http_port)):
        # Only the standard variables: the SDK exporters read them themselves.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        run = f"run-{protocol}"
        tel = S.configure_tracing(f"svc-{protocol}", "proxy", db_url=db, set_global=False)
        sink = "otlp-grpc" if protocol == "grpc" else "otlp-http"
        assert set(tel.sinks) == {"sqlite", sink}
        n = emit_standard_spans(tel.tracer(), run)
        stats = tel.shutdown()
        assert stats["created"] == n
        assert stats["sinks"][sink]["exported"] == n and stats["sinks"][sink]["dropped"] == 0
        assert stats["sinks"]["sqlite"]["exported"] == n

        stored = sqlite_spans(db, run)
        got = rotel.wait_for(set(stored))
        assert set(got) == set(stored), f"{protocol}: rotel got {len(got)}/{n} spans"
        for span_id, (name, parent, trace_id) in stored.items():
            r = got[span_id]
            # The same ids, parents and names in the collector as in SQLite.
            assert (r["name"], r["parent"], r["trace_id"], r["service"]) == (
                name, parent, trace_id, f"svc-{protocol}"), r
            assert r["attributes"][A.REQUEST_ID] == run
        seen[protocol] = sorted(
            (r["name"], r["parent"] is None,
             tuple(sorted((k, v) for k, v in r["attributes"].items() if k != A.REQUEST_ID)))
            for r in got.values())
    # The same spans (names, structure, attribute values) over both protocols.
    assert seen["grpc"] == seen["http/protobuf"]
    reads = [s for s in seen["grpc"] if s[0] == A.SPAN_KV_READ]
    assert [dict(s[2])[A.KV_LAYER] for s in reads] == [0, 1, 2]
    assert all(dict(s[2])[A.KV_NIXL_XFER_US] == 12.5 for s in reads)


# ---------------------------------------------------------------------------- oteltap


def test_oteltap_receives_protobuf_spans_over_http(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    oteltap = pytest.importorskip("oteltap")
    port = free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    db = tmp_path / "tap.db"
    run = "run-oteltap"

    def produce() -> dict[str, Any]:
        tel = S.configure_tracing("svc-tap", "decode", db_url=db, set_global=False)
        emit_standard_spans(tel.tracer(), run)
        return tel.shutdown()

    async def main() -> tuple[dict[str, Any], list[Any]]:
        settings = oteltap.OtelTapHttpProtobufReceiverSettings(http_port=port)
        received: list[Any] = []
        async with oteltap.OtelTapHttpProtobufReceiver(settings) as rx:
            async def collect() -> None:
                async for span in rx.stream_traces():
                    received.append(span)

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.05)  # let the subscriber register before spans arrive
            stats = await asyncio.to_thread(produce)
            deadline = time.monotonic() + 15
            while len(received) < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            task.cancel()
        return stats, received

    stats, received = asyncio.run(main())
    assert stats["sinks"]["otlp-http"] == {"exported": 5, "dropped": 0, "last_error": None,
                                           "pending": 0, "dropped_queue": 0}
    stored = sqlite_spans(db, run)
    by_id = {s.span_id.hex(): s for s in received}
    assert set(by_id) == set(stored)
    for span_id, (name, parent, trace_id) in stored.items():
        s = by_id[span_id]
        assert s.name == name and s.trace_id.hex() == trace_id
        assert (s.parent_span_id.hex() or None) == parent
        attrs = {kv.key: kv.value for kv in s.attributes}
        assert attrs[A.REQUEST_ID].string_value == run
        if name == A.SPAN_KV_READ:
            assert attrs[A.KV_BYTES].int_value in (65536, 131072, 196608)
            assert attrs[A.KV_NIXL_XFER_US].double_value == 12.5


# ----------------------------------------------------------------------- dead endpoint


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_dead_otlp_endpoint_drops_counts_and_sqlite_keeps_going(
        protocol: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nobody listens here
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # seconds: bounds each export's retries
    db = tmp_path / "dead.db"
    tel = S.configure_tracing("svc-dead", "proxy", db_url=db, set_global=False)
    t0 = time.perf_counter()
    n = emit_standard_spans(tel.tracer(), "run-dead")
    hot = time.perf_counter() - t0
    t1 = time.monotonic()
    stats = tel.shutdown()
    assert time.monotonic() - t1 < 15, "shutdown must stay bounded with a dead endpoint"
    assert hot < 0.5, f"span creation waited for the dead endpoint ({hot:.2f} s)"
    sink = "otlp-grpc" if protocol == "grpc" else "otlp-http"
    assert stats["sinks"][sink]["exported"] == 0
    assert stats["sinks"][sink]["dropped"] == n  # counted, not silently lost
    assert stats["sinks"]["sqlite"]["exported"] == n
    assert len(sqlite_spans(db, "run-dead")) == n
