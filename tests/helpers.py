"""Small helpers shared by tests (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import importlib.util
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybrid_pd.metrics import scrape_gauges


def _below_ephemeral() -> tuple[int, int]:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(1024, low - 12000), low


_HANDED: set[int] = set()
_PORTS = random.Random()  # its own generator: a test seeding ``random`` cannot repeat picks


def free_port() -> int:
    """A port for a child to listen on, from below the kernel's ephemeral range: a port
    from bind(0) can be taken by some outgoing connection before the child binds it
    (measured in CI: P's side channel failed with "Address already in use"). Never the
    same port twice in one test run."""
    lo, hi = _below_ephemeral()
    for _ in range(2000):
        port = _PORTS.randrange(lo, hi)
        if port in _HANDED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


class Output:
    """A child's merged output, read on a thread; ``wait_for`` blocks until a line has
    ``text`` (the lines so far stay in ``lines``)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._q.put(line)

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=1.0)
            except queue.Empty:
                continue
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not printed in {timeout_s} s:\n{''.join(self.lines[-60:])}")

    def rest(self) -> str:
        """Everything printed so far (all of it once the child has exited)."""
        self._thread.join(timeout=10)
        while not self._q.empty():
            self.lines.append(self._q.get_nowait())
        return "".join(self.lines)


# ------------------------------------------------------------------ rotel (OTLP receiver)
# A real OTLP collector from PyPI (``rotel``), shared by tests/test_otlp_export.py and
# tests/test_bench_telemetry.py.

def _rotel_binary() -> Path | None:
    # The wheel ships the collector next to its Python wrapper (rotel/rotel-agent); we run
    # the binary ourselves, in the foreground, so its debug log is ours to read.
    spec = importlib.util.find_spec("rotel")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "rotel-agent"
    return path if path.exists() else None


ROTEL = _rotel_binary()


class Rotel:
    """A rotel collector in the foreground; its debug log of received traces is parsed."""

    def __init__(self, tmp: Path) -> None:
        if ROTEL is None:
            raise RuntimeError("rotel collector binary not found (pip install rotel)")
        self.log = tmp / "rotel.out"
        for _ in range(3):  # a port picked by the OS can be taken before rotel binds it
            self.grpc_port, self.http_port = free_port(), free_port()
            self.proc = subprocess.Popen(
                [str(ROTEL), "start", "--exporter", "blackhole", "--debug-log", "traces",
                 "--debug-log-verbosity", "detailed",
                 "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
                 "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
                 "--pid-file", str(tmp / "rotel.pid"), "--log-file", str(tmp / "rotel.log")],
                stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            )
            if self._wait_listening(timeout=15):
                return
            self.stop()
        raise RuntimeError(f"rotel did not start; its output:\n{self.log.read_text()}")

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                for port in (self.grpc_port, self.http_port):
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def spans(self) -> dict[str, dict[str, Any]]:
        """span id -> {service, trace_id, parent, name, attributes} from the debug log."""
        out: dict[str, dict[str, Any]] = {}
        service = None
        cur: dict[str, Any] | None = None
        section = None
        for line in self.log.read_text(errors="replace").splitlines():
            s = line.strip()
            if line.startswith("ResourceSpans #"):
                section, cur = "resource", None
            elif line.startswith("Span #"):
                cur = {"service": service, "attributes": {}}
                section = "span"
            elif s == "Attributes:" and cur is not None:
                section = "attrs"
            elif (m := re.match(r"-> ([\w.]+): (\w+)\((.*)\)$", s)):
                key, typ, raw = m.groups()
                value = {"Int": int, "Double": float, "Bool": lambda v: v == "true"}.get(typ, str)(raw)
                if section == "resource" and key == "service.name":
                    service = value
                elif section == "attrs" and cur is not None:
                    cur["attributes"][key] = value
            elif cur is not None and (m := re.match(r"(Trace ID|Parent ID|ID|Name)\s*:\s*(.*)$", s)):
                field = {"Trace ID": "trace_id", "Parent ID": "parent", "ID": "span_id",
                         "Name": "name"}[m.group(1)]
                cur[field] = m.group(2) or None
                if field == "span_id":
                    out[cur["span_id"]] = cur
        return out

    def wait_for(self, span_ids: set[str], timeout: float = 20) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.spans()
            if span_ids <= set(got) or time.monotonic() > deadline:
                return {k: v for k, v in got.items() if k in span_ids}
            time.sleep(0.1)


def wait_idle(c: Any, engines: dict[str, str], bound: float) -> float:
    """Seconds until every engine reports 0 KV usage, 0 running and 0 waiting; fails
    after ``bound`` seconds, naming the gauges."""
    t0 = time.monotonic()
    while True:
        gauges = {name: scrape_gauges(c, url) for name, url in engines.items()}
        if all(v == 0 for g in gauges.values() for v in g.values()):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < bound, f"not idle after {bound:.0f} s (blocks held?): {gauges}"
        time.sleep(1.0)


# ------------------------------------------------------------------- hybrid-pd serve


def serve_command(model: Path, ports: Any, run_dir: Path, *extra: str) -> list[str]:
    """``hybrid-pd serve MODEL`` on ``ports`` (a serve.supervisor.Ports) with ``extra`` flags."""
    return [sys.executable, "-m", "hybrid_pd.cli", "serve", str(model),
            "--port", str(ports.proxy), "--prefill-port", str(ports.prefill),
            "--decode-port", str(ports.decode),
            "--prefill-side-channel-port", str(ports.prefill_side_channel),
            "--decode-side-channel-port", str(ports.decode_side_channel),
            "--run-dir", str(run_dir), *extra]


def stop_serve(serve: subprocess.Popen, timeout_s: float = 120) -> None:
    """SIGTERM (serve stops its children), SIGKILL after ``timeout_s``."""
    serve.send_signal(signal.SIGTERM)
    try:
        serve.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        serve.kill()
        serve.wait(timeout=30)


@contextlib.contextmanager
def serving(cmd: list[str], env: dict[str, str] | None = None,
            ready_s: float = 600) -> Iterator[tuple[subprocess.Popen, Output]]:
    """A `hybrid-pd serve` ready (after its warm-up request through the pair); stopped at
    the end.  Fails the test with serve's output if it exits or is not ready in time."""
    import pytest

    serve = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
    out = Output(serve)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            try:
                out.wait_for("serving on", 5)
                break
            except AssertionError:
                if serve.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"hybrid-pd serve not serving (exit code {serve.poll()}):\n"
                                + out.rest()[-6000:])
        yield serve, out
    finally:
        stop_serve(serve)
