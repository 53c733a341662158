"""``hybrid-pd serve``: start P, D and the proxy; stop them all on Ctrl-C/SIGTERM or when
one dies.  With ``--role prefill`` or ``--role decode`` only that engine is started, for a
cluster spread over hosts behind a ``hybrid-pd proxy`` that runs elsewhere.  The launch
arguments here are shared with ``hybrid-pd demo``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from hybrid_pd.serve.engines import (
    CONNECTORS,
    CPU_BIND_MODES,
    DEFAULT_CONNECTOR,
    DEFAULT_HOST,
    ENV_CPU_KVCACHE_SPACE,
    ENV_CPU_THREADS_BIND,
    ENV_SIDE_CHANNEL_HOST,
    LaunchConfig,
    connect_host,
    is_any_address,
)
from hybrid_pd.serve.supervisor import (
    ROLES,
    Child,
    LaunchError,
    Ports,
    Supervisor,
    build_supervisor,
    default_run_dir,
    private_dir,
    warm_up_pair,
)
from hybrid_pd.settings import (
    DEFAULT_KV_INTEGRITY,
    DEFAULT_READ_TIMEOUT_S,
    ENV_API_KEY,
    ENV_SIDE_CHANNEL_PORT,
    KEY_KV_INTEGRITY,
    KEY_READ_GRANULARITY,
    KEY_READ_TIMEOUT,
    PORT_DECODE,
    PORT_DECODE_SIDE_CHANNEL,
    PORT_PREFILL,
    PORT_PREFILL_SIDE_CHANNEL,
    PORT_PROXY,
    SERVE_READ_GRANULARITY,
)
from hybrid_pd.tiny_models import engine_args_for


def add_common_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor parallel size of P")
    p.add_argument("--decode-tp", type=int, default=1, help="tensor parallel size of D")
    p.add_argument("--connector", choices=sorted(CONNECTORS), default=DEFAULT_CONNECTOR,
                   help="KV connector: upstream = vLLM's NixlConnector; hybrid = ours "
                        "(HybridNixlConnector: upstream plumbing, our descriptors and reads)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="bind address of the proxy (loopback by default)")
    p.add_argument("--engine-host", default=DEFAULT_HOST,
                   help="bind address of both engines and their NIXL side channels (loopback "
                   "by default; never expose them beyond a private network: they take "
                   "kv_transfer_params from anyone and serve P's KV memory)")
    p.add_argument("--port", type=int, default=PORT_PROXY, help="proxy port")
    p.add_argument("--prefill-port", type=int, default=PORT_PREFILL)
    p.add_argument("--decode-port", type=int, default=PORT_DECODE)
    p.add_argument("--prefill-side-channel-port", type=int, default=PORT_PREFILL_SIDE_CHANNEL,
                   help=f"NIXL handshake port of P ({ENV_SIDE_CHANNEL_PORT})")
    p.add_argument("--decode-side-channel-port", type=int, default=PORT_DECODE_SIDE_CHANNEL)
    p.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help=f"KV cache per CPU engine ({ENV_CPU_KVCACHE_SPACE}) unless already set")
    p.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                   help="let vLLM compile (slow to start on CPU)")
    p.add_argument("--cpu-bind", choices=CPU_BIND_MODES, default="split",
                   help=f"CPU engines: how OpenMP threads are bound ({ENV_CPU_THREADS_BIND}, "
                   "which wins when set): split = disjoint cores per engine rank, else nobind")
    p.add_argument("--run-dir", type=Path, default=None, help="where engine logs go")
    p.add_argument("--telemetry-db", default=None, metavar="PATH|URL",
                   help="span database written by P, D and the proxy (SQLite path or SQLAlchemy "
                   "URL; default: RUN_DIR/telemetry.db); OTEL_* variables add OTLP export")
    p.add_argument("--kv-read-timeout", type=float, default=None, metavar="SECONDS",
                   help="abort a KV READ still in flight after this long and fail its request "
                   f"(kv_connector_extra_config.{KEY_READ_TIMEOUT}; default {DEFAULT_READ_TIMEOUT_S:g})")
    p.add_argument("--kv-read-granularity", default=None, metavar="request|layer|sampled:K",
                   help="our connector: one READ per P rank and request (upstream's), one per "
                   "layer (per-layer timelines), or per layer for 1 request in K "
                   f"(default {SERVE_READ_GRANULARITY}: per-layer timelines at a small cost)")
    p.add_argument("--kv-integrity", default=None, metavar="off|every|sampled:K",
                   help="our connector: digest each selected request's KV on P after its prefill "
                   "and on D after its READs, and fail the request on D when they differ "
                   "(kv_load_failure_policy); every request, one in K (chosen from the proxy's "
                   f"request id, the same on P and D) or off (default {DEFAULT_KV_INTEGRITY}); "
                   f"kv_connector_extra_config.{KEY_KV_INTEGRITY}, given to P and D alike")
    p.add_argument("--no-telemetry", dest="telemetry", action="store_false",
                   help="no span database (OTLP still follows the OTEL_* variables)")
    p.add_argument("--health-timeout", type=float, default=600.0, help="seconds to wait for health")
    p.add_argument("--api-key", default=None, help=f"required on /v1/* by the proxy, P and D "
                   f"(default: {ENV_API_KEY} from the environment; handed to the engines in "
                   "their environment, never written to the run directory)")


def kv_extra_from_args(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    """The kv_connector_extra_config entries the user set; the rest stay default_kv_extra's."""
    out: list[tuple[str, object]] = []
    if args.kv_read_timeout is not None:
        if args.kv_read_timeout <= 0:
            raise SystemExit(f"--kv-read-timeout must be > 0 seconds, got {args.kv_read_timeout}")
        out.append((KEY_READ_TIMEOUT, args.kv_read_timeout))
    if args.kv_read_granularity is not None:
        from hybrid_pd.transfer.reads import parse_granularity

        try:
            parse_granularity(args.kv_read_granularity)
        except ValueError as exc:
            raise SystemExit(f"--kv-read-granularity: {exc}") from exc
        out.append((KEY_READ_GRANULARITY, args.kv_read_granularity))
    if getattr(args, "kv_integrity", None) is not None:
        from hybrid_pd.transfer.integrity import IntegrityPolicy

        try:
            IntegrityPolicy.parse(args.kv_integrity)
        except ValueError as exc:
            raise SystemExit(f"--kv-integrity: {exc}") from exc
        out.append((KEY_KV_INTEGRITY, args.kv_integrity))
    return tuple(out)


def telemetry_db_from_args(args: argparse.Namespace, run_dir: Path) -> str | None:
    if not args.telemetry:
        return None
    if args.telemetry_db:
        return str(args.telemetry_db)
    path = private_dir(run_dir) / "telemetry.db"
    # owner-only before SQLite opens it (its -wal/-shm files take the database's mode)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    return str(path.resolve())


def ports_from_args(args: argparse.Namespace) -> Ports:
    return Ports(
        proxy=args.port, prefill=args.prefill_port, decode=args.decode_port,
        prefill_side_channel=args.prefill_side_channel_port,
        decode_side_channel=args.decode_side_channel_port,
    )


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``VLLM_API_KEY`` from the environment, else None (open)."""
    key = getattr(args, "api_key", None) or os.environ.get(ENV_API_KEY) or None
    if key is not None and (not key.strip() or any(c.isspace() for c in key)):
        raise SystemExit("--api-key / VLLM_API_KEY must be a non-empty token without spaces")
    return key


def engine_host_from_args(args: argparse.Namespace) -> str:
    """The engines' bind address.  With ``--role prefill|decode`` the engine is what this
    command serves, so ``--host`` names it too (give one of the two, or the same)."""
    if getattr(args, "role", "all") == "all" or args.host == DEFAULT_HOST:
        return args.engine_host
    if args.engine_host not in (DEFAULT_HOST, args.host):
        raise SystemExit(f"--role {args.role}: --host {args.host} and --engine-host "
                         f"{args.engine_host} both name the engine's address; give one")
    return args.host


def launch_config_from_args(args: argparse.Namespace, run_dir: Path) -> LaunchConfig:
    return LaunchConfig(
        model=args.model, host=args.host, engine_host=engine_host_from_args(args),
        side_channel_host=getattr(args, "side_channel_host", None), connector=args.connector,
        kv_cache_gib=args.kv_cache_gib, enforce_eager=args.enforce_eager,
        cpu_bind=args.cpu_bind, engine_args=engine_args_for(args.model, tuple(args.extra)),
        telemetry_db=telemetry_db_from_args(args, run_dir), kv_extra=kv_extra_from_args(args),
        api_key=api_key_from_args(args),
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
    p.add_argument("--role", choices=ROLES, default="all",
                   help="all: P, D and the proxy here (default); prefill or decode: only that "
                   "engine, bound to --engine-host (or --host), for a `hybrid-pd proxy "
                   "--prefill URL... --decode URL...` running elsewhere")
    p.add_argument("--side-channel-host", default=None, metavar="ADDRESS",
                   help=f"NIXL side channel address ({ENV_SIDE_CHANNEL_HOST}; default: the "
                   "engine host): D connects to P there, so with engines on several hosts it "
                   "must be an address of this host that the other hosts reach")
    p.add_argument("--restart", choices=("never", "on-failure"), default="never",
                   help="when P, D or the proxy dies: stop everything (never, the default) "
                   "or start that child again and re-run the P/D warm-up")
    p.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="with --restart on-failure: restarts per child before giving up")
    p.set_defaults(func=run, accepts_extra=True)


def supervisor_from_args(args: argparse.Namespace, cfg: LaunchConfig, run_dir: Path) -> Supervisor:
    """What ``serve`` starts: P, D and the proxy, or with ``--role`` one engine (whose
    side channel must then be an address another host can connect to)."""
    sup = build_supervisor(cfg, run_dir, ports_from_args(args), args.prefill_tp, args.decode_tp,
                           role=args.role)
    if args.role != "all":
        (engine,) = sup.children
        if is_any_address(engine.env[ENV_SIDE_CHANNEL_HOST]):
            raise SystemExit(
                f"--role {args.role}: the NIXL side channel would be "
                f"{engine.env[ENV_SIDE_CHANNEL_HOST]!r}, which D cannot connect to; give this "
                "host's address on the network D reaches with --side-channel-host")
    return sup


def describe_engine(cfg: LaunchConfig, child: Child, role: str) -> str:
    """What a ``--role`` engine serves, and how a proxy elsewhere routes to it."""
    side_host = child.env[ENV_SIDE_CHANNEL_HOST]
    # bound to every interface: the side channel's address is the one others reach
    host = side_host if is_any_address(cfg.engine_host) else cfg.engine_host
    url = f"http://{host}:{urlsplit(child.health_url).port}"
    lines = [f"[hybrid-pd] {role} engine serving on {url}/v1 (bound to {cfg.engine_host}); "
             f"NIXL side channel {side_host}:{child.env.get(ENV_SIDE_CHANNEL_PORT, '?')}",
             f"[hybrid-pd] route to it: hybrid-pd proxy --{role} {url} ... (and the other "
             "role's engines)" + ("; the proxy needs the same VLLM_API_KEY" if cfg.api_key else "")]
    if host in ("127.0.0.1", "localhost", "::1"):
        lines.append("[hybrid-pd] loopback: reachable from this host only (--engine-host and "
                     "--side-channel-host give other hosts an address)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or default_run_dir("serve")
    cfg = launch_config_from_args(args, run_dir)
    sup = supervisor_from_args(args, cfg, run_dir)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    logs = ", ".join(f"{c.name}.log" for c in sup.children)
    print(f"[hybrid-pd] logs in {run_dir}/ ({logs})", file=sys.stderr)
    if cfg.telemetry_db is not None:
        print(f"[hybrid-pd] spans -> {cfg.telemetry_db}; view them with: hybrid-pd dashboard "
              f"--db {cfg.telemetry_db}", file=sys.stderr)
    try:
        with sup:
            if args.role == "all":
                _serve_all(sup, args, cfg.api_key)
            else:
                _serve_until_a_child_dies(sup, args, None,
                                          describe_engine(cfg, sup.children[0], args.role))
    except KeyboardInterrupt:
        print("\n[hybrid-pd] stopping...", file=sys.stderr)
        return 0
    except LaunchError as exc:
        print(f"[hybrid-pd] error: {exc}", file=sys.stderr)
        return 1


def _stop_on_sigterm(signum: int, _frame: object) -> None:
    # SIGTERM takes Ctrl-C's path: the supervisor's exit stops every child.
    raise KeyboardInterrupt


def _serve_all(sup: Supervisor, args: argparse.Namespace, key: str | None) -> NoReturn:
    proxy = f"http://{connect_host(args.host)}:{args.port}"
    decode_log = sup.run_dir / "decode.log"

    def warm_up() -> int:
        # a new engine has a new engine id: D handshakes with it again (or with P anew)
        return warm_up_pair(proxy, args.model, decode_log, api_key=key)

    _serve_until_a_child_dies(sup, args, warm_up,
                              f"[hybrid-pd] serving on http://{args.host}:{args.port}/v1 "
                              "(Ctrl-C stops everything)")


def _serve_until_a_child_dies(sup: Supervisor, args: argparse.Namespace,
                              warm_up: Callable[[], int] | None, serving: str) -> NoReturn:
    """Start, wait for health, warm up (all-in-one: the P/D pair's handshake), say
    ``serving``, then watch: a dead child stops all, or is restarted (--restart)."""
    sup.start()
    sup.wait_healthy(args.health_timeout)
    for c in sup.children:
        print(f"[hybrid-pd] {c.name} ready after {c.ready_after_s:.0f} s", file=sys.stderr)
    if warm_up is not None:
        tries = warm_up()
        print(f"[hybrid-pd] P/D handshake done (warm-up request, attempt {tries})", file=sys.stderr)
    print(serving, file=sys.stderr)
    while True:
        while not (dead := sup.dead()):
            time.sleep(1.0)
        child = dead[0]
        what = (f"{child.name} exited with code {child.proc.returncode}. "
                f"Last lines of {child.log_path}:\n{child.tail()}")
        if args.restart != "on-failure" or child.restarts >= args.max_restarts:
            why = ("; --restart on-failure would start it again" if args.restart != "on-failure"
                   else f" ({child.restarts} restarts already, --max-restarts {args.max_restarts})")
            raise LaunchError(f"{what}\nstopping all{why}")
        print(f"[hybrid-pd] {what}\n[hybrid-pd] restarting {child.name} "
              f"({child.restarts + 1} of at most {args.max_restarts})", file=sys.stderr)
        took = sup.restart(child, args.health_timeout)
        done = "" if warm_up is None else f"; P/D handshake done (attempt {warm_up()})"
        print(f"[hybrid-pd] {child.name} back after {took:.0f} s{done}; serving again",
              file=sys.stderr)
