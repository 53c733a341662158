"""Span names, attribute keys and configure_tracing, tested with InMemorySpanExporter.

No GPU, NIXL or vLLM required.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from unittest import mock

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
from opentelemetry.trace import Span, StatusCode

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import setup as S
from hybrid_pd.telemetry.schema import CONTRACT_COLUMNS, spans_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "telemetry.md"
PACKAGE = ROOT / "hybrid_pd"
ATTRIBUTES_MODULE = "hybrid_pd.telemetry.attributes"
# Modules that define the names or read spans back (storage, dashboard): a reference
# there is no evidence that anything emits the span or attribute.
NOT_EMITTERS = ("telemetry/attributes.py", "telemetry/schema.py", "telemetry/sqlite_exporter.py",
                "dashboard/")
# Registered but not emitted, with the module that still needs them.  Each entry must
# stay unemitted and referenced there, so this can only shrink.
NOT_EMITTED_YET: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _no_leftover_config():
    yield
    S.shutdown()  # configure_tracing is process-global: never leak one into the next test


# ------------------------------------------------------------------------ the registries


def test_span_names_live_in_hybrid_pd_namespace() -> None:
    names = [v for k, v in vars(A).items() if k.startswith("SPAN_")]
    assert sorted(names) == sorted(A.SPANS), "every SPAN_* constant is documented in SPANS"
    for name in names:
        assert name.startswith("hybrid_pd."), name


def test_attribute_keys_namespaces_and_types() -> None:
    assert A.ATTRIBUTES, "registry is empty"
    for key, spec in A.ATTRIBUTES.items():
        assert key == spec.key
        assert key.split(".")[0] in ("hybrid_pd", "kv", "gen_ai"), key
        assert spec.type in ("string", "int", "double", "bool"), spec
        assert spec.meaning.strip(), key


def test_gen_ai_keys_are_real_semconv_names() -> None:
    # Only use gen_ai.* where the GenAI semantic conventions define the name.
    semconv = {v for k, v in vars(gen_ai_attributes).items() if k.startswith("GEN_AI_")}
    ours = {k for k in A.ATTRIBUTES if k.startswith("gen_ai.")}
    assert ours, "expected some gen_ai.* keys"
    assert ours <= semconv, f"not in semconv: {sorted(ours - semconv)}"


def test_no_payload_keys() -> None:
    # No prompt text, completion text, messages or token ids: counts and sizes only.
    for key in list(A.ATTRIBUTES) + list(A.SPANS):
        bad = [p for p in A.FORBIDDEN_KEY_PARTS if p in key]
        assert not bad, f"{key!r} looks like payload data ({bad})"
    # The semconv names that DO carry payload are exactly the ones we must not use.
    for payload_key in (gen_ai_attributes.GEN_AI_PROMPT, gen_ai_attributes.GEN_AI_COMPLETION,
                        gen_ai_attributes.GEN_AI_INPUT_MESSAGES):
        assert any(p in payload_key for p in A.FORBIDDEN_KEY_PARTS), payload_key


def test_promoted_columns_exist_and_come_from_registered_keys() -> None:
    cols = set(spans_table.c.keys())
    for col, key in A.PROMOTED_COLUMNS.items():
        assert col in cols, col
        assert key in A.ATTRIBUTES, key
    assert set(CONTRACT_COLUMNS) <= cols


def test_schema_doc_is_in_sync() -> None:
    text = DOC.read_text()
    assert A.render_schema() in text, (
        "docs/telemetry.md is stale; regenerate its tables with "
        "python -c 'from hybrid_pd.telemetry.attributes import render_schema; print(render_schema())'"
    )


def test_schema_doc_prose_names_only_registered_keys() -> None:
    # The prose outside the generated tables must not keep a removed span or key alive.
    # hybrid_pd.telemetry.* are module paths and metric names, not span vocabulary.
    registered = set(A.SPANS) | set(A.ATTRIBUTES)
    named = {m.group(1) for m in re.finditer(r"`((?:hybrid_pd|kv|gen_ai)\.[a-z0-9_.]*[a-z0-9_])",
                                             DOC.read_text())}
    stale = sorted(n for n in named if n not in registered and not n.startswith("hybrid_pd.telemetry."))
    assert not stale, f"docs/telemetry.md names unregistered spans/attributes: {stale}"


def _attribute_refs(path: Path) -> set[str]:
    """Names of ``attributes`` read in ``path``: ``A.NAME``, ``attributes.NAME`` or imported."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: set[str] = set()
    refs: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if module in (ATTRIBUTES_MODULE, ".attributes"):
                refs.update(a.name for a in node.names)
            elif module in ("hybrid_pd.telemetry", "."):
                aliases.update(a.asname or a.name for a in node.names if a.name == "attributes")
        elif isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name == ATTRIBUTES_MODULE and a.asname)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            refs.add(node.attr)
    return refs


def _refs_by_module() -> dict[str, set[str]]:
    return {p.relative_to(PACKAGE).as_posix(): _attribute_refs(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _registered_constants() -> dict[str, str]:
    """Constant name -> value for every registered span name and attribute key."""
    registered = set(A.SPANS) | set(A.ATTRIBUTES)
    return {k: v for k, v in vars(A).items() if k.isupper() and isinstance(v, str) and v in registered}


def test_every_registered_name_is_emitted() -> None:
    refs = _refs_by_module()
    emitted = set().union(*(r for mod, r in refs.items() if not mod.startswith(NOT_EMITTERS)))
    consts = _registered_constants()
    # A key may have several constant names (RESOURCE_ROLE is ROLE): one emitted is enough.
    emitted_values = {v for k, v in consts.items() if k in emitted}
    assert set(consts.values()) == set(A.SPANS) | set(A.ATTRIBUTES)
    unused = sorted(f"{k} ({v})" for k, v in consts.items()
                    if v not in emitted_values and k not in NOT_EMITTED_YET)
    assert not unused, f"registered in attributes.py but emitted nowhere in hybrid_pd: {unused}"
    for name, holder in NOT_EMITTED_YET.items():
        assert consts[name] not in emitted_values, f"{name} is emitted now: drop it from NOT_EMITTED_YET"
        assert name in refs.get(holder, set()), (
            f"{holder} no longer uses {name}: remove it from attributes.py and NOT_EMITTED_YET")


def test_emission_scan_sees_each_import_style(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from hybrid_pd.telemetry import attributes as A\n"
                   "from hybrid_pd.telemetry.attributes import KV_LAYER\n"
                   "from . import attributes\n"
                   "import hybrid_pd.telemetry.attributes as T\n"
                   "x = (A.KV_BYTES, attributes.SPAN_KV_READ, T.KV_RANK, other.KV_VIEW)\n"
                   "# A.KV_GROUP in a comment is not a use\n")
    assert _attribute_refs(src) == {"KV_LAYER", "KV_BYTES", "SPAN_KV_READ", "KV_RANK"}


# ----------------------------------------------------------------------------- helpers


def test_set_attrs_sets_and_skips_none(mem) -> None:
    provider, exporter = mem
    with provider.get_tracer("t").start_as_current_span(A.SPAN_KV_READ) as span:
        A.set_attrs(span, {A.KV_LAYER: 7, A.KV_BYTES: 4096, A.KV_PEER_RANK: None})
    (s,) = exporter.get_finished_spans()
    assert s.name == A.SPAN_KV_READ
    assert dict(s.attributes) == {A.KV_LAYER: 7, A.KV_BYTES: 4096}


def test_set_attrs_not_recording_does_not_touch_span() -> None:
    # attributes only under is_recording() -- a sampled-out span costs nothing.
    span = mock.Mock(spec=Span)
    span.is_recording.return_value = False
    A.set_attrs(span, {A.KV_LAYER: 1})
    A.mark_failed(span, "timeout", RuntimeError("x"))
    span.set_attributes.assert_not_called()
    span.set_attribute.assert_not_called()
    span.set_status.assert_not_called()
    span.record_exception.assert_not_called()


def test_mark_failed_records_reason_and_caller_reraises(mem) -> None:
    provider, exporter = mem
    tracer = provider.get_tracer("t")
    with pytest.raises(TimeoutError):
        # set_status_on_exception=False: otherwise the SDK replaces our short reason with
        # the exception text when the exception leaves the span.
        with tracer.start_as_current_span(
            A.SPAN_KV_READ, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                raise TimeoutError("peer did not answer in 30 s")
            except TimeoutError as exc:
                A.mark_failed(span, "timeout", exc)
                raise
    (s,) = exporter.get_finished_spans()
    assert s.status.status_code is StatusCode.ERROR
    assert s.status.description == "timeout"
    assert s.attributes[A.KV_STATUS] == "failed"
    assert s.attributes[A.KV_FAILURE_REASON] == "timeout"
    assert [e.name for e in s.events] == ["exception"]


# --------------------------------------------------------------------- configure_tracing


def test_configure_tracing_resource_and_counts() -> None:
    mem = InMemorySpanExporter()
    tel = S.configure_tracing(
        "svc-a", "decode", otlp=False, engine_id="eng-1",
        extra_processors=[SimpleSpanProcessor(mem)], set_global=False,
    )
    tracer = tel.tracer()
    with tracer.start_as_current_span(A.SPAN_KV_TRANSFER):
        for layer in range(3):
            with tracer.start_as_current_span(A.SPAN_KV_READ) as span:
                A.set_attrs(span, {A.KV_LAYER: layer})
    spans = mem.get_finished_spans()
    assert len(spans) == 4
    res = spans[0].resource.attributes
    assert res["service.name"] == "svc-a"
    assert res[A.RESOURCE_ROLE] == "decode"
    assert res[A.RESOURCE_ENGINE_ID] == "eng-1"
    assert isinstance(res[A.RESOURCE_PID], int)
    parent = next(s for s in spans if s.name == A.SPAN_KV_TRANSFER)
    assert all(s.parent.span_id == parent.context.span_id for s in spans if s is not parent)
    stats = tel.shutdown()
    assert stats["created"] == stats["ended"] == 4
    assert stats["sinks"] == {}


def test_configure_tracing_is_idempotent_and_reconfigurable(caplog) -> None:
    # apply -> apply (same object, warning on different args) -> revert -> apply (new one)
    a = S.configure_tracing("svc", "proxy", otlp=False, set_global=False, engine_id="e")
    assert S.configure_tracing("svc", "proxy", otlp=False, set_global=False, engine_id="e") is a
    with caplog.at_level(logging.WARNING, logger="hybrid_pd.telemetry.setup"):
        assert S.configure_tracing("other", "proxy", otlp=False, set_global=False) is a
    assert "already configured" in caplog.text
    assert S.current() is a
    a.shutdown()
    assert S.current() is None
    b = S.configure_tracing("svc", "proxy", otlp=False, set_global=False, engine_id="e")
    assert b is not a and S.current() is b
    with b.tracer().start_as_current_span("x"):
        pass
    assert b.stats()["created"] == 1


def test_configure_tracing_with_sqlite_flushes_on_shutdown(tmp_path) -> None:
    import sqlite3

    db = tmp_path / "t.db"
    tel = S.configure_tracing("svc", "prefill", db_url=db, otlp=False, set_global=False)
    tracer = tel.tracer()
    for i in range(25):
        with tracer.start_as_current_span(A.SPAN_KV_DESC_BUILD) as span:
            A.set_attrs(span, {A.KV_DESC_SCOPE: "local", A.KV_DESCRIPTORS: i})
    # Nothing needs to have reached the database yet (500 ms batch delay); shutdown flushes.
    stats = tel.shutdown()
    assert stats["sinks"]["sqlite"] == {
        "exported": 25, "dropped": 0, "dropped_by_reason": {}, "last_error": None, "pending": 0,
        "dropped_queue": 0,
    }
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT role, descriptors FROM spans ORDER BY descriptors").fetchall()
    assert rows == [("prefill", i) for i in range(25)]


@pytest.mark.parametrize(
    ("otlp", "env", "expected"),
    [
        (None, {}, ()),  # nothing configured: no OTLP (no dead localhost:4317 spam)
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"}, ("otlp-grpc",)),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318/v1/traces",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ("otlp-http",)),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_TRACES_EXPORTER": "none"}, ()),
        (None, {"OTEL_TRACES_EXPORTER": "otlp,console"}, ("otlp-grpc", "console")),
        (None, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, ("otlp-http",)),
        (True, {}, ("otlp-grpc",)),
        (True, {"OTEL_TRACES_EXPORTER": "none"}, ("otlp-grpc",)),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"}, ()),
    ],
)
def test_resolve_exporters_follows_otel_env(otlp, env, expected) -> None:
    assert S.resolve_exporters(otlp, env) == expected


def test_resolve_exporters_rejects_http_json() -> None:
    with pytest.raises(ValueError, match="http/json.*not supported.*grpc, http/protobuf"):
        S.resolve_exporters(True, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_configure_tracing_builds_otlp_exporters_from_env(monkeypatch) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    tel = S.configure_tracing("svc", "proxy", set_global=False)
    sink = tel.sinks["otlp-http"]
    assert isinstance(sink, S.CountingExporter) and isinstance(sink.inner, OTLPSpanExporter)
    # The SDK exporter read the endpoint from the environment (base URL + /v1/traces).
    assert sink.inner._endpoint == "http://127.0.0.1:9/v1/traces"
    assert tel.config.sinks == ("otlp-http",)
