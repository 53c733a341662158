"""What hybrid-pd relies on inside vLLM's NIXL pull connector, as data, and its checks.

``HybridNixlConnector`` (:mod:`hybrid_pd.connector.vllm_connector`) and the tracing
mixins (:mod:`hybrid_pd.connector.vllm_tracing`, also put in front of upstream's classes
by the ``nixl-upstream-tracing`` engine patch) override, wrap and call *private* methods
of upstream's worker and scheduler and read their private attributes.  Nothing in vLLM
keeps those stable between releases, so this module records them -- each upstream
method with the parameters it had when we validated it (read with ``inspect.signature``
from vLLM 0.32 and written down as literals: the point is to notice drift), each
instance attribute set by upstream's ``__init__``, each dataclass field we read -- and
checks the installed vLLM against that record:

* :func:`check_classes`: methods exist with the recorded parameters, fields exist;
* :func:`check_instance`: an object built by upstream's ``__init__`` has the attributes;
* :func:`check_version`: the installed vLLM is inside ``settings.VLLM_REQUIREMENT``;
* :func:`require`: all of the above, raising one ``RuntimeError`` that names every
  difference.

vLLM is imported lazily, inside the checks: the planner side and tests read the
manifest without it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hybrid_pd.settings import VLLM_REQUIREMENT

HYBRID = "hybrid"  # HybridNixlConnector: _HybridWorkerCore and the connector facade
# The mixins in front of upstream's worker / scheduler for both connectors
# (vllm_tracing's, read_path's) and the nixl-upstream-tracing patch that installs them.
TRACING = "tracing"
ALL_USERS = frozenset({HYBRID, TRACING})
_H, _T, _HT = frozenset({HYBRID}), frozenset({TRACING}), ALL_USERS
# ``hybrid-pd plan --bench`` (hybrid_pd.bench.plan_timing): sets these on an uninitialised
# upstream worker to time upstream's _compute_desc_ids; checked like the rest.
BENCH = "bench"
_B = frozenset({BENCH})

_V1 = "vllm.distributed.kv_transfer.kv_connector.v1"
_NIXL = f"{_V1}.nixl"
UPSTREAM_HINT = "hybrid-pd serve --connector upstream (vLLM's own NixlConnector) still works."


@dataclass(frozen=True)
class Owner:
    """An upstream class (or, with ``name`` empty, a module) that entries refer to."""

    role: str
    module: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module

    @property
    def short(self) -> str:
        """The path below ``vllm.distributed.kv_transfer.kv_connector.v1`` (messages)."""
        return self.path.removeprefix(_V1 + ".")


OWNERS: dict[str, Owner] = {o.role: o for o in (
    Owner("worker", f"{_NIXL}.pull_worker", "NixlPullConnectorWorker"),
    Owner("scheduler", f"{_NIXL}.pull_scheduler", "NixlPullConnectorScheduler"),
    Owner("connector", f"{_NIXL}.connector", "NixlPullConnector"),
    Owner("base_connector", f"{_NIXL}.connector", "NixlBaseConnector"),
    Owner("tp_mapping", f"{_NIXL}.tp_mapping", ""),
    Owner("agent_meta", f"{_NIXL}.metadata", "NixlAgentMetadata"),
    Owner("req_meta", f"{_NIXL}.metadata", "ReqMeta"),
    Owner("remote_meta", f"{_NIXL}.metadata", "RemoteMeta"),
    Owner("connector_meta", f"{_NIXL}.metadata", "NixlConnectorMetadata"),
    Owner("read_spec", f"{_NIXL}.tp_mapping", "ReadSpec"),
    Owner("tp_plan", f"{_NIXL}.tp_mapping", "TPMapping"),
    Owner("transfer_results", f"{_V1}.base", "KVConnectorTransferResults"),
    Owner("stats", f"{_NIXL}.stats", "NixlKVConnectorStats"),
    Owner("prom", f"{_NIXL}.stats", "NixlPromMetrics"),
    Owner("metrics_utils", "vllm.v1.metrics.utils", ""),
    Owner("connector_output", "vllm.v1.outputs", "KVConnectorOutput"),
)}


@dataclass(frozen=True)
class Method:
    """An upstream method (looked up through ``role``'s class, as Python does).

    params: upstream's parameters in order, one token each: ``name`` (positional or
    keyword), ``name=`` (with a default), ``pos:name`` (positional-only), ``kw:name`` /
    ``kw:name=`` (keyword-only), ``*name``, ``**name``.
    """

    role: str
    name: str
    how: str  # who overrides / wraps / calls it, for messages
    users: frozenset[str]
    params: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(param_name(p) for p in self.params)


@dataclass(frozen=True)
class Attr:
    """An attribute of an upstream object: set by ``__init__`` (instance attributes) or
    declared on the class (dataclass fields, class attributes)."""

    role: str
    name: str
    how: str
    users: frozenset[str]


_WORKER_INIT = ("self", "vllm_config", "engine_id", "kv_cache_config")

METHODS: tuple[Method, ...] = (
    # -- NixlPullConnectorWorker (most are defined on NixlBaseConnectorWorker) ----------
    Method("worker", "__init__", "hybrid extends", _H, _WORKER_INIT),
    Method("worker", "register_kv_caches", "hybrid wraps", _H, ("self", "kv_caches")),
    Method("worker", "_build_fa_local", "hybrid replaces, tracing wraps", _HT,
           ("self", "base_addresses", "block_size_ratio")),
    Method("worker", "_build_mamba_local", "hybrid replaces, tracing wraps", _HT,
           ("self", "base_addresses")),
    Method("worker", "_build_fa_remote", "hybrid replaces, tracing wraps", _HT,
           ("self", "plan", "nixl_agent_meta", "block_size_ratio")),
    Method("worker", "_build_mamba_remote", "hybrid replaces, tracing wraps", _HT,
           ("self", "nixl_agent_meta", "tp_ratio", "transfer_info")),
    Method("worker", "add_remote_agent", "hybrid and tracing wrap", _HT,
           ("self", "nixl_agent_meta", "remote_tp_rank=", "remote_tp_size=", "remote_dcp_size=")),
    Method("worker", "_cleanup_remote_engine", "hybrid wraps", _H,
           ("self", "engine_id", "kw:log_eviction=")),
    Method("worker", "_build_local_splits_from_plan", "hybrid replaces", _H,
           ("self", "plan", "src_blocks_data", "num_fa_descs", "block_size_ratio=")),
    Method("worker", "_nixl_handshake", "tracing wraps", _T,
           ("self", "host", "port", "remote_tp_size", "expected_engine_id", "remote_dcp_size=",
            "remote_pp_size=", "notif_agents_only=")),
    Method("worker", "start_load_kv", "tracing and integrity wrap", _T, ("self", "metadata")),
    Method("worker", "_read_blocks_for_req", "hybrid, tracing and integrity wrap", _HT,
           ("self", "req_id", "meta")),
    Method("worker", "_read_blocks", "hybrid replaces (calls it for notify-only reads), "
           "read path and tracing wrap", _HT,
           ("self", "read_spec", "dst_engine_id", "request_id", "remote_request_id",
            "local_xfer_side_handle", "local_dram_handle", "remote_xfer_side_handle",
            "expected_consumers", "awaiting_kvs")),
    Method("worker", "_compute_desc_ids", "tracing times upstream's, plan --bench calls it",
           _T | _B,
           ("self", "block_ids", "dst_num_blocks", "block_size_ratio",
            "physical_blocks_per_logical", "region_num_blocks=", "region_group_ids=",
            "uses_region_group_mapping=")),
    Method("worker", "_log_failure", "tracing wraps, hybrid calls", _HT,
           ("self", "failure_type", "req_id", "msg=", "error=", "meta=", "**extra_context")),
    Method("worker", "_pop_done_transfers", "read path replaces, integrity wraps", _T,
           ("self", "transfers")),
    Method("worker", "get_transfer_results", "tracing and integrity wrap", _T, ("self",)),
    Method("worker", "_reap_expired_send_leases", "tracing wraps", _T,
           ("self", "done_sending")),
    Method("worker", "_engines_with_inflight_transfers", "quarantine extends", _T, ("self",)),
    Method("worker", "get_kv_connector_stats", "tracing extends (our stats rows)", _T, ("self",)),
    Method("worker", "_handle_failed_transfer", "hybrid, tracing and integrity call", _HT,
           ("self", "req_id", "handle", "failed_req_ids=", "record_failed_transfer=")),
    # -- NixlPullConnectorScheduler ------------------------------------------------------
    Method("scheduler", "__init__", "hybrid constructs", _H, _WORKER_INIT),
    Method("scheduler", "request_finished",
           "tracing, integrity and the notification tracker wrap", _T,
           ("self", "request", "block_ids")),
    Method("scheduler", "has_pending_push_work", "the notification tracker extends", _T,
           ("self",)),
    Method("scheduler", "build_connector_meta", "tracing and integrity wrap", _T,
           ("self", "scheduler_output")),
    Method("scheduler", "set_xfer_handshake_metadata", "the listener guard extends", _HT,
           ("self", "metadata")),
    Method("scheduler", "_nixl_handshake_listener", "the listener guard wraps (static upstream)",
           _HT, ("encoded_data", "ready_event", "stop_event", "host", "port")),
    Method("scheduler", "update_connector_output",
           "quarantine, notification tracker and handover timing extend", _T,
           ("self", "connector_output")),
    Method("scheduler", "update_state_after_alloc", "handover timing and integrity extend", _HT,
           ("self", "request", "blocks", "num_external_tokens")),
    # -- the connectors -------------------------------------------------------------------
    Method("connector", "__init__", "the nixl-upstream-read-path and -tracing patches wrap, hybrid replaces",
           _HT, ("self", "vllm_config", "role", "kv_cache_config")),
    Method("base_connector", "__init__", "hybrid calls", _H,
           ("self", "vllm_config", "role", "kv_cache_config")),
    Method("connector", "build_connector_worker_meta",
           "hybrid overrides, the read-path patch sets it per instance", _HT, ("self",)),
    Method("connector", "get_kv_connector_stats", "hybrid extends to the scheduler side", _H,
           ("self",)),
    Method("connector", "build_kv_connector_stats", "hybrid replaces (classmethod)", _H,
           ("data=",)),
    Method("connector", "build_prom_metrics", "hybrid replaces (classmethod)", _H,
           ("vllm_config", "metric_types", "labelnames", "per_engine_labelvalues")),
    # -- NixlKVConnectorStats (the worker's xfer_stats: vllm:nixl_* metrics) ------------
    Method("stats", "record_transfer", "read path calls", _T, ("self", "res")),
    Method("stats", "reset", "hybrid's stats extend", _H, ("self",)),
    Method("stats", "is_empty", "hybrid's stats extend", _H, ("self",)),
    Method("stats", "aggregate", "hybrid's stats replace", _H, ("self", "other")),
    Method("stats", "reduce", "hybrid's stats wrap", _H, ("self",)),
    Method("prom", "__init__", "hybrid's metrics extend", _H,
           ("self", "vllm_config", "metric_types", "labelnames", "per_engine_labelvalues")),
    Method("prom", "observe", "hybrid's metrics extend", _H,
           ("self", "transfer_stats_data", "engine_idx=")),
    Method("metrics_utils", "create_metric_per_engine", "hybrid's metrics call", _H,
           ("metric", "per_engine_labelvalues")),
    # -- private module functions -------------------------------------------------------
    Method("tp_mapping", "_is_attention_spec", "hybrid calls", _H, ("spec_type",)),
    Method("tp_mapping", "_is_ssm_spec", "hybrid calls", _H, ("spec_type",)),
)

# Set by upstream's __init__ (checked on live objects by check_instance).
INSTANCE_ATTRS: tuple[Attr, ...] = (
    Attr("worker", "vllm_config", "hybrid and tracing read", _HT),
    Attr("worker", "engine_id", "hybrid and tracing read", _HT),
    Attr("worker", "tp_rank", "hybrid and tracing read", _HT),
    Attr("worker", "nixl_wrapper", "hybrid and tracing call NIXL through it", _HT),
    Attr("worker", "_recving_transfers", "hybrid appends handles, tracing reads", _HT),
    Attr("worker", "xfer_stats", "read path records transfers in it, hybrid replaces it", _HT),
    Attr("worker", "kv_cache_config", "hybrid reads transfer_groups", _H),
    Attr("worker", "block_size", "hybrid reads (kernel block size)", _H),
    Attr("worker", "device_id", "hybrid reads", _H),
    Attr("worker", "use_host_buffer", "hybrid refuses host staging", _H),
    Attr("worker", "dcp_size", "hybrid refuses DCP", _H),
    Attr("worker", "pcp_size", "hybrid refuses PCP", _H),
    Attr("worker", "region_mem_types", "hybrid reads", _H),
    Attr("worker", "_layer_specs", "hybrid reads", _H),
    Attr("worker", "_physical_blocks_per_logical_kv_block", "hybrid reads", _H),
    Attr("worker", "_logical_num_blocks", "hybrid reads", _H),
    Attr("worker", "_group_spec_types", "hybrid reads", _H),
    Attr("worker", "_has_mamba", "hybrid reads", _H),
    Attr("worker", "_remote_agents", "hybrid reads", _H),
    Attr("worker", "_mixed_mem_types", "hybrid reads", _H),
    Attr("worker", "_pending_recv_notifs", "hybrid defers notifications into it", _H),
    Attr("worker", "_recving_metadata", "quarantine reads (the READ's peer engine)", _T),
    Attr("worker", "_recv_failures", "hybrid passes it to _handle_failed_transfer", _H),
    *(Attr("worker", n, "plan --bench sets it to time _compute_desc_ids", _B) for n in (
        "_has_mamba", "_conv_decomp", "_ssm_region_indices", "_scratch_region_indices",
        "_transfer_layer_group_ids", "_ple_group_index", "block_len_per_layer", "num_regions",
        "region_group_ids", "_uses_region_group_mapping", "_group_spec_types")),
    Attr("scheduler", "_reqs_need_recv", "tracing and the notification tracker read", _T),
    Attr("scheduler", "vllm_config", "the notification tracker reads (D's TP size)", _T),
    Attr("scheduler", "_nixl_handshake_listener_t", "the listener guard resets it", _HT),
    Attr("connector", "connector_worker", "the tracing patch swaps its class, hybrid sets", _HT),
    Attr("connector", "connector_scheduler", "the tracing patch swaps its class, hybrid sets",
         _HT),
    Attr("connector", "engine_id", "hybrid reads", _H),
    Attr("connector_meta", "reqs_to_send", "tracing reads", _T),
    Attr("connector_meta", "reqs_to_recv", "integrity reads (D's requests to check)", _T),
)

# Declared on the class (dataclass fields of the objects upstream hands us).
FIELDS: tuple[Attr, ...] = (
    *(Attr("agent_meta", n, "hybrid reads", _H) for n in (
        "kv_caches_base_addr", "device_id", "num_blocks", "block_size", "ssm_sizes",
        "block_strides", "physical_blocks_per_logical_kv_block", "region_names")),
    Attr("agent_meta", "engine_id", "hybrid and tracing read", _HT),
    Attr("req_meta", "remote", "hybrid and tracing read", _HT),
    Attr("req_meta", "local_block_ids", "hybrid and integrity read", _HT),
    Attr("req_meta", "local_num_computed_blocks", "hybrid and integrity read", _HT),
    Attr("remote_meta", "engine_id", "tracing reads", _T),
    *(Attr("remote_meta", n, "quarantine reads (probes P's side channel)", _T)
      for n in ("host", "port")),
    Attr("remote_meta", "block_ids", "hybrid and integrity read", _HT),
    Attr("remote_meta", "num_tokens", "hybrid and integrity read", _HT),
    Attr("remote_meta", "request_id", "integrity reads (P's request id: its digests' key)", _T),
    Attr("read_spec", "remote_rank", "hybrid and tracing read", _HT),
    Attr("read_spec", "local_block_ids", "hybrid reads and replaces, notification tracker reads",
         _HT),
    Attr("read_spec", "block_ids_by_region", "hybrid reads", _H),
    Attr("tp_plan", "all_source_ranks", "hybrid reads", _H),
    *(Attr("transfer_results", n, "tracing reads", _T) for n in (
        "finished_recving", "failed_recving", "finished_sending")),
    *(Attr("connector_output", n, "quarantine reads (and withholds finished_recving)", _T)
      for n in ("finished_recving", "kv_connector_worker_meta")),
)


@dataclass(frozen=True)
class Mismatch:
    """One difference between the manifest and what is installed."""

    subject: str
    required: str
    found: str

    def __str__(self) -> str:
        return f"{self.subject}: required {self.required}, found {self.found}"


# -- parameters -----------------------------------------------------------------------

_KIND_TOKEN = {
    inspect.Parameter.POSITIONAL_ONLY: "pos:{}",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "{}",
    inspect.Parameter.VAR_POSITIONAL: "*{}",
    inspect.Parameter.KEYWORD_ONLY: "kw:{}",
    inspect.Parameter.VAR_KEYWORD: "**{}",
}


def param_tokens(fn: Any) -> tuple[str, ...]:
    """``fn``'s parameters in the manifest's notation (wrappers are looked through)."""
    out = []
    for p in inspect.signature(inspect.unwrap(fn)).parameters.values():
        tok = _KIND_TOKEN[p.kind].format(p.name)
        if p.default is not inspect.Parameter.empty:
            tok += "="
        out.append(tok)
    return tuple(out)


def param_name(token: str) -> str:
    return token.removeprefix("pos:").removeprefix("kw:").lstrip("*").rstrip("=")


def method(role: str, name: str) -> Method:
    """The manifest entry of ``role``'s method ``name`` (KeyError if not recorded)."""
    for m in METHODS:
        if m.role == role and m.name == name:
            return m
    raise KeyError(f"no manifest entry for {role}.{name}")


# -- checks ---------------------------------------------------------------------------


def _for(entries: Iterable[Any], users: Collection[str], roles: Collection[str] | None) -> list[Any]:
    return [e for e in entries if e.users & set(users) and (roles is None or e.role in roles)]


def _load(owner: Owner) -> Any:
    mod = importlib.import_module(owner.module)
    return getattr(mod, owner.name) if owner.name else mod


def _check_method(target: Any, label: str, m: Method) -> Mismatch | None:
    subject = f"{label}.{m.name} ({m.how})"
    fn = inspect.getattr_static(target, m.name, None)
    if fn is None or not callable(getattr(target, m.name, None)):
        return Mismatch(subject, f"a method ({', '.join(m.params)})",
                        f"no such method on {getattr(target, '__qualname__', label)}")
    try:
        found = param_tokens(getattr(target, m.name))
    except (TypeError, ValueError) as exc:
        return Mismatch(subject, f"parameters ({', '.join(m.params)})", f"no signature ({exc})")
    for i in range(max(len(found), len(m.params))):
        want = m.params[i] if i < len(m.params) else None
        got = found[i] if i < len(found) else None
        if want != got:
            return Mismatch(f"{subject}, parameter {i + 1}",
                            repr(want) if want else "no parameter",
                            repr(got) if got else "no parameter")
    return None


def _check_field(cls: Any, label: str, a: Attr) -> Mismatch | None:
    if dataclasses.is_dataclass(cls):
        if a.name in {f.name for f in dataclasses.fields(cls)}:
            return None
        return Mismatch(f"{label}.{a.name} ({a.how})", "a dataclass field",
                        f"no such field on {cls.__qualname__}")
    if hasattr(cls, a.name):
        return None
    return Mismatch(f"{label}.{a.name} ({a.how})", "a class attribute",
                    f"no such attribute on {cls.__qualname__}")


def check_classes(classes: Mapping[str, Any] | None = None, *,
                  users: Collection[str] = ALL_USERS,
                  roles: Collection[str] | None = None) -> list[Mismatch]:
    """Every recorded method (with its parameters) and field, for ``users``' entries.

    classes: role -> class (or module) to check instead of upstream's (fakes, drift
    tests); roles: only these roles (default: all).
    """
    classes = classes or {}
    methods, fields = _for(METHODS, users, roles), _for(FIELDS, users, roles)
    out: list[Mismatch] = []
    for role in dict.fromkeys(e.role for e in (*methods, *fields)):
        owner = OWNERS[role]
        if role in classes:
            target, label = classes[role], classes[role].__qualname__
        else:
            label = owner.short
            try:
                target = _load(owner)
            except (ImportError, AttributeError) as exc:
                out.append(Mismatch(label, "importable", f"{type(exc).__name__}: {exc}"))
                continue
        out += [x for m in methods if m.role == role
                if (x := _check_method(target, label, m)) is not None]
        out += [x for a in fields if a.role == role
                if (x := _check_field(target, label, a)) is not None]
    return out


def check_instance(obj: Any, role: str, *, users: Collection[str] = ALL_USERS) -> list[Mismatch]:
    """The instance attributes recorded for ``role`` (set by upstream's ``__init__``)."""
    label = OWNERS[role].short
    return [
        Mismatch(f"{label} instance attribute {a.name} ({a.how})",
                 "set by upstream's __init__", f"missing on {type(obj).__qualname__}")
        for a in _for(INSTANCE_ATTRS, users, {role}) if not hasattr(obj, a.name)
    ]


def check_version(found: tuple[str, Any] | None = None) -> list[Mismatch]:
    """The installed vLLM (or ``found``: (distribution, Version)) against VLLM_REQUIREMENT."""
    from hybrid_pd.engine_patches.base import vllm_version_mismatch

    bad = vllm_version_mismatch(VLLM_REQUIREMENT, found)
    return [] if bad is None else [Mismatch("vLLM version", *bad)]


def require(*, worker: Any = None, scheduler: Any = None, connector: Any = None,
            classes: bool | Mapping[str, Any] = True, users: Collection[str] = ALL_USERS,
            who: str = "HybridNixlConnector",
            found_version: tuple[str, Any] | None = None) -> None:
    """Raise ``RuntimeError`` naming every difference between the installed vLLM and
    what ``who`` relies on: always the version; with ``classes`` (default) every
    recorded method and field; and the instance attributes of the live objects given.

    classes: True / False (check upstream's classes or skip them), or role -> stand-in
    class (tests); found_version: a stand-in (distribution, Version) (tests).
    """
    problems = check_version(found_version)
    if classes is not False:
        problems += check_classes(None if classes is True else classes, users=users)
    for obj, role in ((worker, "worker"), (scheduler, "scheduler"), (connector, "connector")):
        if obj is not None:
            problems += check_instance(obj, role, users=users)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise RuntimeError(
            f"{who} relies on private parts of vLLM's NIXL pull connector that differ in the "
            f"installed vLLM ({len(problems)} difference(s); paths below {_V1}):\n{lines}\n"
            + UPSTREAM_HINT
        )


def describe() -> list[str]:
    """The manifest, one line per entry (docs, ``--help``-style listings, reviews)."""
    lines = [f"method {OWNERS[m.role].short}.{m.name}({', '.join(m.params)})  [{m.how}]"
             for m in METHODS]
    lines += [f"instance {OWNERS[a.role].short}.{a.name}  [{a.how}]" for a in INSTANCE_ATTRS]
    lines += [f"field {OWNERS[a.role].short}.{a.name}  [{a.how}]" for a in FIELDS]
    return lines
