"""The ONE place where hybrid-pd's span names and attribute keys are defined.

Every span we emit (executor, connector, proxy, bench, upstream instrumentor) takes its
name and attribute keys from here, the SQLite exporter promotes some of them to columns
(``PROMOTED_COLUMNS``), and ``docs/telemetry.md`` is rendered from the registries below
by :func:`render_schema` (a test keeps the two in sync).

Namespaces:

* ``hybrid_pd.*`` -- who emitted the span and for which request (role, engine, request).
* ``kv.*`` -- the KV-cache transfer itself: layer, view, bytes, descriptors, ranks, NIXL.
* ``gen_ai.*`` -- only where the OpenTelemetry GenAI semantic conventions already name the
  thing (model, token *counts*, operation); the spellings are checked against the
  ``opentelemetry-semantic-conventions`` package in the tests.

Privacy rule: no prompt text, completion text or token ids ever go into a span; only
counts and sizes.  ``FORBIDDEN_KEY_PARTS`` encodes that rule and the tests enforce it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.trace import Span, Status, StatusCode

# --------------------------------------------------------------------------- span names

# Descriptor builds.  One name, three scopes (``kv.desc.scope``): local registration,
# remote (once per handshake) and the per-request block-id -> descriptor-id mapping, so
# a dashboard can ask "all descriptor work" with one ``name =`` predicate.
SPAN_KV_DESC_BUILD = "hybrid_pd.kv.desc_build"
# One NIXL READ handle (per request, or per layer when the plan reads per layer).
SPAN_KV_READ = "hybrid_pd.kv.read"
# The decode side's whole KV pull for one request (bench: parent of its reads; engines: beside them).
SPAN_KV_TRANSFER = "hybrid_pd.kv.transfer"
# Once per P-D pair: agent metadata exchange and remote descriptor registration.
SPAN_KV_HANDSHAKE = "hybrid_pd.kv.handshake"
# D tells P that it may free the request's blocks.
SPAN_KV_NOTIFY = "hybrid_pd.kv.notify"
# A transfer that made no progress for longer than the stall threshold.
SPAN_KV_STALL = "hybrid_pd.kv.stall"
# A transfer given up (timeout, dead peer, bad handshake); blocks are freed once NIXL ends the READ.
SPAN_KV_ABORT = "hybrid_pd.kv.abort"
# KV integrity (--kv-integrity): P digests a request's units, D compares its copy with them.
SPAN_KV_INTEGRITY = "hybrid_pd.kv.integrity"
# The proxy's view of one client request (root of the per-request trace).
SPAN_PROXY_REQUEST = "hybrid_pd.proxy.request"
# The proxy's call to the prefill engine / the decode engine.
SPAN_PROXY_PREFILL = "hybrid_pd.proxy.prefill"
SPAN_PROXY_DECODE = "hybrid_pd.proxy.decode"

# Handover breakdown: one span per phase of a P/D request's time to first token, children
# of its ``hybrid_pd.proxy.request`` span, tiling [proxy received the request, proxy sent
# the first token] without gaps or overlaps, in the order of ``TTFT_PHASES``.
SPAN_TTFT_ROUTER_RECEIVE = "hybrid_pd.ttft.router_receive"
SPAN_TTFT_P_QUEUE = "hybrid_pd.ttft.p_queue"
SPAN_TTFT_P_PREFILL = "hybrid_pd.ttft.p_prefill"
SPAN_TTFT_P_ANSWER = "hybrid_pd.ttft.p_answer"
SPAN_TTFT_ROUTER_TO_D = "hybrid_pd.ttft.router_to_d"
SPAN_TTFT_D_QUEUE = "hybrid_pd.ttft.d_queue"
SPAN_TTFT_HANDSHAKE = "hybrid_pd.ttft.handshake"
SPAN_TTFT_READ_POST = "hybrid_pd.ttft.read_post"
SPAN_TTFT_READ_IN_FLIGHT = "hybrid_pd.ttft.read_in_flight"
SPAN_TTFT_COMPLETION_NOTICED = "hybrid_pd.ttft.completion_noticed"
SPAN_TTFT_D_FIRST_STEP = "hybrid_pd.ttft.d_first_step"
SPAN_TTFT_FIRST_TOKEN_SENT = "hybrid_pd.ttft.first_token_sent"

_TTFT_MEANINGS: dict[str, str] = {
    SPAN_TTFT_ROUTER_RECEIVE: "Proxy: from receiving the request to sending it to P.",
    SPAN_TTFT_P_QUEUE: "From the proxy's call to P to P's scheduler taking the request "
    "(HTTP hop, P's API server, P's queue).",
    SPAN_TTFT_P_PREFILL: "P's scheduler took the request until its prefill (and first sample) finished.",
    SPAN_TTFT_P_ANSWER: "P's prefill finished until the proxy had P's answer.",
    SPAN_TTFT_ROUTER_TO_D: "Proxy had P's answer until D's API server received the request "
    "(vLLM's arrival time).",
    SPAN_TTFT_D_QUEUE: "D's arrival until D's worker started the KV load (D's queue, block allocation).",
    SPAN_TTFT_HANDSHAKE: "D's worker waited for the NIXL handshake with P (zero on a warm pair).",
    SPAN_TTFT_READ_POST: "D built its descriptors and posted every READ.",
    SPAN_TTFT_READ_IN_FLIGHT: "The READs in flight: last post to NIXL's completion (NIXL's own times).",
    SPAN_TTFT_COMPLETION_NOTICED: "NIXL's completion until D's scheduler saw the transfer finished.",
    SPAN_TTFT_D_FIRST_STEP: "D's scheduler saw the KV until its first token was sampled.",
    SPAN_TTFT_FIRST_TOKEN_SENT: "D's first token until the proxy sent it to the client (with the "
    "whole answer for a non-streamed request).",
}
# Phase name (span name without the prefix) in tiling order.
TTFT_PHASES: tuple[str, ...] = tuple(n.rsplit(".", 1)[1] for n in _TTFT_MEANINGS)

SPANS: dict[str, str] = {
    SPAN_KV_DESC_BUILD: "Descriptor list build; `kv.desc.scope` says local registration, "
    "remote (per handshake) or the per-request block-id -> descriptor-id mapping.",
    SPAN_KV_READ: "One NIXL READ handle: post to DONE/ERR; per layer when the plan reads per layer.",
    SPAN_KV_TRANSFER: "Decode side: all reads of one request (in `hybrid-pd bench` the parent of its "
    "`hybrid_pd.kv.read` spans; inside the engines their sibling under the proxy's decode call).",
    SPAN_KV_HANDSHAKE: "Once per P-D pair: agent metadata, base addresses, block counts.",
    SPAN_KV_NOTIFY: "D notifies P that the request's blocks may be freed; inside a prefill engine: "
    "the blocks held for D, from the hand-over to D's notification (or the lease expiry).",
    SPAN_KV_STALL: "A transfer without progress for longer than the stall threshold.",
    SPAN_KV_ABORT: "A transfer given up (timeout, dead peer, bad handshake); blocks freed once NIXL ends the READ.",
    SPAN_KV_INTEGRITY: "KV integrity check of one request on one rank (`--kv-integrity`): on P the "
    "digest of its units after the prefill (`kv.status` `digested`); on D the digest of its copy "
    "once every READ is done and the comparison with P's (`done`), ERROR `mismatch` once per "
    "differing (layer, view, P rank) naming `kv.layer`, `kv.view`, `kv.peer_rank` (P) and "
    "`kv.rank` (D), the request then failed; ERROR `unchecked` when P's digests did not arrive "
    "(the request goes on).",
    SPAN_PROXY_REQUEST: "The proxy's handling of one client request (trace root; a streamed one ends with its stream).",
    SPAN_PROXY_PREFILL: "The proxy's call to the prefill engine.",
    SPAN_PROXY_DECODE: "The proxy's call to the decode engine.",
    **{name: "Handover phase (child of the proxy's request span). " + meaning
       for name, meaning in _TTFT_MEANINGS.items()},
}

# ----------------------------------------------------------------------- attribute keys


@dataclass(frozen=True)
class AttrSpec:
    """One attribute key: its OTel value type and what it means (for the schema doc)."""

    key: str
    type: str  # "string" | "int" | "double" | "bool"
    meaning: str


# Who / which request.  Role and engine id are also resource attributes (set once by
# setup.configure_tracing); they are repeated on a span only when it differs.
ROLE = "hybrid_pd.role"
ENGINE_ID = "hybrid_pd.engine_id"
REQUEST_ID = "hybrid_pd.request_id"
CONNECTOR = "hybrid_pd.connector"
# The engine instance a proxy call ran on (the router may choose among several P and D).
BACKEND_URL = "hybrid_pd.backend.url"
BACKEND_HOST = "hybrid_pd.backend.host"
BACKEND_ENGINE_ID = "hybrid_pd.backend.engine_id"

# GenAI semantic conventions (names must match opentelemetry-semantic-conventions).
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"

# KV transfer.
KV_DESC_SCOPE = "kv.desc.scope"
KV_VIEW = "kv.view"
KV_LAYER = "kv.layer"
KV_LAYER_KIND = "kv.layer_kind"
KV_GROUP = "kv.group"
KV_BYTES = "kv.bytes"
KV_DESCRIPTORS = "kv.descriptors"
KV_RANK = "kv.rank"
KV_TP_SIZE = "kv.tp_size"
KV_PEER_RANK = "kv.peer_rank"
KV_PEER_TP_SIZE = "kv.peer_tp_size"
KV_PEER_ENGINE_ID = "kv.peer_engine_id"
KV_BACKEND = "kv.backend"
KV_STATUS = "kv.status"
KV_FAILURE_REASON = "kv.failure_reason"
KV_NIXL_POST_US = "kv.nixl.post_us"
KV_NIXL_XFER_US = "kv.nixl.xfer_us"
KV_NIXL_DESC_COUNT = "kv.nixl.desc_count"
KV_COMPLETION_LAG_NS = "kv.completion_lag_ns"
KV_WAITED_MS = "kv.waited_ms"
KV_READS = "kv.reads"
KV_POLLS = "kv.polls"
KV_UNITS = "kv.units"
KV_MISMATCHES = "kv.mismatches"
KV_DIGEST_US = "kv.digest_us"

# Handover breakdown (phase spans and the proxy's request span).
TTFT_MS = "hybrid_pd.ttft_ms"
TTFT_PHASE = "hybrid_pd.ttft.phase"
TTFT_INDEX = "hybrid_pd.ttft.index"
TTFT_SKEW_NS = "hybrid_pd.ttft.skew_ns"
TTFT_COLD = "hybrid_pd.ttft.cold"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"

ATTRIBUTES: dict[str, AttrSpec] = {
    a.key: a
    for a in (
        AttrSpec(ROLE, "string", "Process role: `prefill`, `decode`, `proxy` or `bench`."),
        AttrSpec(ENGINE_ID, "string", "Engine instance id (NIXL agent / vLLM engine id)."),
        AttrSpec(REQUEST_ID, "string", "Request id as the proxy assigned it (shared by P and D)."),
        AttrSpec(CONNECTOR, "string", "Which code moved the KV: `hybrid` (our vLLM connector), "
                 "`upstream` (vLLM's NixlConnector) or `bench` (`hybrid-pd bench`)."),
        AttrSpec(BACKEND_URL, "string", "Proxy call spans: base URL of the engine the call went to "
                 "(one of the router's P or D backends)."),
        AttrSpec(BACKEND_HOST, "string", "Proxy call spans: host part of `hybrid_pd.backend.url`."),
        AttrSpec(BACKEND_ENGINE_ID, "string", "Proxy prefill span: the engine id P answered with "
                 "(`remote_engine_id` of its kv_transfer_params); the decode span names it as "
                 "`kv.peer_engine_id`, the P engine D reads from."),
        AttrSpec(GEN_AI_REQUEST_MODEL, "string", "Model name as requested (GenAI semconv)."),
        AttrSpec(GEN_AI_OPERATION_NAME, "string", "`text_completion` or `chat` (GenAI semconv)."),
        AttrSpec(GEN_AI_REQUEST_MAX_TOKENS, "int", "Requested max output tokens (GenAI semconv)."),
        AttrSpec(KV_DESC_SCOPE, "string", "Descriptor build scope: `local`, `remote` or `request`."),
        AttrSpec(KV_VIEW, "string", "Descriptor view: `fa`, `conv_x`, `conv_b`, `conv_c`, `ssm`, `mamba` (conv+SSM "
                 "of a Mamba block, as vLLM's connector lists them) or `all`; on `hybrid_pd.kv.integrity` "
                 "the unit view that differs: `K`, `V`, `x`, `B`, `C` or `SSM`."),
        AttrSpec(KV_LAYER, "int", "Layer index in the model (absent when the span covers all layers)."),
        AttrSpec(KV_LAYER_KIND, "string", "Layer kind: `attention` or `mamba` (or `mixed` for a whole-request read)."),
        AttrSpec(KV_GROUP, "int", "HMA KV-cache group index."),
        AttrSpec(KV_BYTES, "int", "Bytes moved (read) or described (desc_build)."),
        AttrSpec(KV_DESCRIPTORS, "int", "Number of descriptors built or posted."),
        AttrSpec(KV_RANK, "int", "Local TP rank."),
        AttrSpec(KV_TP_SIZE, "int", "Local TP size."),
        AttrSpec(KV_PEER_RANK, "int", "Remote TP rank read from / notified."),
        AttrSpec(KV_PEER_TP_SIZE, "int", "Remote TP size."),
        AttrSpec(KV_PEER_ENGINE_ID, "string", "Remote engine id."),
        AttrSpec(KV_BACKEND, "string", "NIXL backend, e.g. `UCX`."),
        AttrSpec(KV_STATUS, "string", "Outcome: `done`, `failed`, `timeout` or `aborted` (transfers); `cancelled` (proxy spans: the client left); "
                 "`digested`, `done`, `mismatch` or `unchecked` (`hybrid_pd.kv.integrity`)."),
        AttrSpec(KV_FAILURE_REASON, "string", "Why a transfer failed (short, no payload data)."),
        AttrSpec(KV_NIXL_POST_US, "double", "NIXL's own post duration (`get_xfer_telemetry`), microseconds."),
        AttrSpec(KV_NIXL_XFER_US, "double", "NIXL's own transfer duration (`get_xfer_telemetry`), microseconds."),
        AttrSpec(KV_NIXL_DESC_COUNT, "int", "NIXL's descriptor count after merging adjacent descriptors."),
        AttrSpec(KV_COMPLETION_LAG_NS, "int", "Upper bound of how late the read span ends after the real completion: "
                 "first poll that saw DONE minus the previous poll (or the post)."),
        AttrSpec(KV_WAITED_MS, "double", "Stall/abort: how long the transfer waited without progress; "
                 "`hybrid_pd.kv.integrity` on D: how long D waited for P's digests after its READs."),
        AttrSpec(KV_READS, "int", "READ handles: posted (transfer span) or given up unfinished (abort span)."),
        AttrSpec(KV_POLLS, "int", "Transfer span: check_xfer_state rounds until every READ was DONE or aborted."),
        AttrSpec(KV_UNITS, "int", "Integrity: units (a KV head's tokens in one block, a Mamba head's or "
                 "group's state) digested on this rank."),
        AttrSpec(KV_MISMATCHES, "int", "Integrity: units of this span's (layer, view, P rank) whose "
                 "digests differ (`mismatch`), or over the request (`done`: 0)."),
        AttrSpec(KV_DIGEST_US, "double", "Integrity: time this rank spent hashing its units "
                 "(and, on D, comparing), microseconds."),
        AttrSpec(TTFT_MS, "double", "Time to first token as the proxy measured it (request received "
                 "to first token sent), ms; on the request span and every handover phase span."),
        AttrSpec(TTFT_PHASE, "string", "Handover phase name: the last part of the span name, e.g. `p_queue`."),
        AttrSpec(TTFT_INDEX, "int", "Handover phase position, 0 (`router_receive`) to 11 (`first_token_sent`)."),
        AttrSpec(TTFT_SKEW_NS, "int", "Nanoseconds this phase's end was moved because a clock "
                 "(another host's) put it before its start or after the first token; 0 on one box."),
        AttrSpec(TTFT_COLD, "bool", "The request waited for a NIXL handshake (first request of a P-D pair)."),
        AttrSpec(GEN_AI_USAGE_INPUT_TOKENS, "int", "Prompt tokens (GenAI semconv), on the request span "
                 "and the handover phase spans."),
    )
}

# Key substrings that would mean payload data (prompt/completion text, token ids, GenAI
# message bodies).  No registered key may contain one (enforced by the tests).
FORBIDDEN_KEY_PARTS: tuple[str, ...] = (
    "prompt", "token_ids", "text", "messages", "instructions", "gen_ai.completion",
)

# SQLite exporter: column -> attribute key it is promoted from.  Column names are a
# public interface (people query the database with plain SQL): keep them stable.
PROMOTED_COLUMNS: dict[str, str] = {
    "request_id": REQUEST_ID,
    "layer": KV_LAYER,
    "layer_kind": KV_LAYER_KIND,
    "bytes": KV_BYTES,
    "descriptors": KV_DESCRIPTORS,
    "rank": KV_RANK,
    "peer_rank": KV_PEER_RANK,
    "role": ROLE,
    "engine_id": ENGINE_ID,
}

# Resource attributes set by setup.configure_tracing (besides service.name).
RESOURCE_ROLE = ROLE
RESOURCE_ENGINE_ID = ENGINE_ID
RESOURCE_PID = "process.pid"
RESOURCE_HOST_NAME = "host.name"  # OTel semantic conventions: which machine (P and D may differ)
RESOURCE_SERVICE_NAME = "service.name"

AttrValue = str | bool | int | float


# ------------------------------------------------------------------------------ helpers


def set_attrs(span: Span, attrs: Mapping[str, AttrValue | None]) -> None:
    """Set ``attrs`` on ``span``; ``None`` values are skipped.

    Does nothing unless the span is recording, so a sampled-out or no-op span costs one
    call (compute attributes only under ``is_recording()``).  Callers that
    must *compute* values should check ``span.is_recording()`` themselves first.
    """
    if not span.is_recording():
        return
    span.set_attributes({k: v for k, v in attrs.items() if v is not None})


def mark_failed(span: Span, reason: str, exc: BaseException | None = None) -> None:
    """Mark a transfer span as failed: status ERROR, ``kv.status``, ``kv.failure_reason``.

    The caller still re-raises ``exc``: telemetry records failures, it never hides them.
    Open the span with ``set_status_on_exception=False`` to keep the short ``reason`` as
    the status description (the SDK otherwise overwrites it with the exception text).
    """
    if not span.is_recording():
        return
    span.set_attributes({KV_STATUS: "failed", KV_FAILURE_REASON: reason})
    if exc is not None:
        span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, reason))


def render_schema() -> str:
    """The schema doc (Markdown) -- the text of ``docs/telemetry.md``'s generated part."""
    out: list[str] = [
        "## Span names",
        "",
        "| name | meaning |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {meaning} |" for name, meaning in SPANS.items()]
    out += ["", "## Attributes", "", "| key | type | meaning |", "|---|---|---|"]
    out += [f"| `{a.key}` | {a.type} | {a.meaning} |" for a in ATTRIBUTES.values()]
    out += [
        "",
        "## Promoted columns (table `spans`)",
        "",
        "| column | from attribute |",
        "|---|---|",
    ]
    out += [f"| `{col}` | `{key}` |" for col, key in PROMOTED_COLUMNS.items()]
    return "\n".join(out) + "\n"

