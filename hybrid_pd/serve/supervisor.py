"""The child processes of ``hybrid-pd serve`` (and ``demo`` and the end-to-end tests).

The supervisor starts every child in its own process group (vLLM forks an engine core
and workers), streams each child's output to ``RUN_DIR/<name>.log``, waits for health
with a progress line, and on Ctrl-C/SIGTERM (or when any child dies) stops every group:
SIGTERM, a grace period, then SIGKILL. Nothing is left running.

:func:`build_supervisor` puts the P/D cluster (P, D and the proxy) on it, or, for a
cluster spread over several hosts, only this host's P or D (``role``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hybrid_pd.serve.engines import (
    DEFAULT_PROXY_TIMEOUT_S,
    PORT_REFERENCE,
    EngineSpec,
    LaunchConfig,
    connect_host,
    engine_command,
    engine_env,
    plan_cpu_binding,
)
from hybrid_pd.settings import (
    ENV_API_KEY,
    PORT_DECODE,
    PORT_DECODE_SIDE_CHANNEL,
    PORT_PREFILL,
    PORT_PREFILL_SIDE_CHANNEL,
    PORT_PROXY,
)

HEALTH_POLL_S = 1.0
PROGRESS_EVERY_S = 10.0  # a progress line this often when stderr is a file


class LaunchError(RuntimeError):
    """A child failed to start or became unhealthy; the message says which and why."""


@dataclass
class Child:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    health_url: str
    proc: subprocess.Popen | None = None
    ready_after_s: float | None = None
    restarts: int = 0

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])


class _StatusLine:
    """Startup progress on stderr: a terminal gets one live line; a log file gets a line
    every PROGRESS_EVERY_S."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.next_at = 0.0

    def show(self, elapsed: float, children: Sequence[Child]) -> None:
        if not self.enabled or not (self.tty or elapsed >= self.next_at):
            return
        self.next_at += PROGRESS_EVERY_S
        parts = [f"{c.name}: " + ("ready" if c.ready_after_s is not None else "starting")
                 for c in children]
        line = f"[hybrid-pd] {elapsed:5.0f}s  " + "  ".join(parts)
        sys.stderr.write(("\r" + line + "   ") if self.tty else (line + "\n"))
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


@dataclass
class Supervisor:
    run_dir: Path
    children: list[Child] = field(default_factory=list)
    started_at: float = 0.0

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def start(self) -> None:
        private_dir(self.run_dir)
        self.started_at = time.monotonic()
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        # owner-only: engine logs carry request ids, paths and engine arguments
        fd = os.open(child.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log = os.fdopen(fd, "ab", buffering=0)
        log.write(f"$ {' '.join(child.cmd)}\n".encode())
        child.proc = subprocess.Popen(
            child.cmd,
            env=child.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: we stop the whole tree
        )
        log.close()

    def restart(self, child: Child, timeout_s: float) -> float:
        """Start a child that died again: whatever is left of its process group (an
        engine core, workers) is killed first, then it is started with the same command
        and log (appended) and waited for until healthy.  Returns the seconds it took."""
        t0 = time.monotonic()
        if child.proc is not None:
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait(timeout=30)
        child.ready_after_s, child.restarts = None, child.restarts + 1
        self._spawn(child)
        self.wait_healthy(timeout_s, progress=False)  # the others are ready: only it is polled
        return time.monotonic() - t0

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc is not None and c.proc.poll() is not None]

    def wait_healthy(self, timeout_s: float, progress: bool = True) -> None:
        """Poll every child's health URL until all answer 200; LaunchError when a child
        exits first or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        status = _StatusLine(progress)
        with httpx.Client(timeout=2.0) as client:
            try:
                while True:
                    self._poll_health(client)
                    status.show(time.monotonic() - self.started_at, self.children)
                    if all(c.ready_after_s is not None for c in self.children):
                        break
                    if time.monotonic() > deadline:
                        raise self._not_healthy(timeout_s)
                    time.sleep(HEALTH_POLL_S)
            except LaunchError:
                status.end()
                raise
            status.end()

    def _poll_health(self, client: httpx.Client) -> None:
        for child in self.children:
            if child.ready_after_s is not None:
                continue
            if child.proc is not None and child.proc.poll() is not None:
                raise LaunchError(
                    f"{child.name} exited with code {child.proc.returncode} while "
                    f"starting; last lines of {child.log_path}:\n{child.tail()}"
                )
            try:
                if client.get(child.health_url).status_code == 200:
                    child.ready_after_s = time.monotonic() - self.started_at
            except httpx.HTTPError:
                pass

    def _not_healthy(self, timeout_s: float) -> LaunchError:
        slow = [c for c in self.children if c.ready_after_s is None]
        return LaunchError(
            f"not healthy after {timeout_s:.0f} s: {', '.join(c.name for c in slow)}; "
            f"last lines of {slow[0].log_path}:\n{slow[0].tail()}"
        )

    def stop(self, grace_s: float = 20.0) -> None:
        live = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in live:
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in live:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # The group may hold grandchildren (engine core, workers) even after the leader
        # exited: SIGKILL whatever is left in every group we created.
        for child in self.children:
            if child.proc is not None:
                _signal_group(child.proc, signal.SIGKILL)
                try:
                    child.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the P/D cluster (used by serve, demo and the tests) --------------------------------


@dataclass
class Ports:
    proxy: int = PORT_PROXY
    prefill: int = PORT_PREFILL
    decode: int = PORT_DECODE
    reference: int = PORT_REFERENCE
    prefill_side_channel: int = PORT_PREFILL_SIDE_CHANNEL
    decode_side_channel: int = PORT_DECODE_SIDE_CHANNEL


def proxy_command(cfg: LaunchConfig, ports: Ports, timeout_s: float,
                  python: str = sys.executable) -> list[str]:
    cmd = [
        python, "-m", "hybrid_pd.cli", "proxy",
        "--prefill-url", f"http://{connect_host(cfg.engine_host)}:{ports.prefill}",
        "--decode-url", f"http://{connect_host(cfg.engine_host)}:{ports.decode}",
        "--host", cfg.host, "--port", str(ports.proxy),
        "--timeout", str(timeout_s),
    ]
    if cfg.telemetry_db is not None:
        cmd += ["--telemetry-db", cfg.telemetry_db]
    return cmd


def _engine_child(cfg: LaunchConfig, spec: EngineSpec, run_dir: Path, bind: str | None) -> Child:
    return Child(
        spec.name,
        engine_command(cfg, spec),
        engine_env(cfg, spec, dict(os.environ), bind),
        run_dir / f"{spec.name}.log",
        f"http://{connect_host(cfg.engine_host)}:{spec.port}/health",
    )


# What `hybrid-pd serve --role` starts: everything, or this host's one engine.
ROLES = ("all", "prefill", "decode")


def build_supervisor(
    cfg: LaunchConfig,
    run_dir: Path,
    ports: Ports,
    prefill_tp: int = 1,
    decode_tp: int = 1,
    proxy_timeout_s: float = DEFAULT_PROXY_TIMEOUT_S,
    role: str = "all",
) -> Supervisor:
    """Children for P, D and the proxy (``role="all"``), or only P or only D: one
    engine of a cluster spread over hosts, for a ``hybrid-pd proxy`` running elsewhere."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    sup = Supervisor(run_dir)
    engines = [
        EngineSpec("prefill", "prefill", ports.prefill, prefill_tp, ports.prefill_side_channel),
        EngineSpec("decode", "decode", ports.decode, decode_tp, ports.decode_side_channel),
    ]
    engines = [e for e in engines if role in ("all", e.role)]
    binding = plan_cpu_binding([(e.name, e.tp) for e in engines], sorted(os.sched_getaffinity(0)), cfg.cpu_bind)
    for spec in engines:
        sup.add(_engine_child(cfg, spec, run_dir, binding[spec.name]))
    if role != "all":
        return sup
    proxy_env = dict(os.environ)
    if cfg.api_key:
        proxy_env[ENV_API_KEY] = cfg.api_key
    sup.add(Child("proxy", proxy_command(cfg, ports, proxy_timeout_s), proxy_env,
                  run_dir / "proxy.log", f"http://{connect_host(cfg.host)}:{ports.proxy}/health"))
    return sup


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header our own requests (warm-up, demo) carry when an API key is set."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def warm_up_pair(proxy_url: str, model: str, decode_log: Path, tries: int = 3,
                 timeout_s: float = DEFAULT_PROXY_TIMEOUT_S, api_key: str | None = None) -> int:
    """One 1-token completion through the proxy, so D's NIXL handshake with every P rank
    is done before serving is reported ready (the first user request would otherwise
    pay for it, or fail with it).  Returns the attempt that succeeded; a failure is
    retried up to ``tries`` in all, then raised as a LaunchError with the lines of D's
    log that name the cause."""
    body = {"model": model, "prompt": "warm-up", "max_tokens": 1, "temperature": 0}
    errors: list[str] = []
    with httpx.Client(timeout=timeout_s, headers=auth_headers(api_key)) as client:
        for attempt in range(1, tries + 1):
            try:
                r = client.post(f"{proxy_url}/v1/completions", json=body)
            except httpx.HTTPError as exc:
                errors.append(f"attempt {attempt}: {type(exc).__name__}: {exc}")
                continue
            if r.status_code == 200:
                return attempt
            errors.append(f"attempt {attempt}: HTTP {r.status_code}: {r.text[:300]}")
    raise LaunchError(
        "the P/D pair did not answer a warm-up request (its NIXL handshake runs there): "
        + "; ".join(errors) + f"\nD's log ({decode_log}) says:\n" + _failure_lines(decode_log))


def _failure_lines(log: Path, n: int = 12) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(unreadable: {exc})"
    hits = [ln for ln in lines if "failure_type" in ln or "Error" in ln or "error" in ln]
    return "\n".join((hits or lines)[-n:])


def build_reference_supervisor(cfg: LaunchConfig, run_dir: Path, port: int, tp: int = 1) -> Supervisor:
    """One plain engine (no connector, same conv layout): the reference for output checks.
    Run it before or after the P/D cluster, not beside it, on small machines."""
    sup = Supervisor(run_dir)
    spec = EngineSpec("reference", "single", port, tp)
    bind = plan_cpu_binding([(spec.name, tp)], sorted(os.sched_getaffinity(0)), cfg.cpu_bind)
    sup.add(_engine_child(cfg, spec, run_dir, bind[spec.name]))
    return sup


def private_dir(path: Path) -> Path:
    """Create ``path`` owner-only (0700) when we create it; an existing directory the
    user chose keeps its mode."""
    existed = path.exists()
    path.mkdir(parents=True, exist_ok=True)
    if not existed:
        os.chmod(path, 0o700)
    return path


def default_run_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
