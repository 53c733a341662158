"""All engine patches, in the order they are applied."""

from __future__ import annotations

from hybrid_pd.engine_patches import (
    cpu_mamba_prefix_checkpoint,
    nixl_handshake_timeout,
    nixl_progress_delay,
    nixl_upstream_tracing,
)
from hybrid_pd.engine_patches.base import EnginePatch

PATCHES: list[EnginePatch] = [
    *cpu_mamba_prefix_checkpoint.PATCHES,
    *nixl_progress_delay.PATCHES,
    *nixl_handshake_timeout.PATCHES,
    *nixl_upstream_tracing.PATCHES,
]


def by_name(name: str) -> EnginePatch:
    for patch in PATCHES:
        if patch.name == name:
            return patch
    raise KeyError(f"no engine patch named {name!r}; known: {[p.name for p in PATCHES]}")


def apply_all() -> list[EnginePatch]:
    """Apply every patch whose guard allows it; returns the ones now active."""
    return [p for p in PATCHES if p.apply()]


def revert_all() -> None:
    for patch in reversed(PATCHES):
        patch.revert()
