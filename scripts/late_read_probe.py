"""Does a NIXL READ that D gave up on still land after a frozen P resumes?

Two processes on loopback, UCX over TCP (where RMA needs the peer's progress, so a
SIGSTOPped P really stalls the READ):

    UCX_TLS=tcp .venv/bin/python scripts/late_read_probe.py release
    UCX_TLS=tcp .venv/bin/python scripts/late_read_probe.py remove

D posts a 4 MiB READ while P is stopped, releases the handle (``release``) or also
removes P's agent (``remove``), then P resumes.  Measured with NIXL 1.5.1 (2 cores):
both modes print all 4,194,304 bytes landed after SIGCONT - neither a release nor
tearing down the remote agent cancels the READ, so D's destination blocks must stay
out of use until NIXL reports the handle DONE or ERR.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hybrid_pd.transfer.agent import addr_array, make_agent

N = 4 << 20
PATTERN = 0xAB


def prefill(path: Path) -> None:
    """P: register a buffer full of PATTERN, publish metadata, keep progressing."""
    agent = make_agent("P", num_threads=0)
    buf = np.full(N, PATTERN, dtype=np.uint8)
    agent.register_memory(addr_array([(buf.ctypes.data, N, 0)]), "DRAM")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"md": agent.get_agent_metadata().hex(),
                               "addr": int(buf.ctypes.data)}))
    tmp.rename(path)
    while True:
        agent.get_new_notifs()
        time.sleep(0.001)


def decode(mode: str) -> int:
    path = Path(tempfile.mkdtemp()) / "prefill.json"
    p = subprocess.Popen([sys.executable, __file__, "prefill", str(path)])
    try:
        while not path.exists():
            time.sleep(0.05)
        info = json.loads(path.read_text())
        agent = make_agent("D", num_threads=0)
        buf = np.zeros(N, dtype=np.uint8)
        agent.register_memory(addr_array([(buf.ctypes.data, N, 0)]), "DRAM")
        name = agent.add_remote_agent(bytes.fromhex(info["md"]))
        name = name.decode() if isinstance(name, bytes) else name

        def read() -> object:
            local = agent.get_xfer_descs(addr_array([(buf.ctypes.data, N, 0)]), "DRAM")
            remote = agent.get_xfer_descs(addr_array([(info["addr"], N, 0)]), "DRAM")
            handle = agent.initialize_xfer("READ", local, remote, name)
            agent.transfer(handle)
            return handle

        warm = read()  # connection set up while P runs
        while agent.check_xfer_state(warm) == "PROC":
            pass
        agent.release_xfer_handle(warm)
        buf[:] = 0
        os.kill(p.pid, signal.SIGSTOP)
        handle = read()
        t0 = time.time()
        state = "PROC"
        while time.time() - t0 < 1.0:
            state = agent.check_xfer_state(handle)
        print(f"{mode}: state while P stopped {state}, bytes landed {(buf == PATTERN).sum()}")
        agent.release_xfer_handle(handle)
        if mode == "remove":
            agent.remove_remote_agent(name)
        os.kill(p.pid, signal.SIGCONT)
        t0 = time.time()
        while time.time() - t0 < 3.0:
            agent.get_new_notifs()
            time.sleep(0.001)
        print(f"{mode}: after SIGCONT, bytes landed {(buf == PATTERN).sum()} of {N}")
    finally:
        p.kill()
        p.wait()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "prefill":
        prefill(Path(sys.argv[2]))
    elif sys.argv[1] in ("release", "remove"):
        sys.exit(decode(sys.argv[1]))
    else:
        sys.exit("usage: late_read_probe.py release|remove")
