"""vLLM ``general_plugins`` entry point: applies our engine patches in every vLLM process.

vLLM calls ``register()`` once per process (API server, engine core, each worker) and
swallows import errors of plugins, so this module imports nothing heavy at the top, is
re-entrant, and logs loudly what it did. ``HYBRID_PD_PATCHES=0`` disables all patches
(for reproducing upstream behaviour); vLLM's own ``VLLM_PLUGINS`` filter works too.
"""

from __future__ import annotations

import logging
import os

from hybrid_pd.settings import ENV_PATCHES

logger = logging.getLogger("hybrid_pd.engine_patches")
_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    if os.environ.get(ENV_PATCHES, "1") == "0":
        logger.warning("hybrid-pd engine patches disabled by %s=0", ENV_PATCHES)
        return
    # vLLM's logger config does not cover our namespace: make the result visible.
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    logger.setLevel(logging.INFO)
    from hybrid_pd.engine_patches import registry

    active = registry.apply_all()
    logger.info(
        "hybrid-pd engine patches active in pid %d: %s",
        os.getpid(),
        ", ".join(p.name for p in active) or "none",
    )
