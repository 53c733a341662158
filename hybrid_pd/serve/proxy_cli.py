"""``hybrid-pd proxy``: the P/D proxy alone, in front of engines that run anywhere (one P
and one D, or pools of each: see :mod:`.router`)."""

from __future__ import annotations

import argparse
import logging
import os

from hybrid_pd.serve.engines import DEFAULT_HOST, DEFAULT_PROXY_TIMEOUT_S
from hybrid_pd.serve.proxy import ProxyConfig, create_app
from hybrid_pd.serve.router import DEFAULT_POLICY, HEALTH_INTERVAL_S, KV_REFRESH_S, POLICIES
from hybrid_pd.settings import ENV_API_KEY, PORT_PROXY


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "proxy", help="run only the P/D proxy (a router over one or more P and D) in front "
        "of running engines")
    # --prefill-url/--decode-url (one URL each) are the original spellings: kept as aliases
    p.add_argument("--prefill", dest="prefill", nargs="+", action="extend", default=[],
                   metavar="URL", help="prefill engine(s), e.g. http://10.0.0.5:8100")
    p.add_argument("--prefill-url", dest="prefill", action="append", metavar="URL",
                   help="one prefill engine (same as --prefill URL)")
    p.add_argument("--decode", dest="decode", nargs="+", action="extend", default=[],
                   metavar="URL", help="decode engine(s), e.g. http://10.0.0.6:8200")
    p.add_argument("--decode-url", dest="decode", action="append", metavar="URL",
                   help="one decode engine (same as --decode URL)")
    p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY,
                   help="how a P and a D are chosen per request: the one with the fewest "
                   "requests in flight through this proxy (default), or in turn")
    p.add_argument("--kv-aware", action="store_true",
                   help="among D, prefer the lower KV cache usage (vllm:kv_cache_usage_perc "
                   "from each D's /metrics); ties and unknown usage: --policy least-outstanding")
    p.add_argument("--health-interval", type=float, default=HEALTH_INTERVAL_S, metavar="SECONDS",
                   help="GET /health of every engine this often; a failed engine is out "
                   "until it passes again")
    p.add_argument("--kv-refresh", type=float, default=KV_REFRESH_S, metavar="SECONDS",
                   help="with --kv-aware: read each D's KV cache usage this often")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=PORT_PROXY)
    p.add_argument("--timeout", type=float, default=DEFAULT_PROXY_TIMEOUT_S, help="seconds per engine call")
    p.add_argument("--telemetry-db", default=None,
                   help="write proxy spans to this SQLite file (plus OTLP from OTEL_* "
                   "variables); off when not given")
    p.set_defaults(func=run)
    # the API key comes from the environment only (ENV_API_KEY): a flag would show in ps


def backend_urls(urls: list[str] | None, flag: str) -> tuple[str, ...]:
    """The engine URLs of one role, without a trailing slash; SystemExit naming the flag
    when there is none, one is not http(s), or one is listed twice."""
    out = tuple(u.rstrip("/") for u in urls or ())
    if not out:
        raise SystemExit(f"hybrid-pd proxy: give at least one {flag} URL")
    for url in out:
        if not url.startswith(("http://", "https://")):
            raise SystemExit(f"hybrid-pd proxy: {flag} {url!r} is not an http:// or https:// URL")
    if len(set(out)) < len(out):
        raise SystemExit(f"hybrid-pd proxy: {flag} lists an engine twice: {' '.join(out)}")
    return out


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    prefill, decode = backend_urls(args.prefill, "--prefill"), backend_urls(args.decode, "--decode")
    both = set(prefill) & set(decode)
    if both:
        raise SystemExit(f"hybrid-pd proxy: {' '.join(sorted(both))} is given as prefill and as "
                         "decode engine; an engine has one KV role")
    for flag, value in (("--health-interval", args.health_interval), ("--kv-refresh", args.kv_refresh)):
        if value <= 0:
            raise SystemExit(f"hybrid-pd proxy: {flag} must be > 0 seconds, got {value}")
    return ProxyConfig(prefill, decode, args.timeout, api_key=os.environ.get(ENV_API_KEY) or None,
                       policy=args.policy, kv_aware=args.kv_aware,
                       health_interval_s=args.health_interval, kv_refresh_s=args.kv_refresh)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(args)
    tel = None
    if args.telemetry_db:
        from hybrid_pd.telemetry import setup

        tel = setup.configure_tracing("hybrid-pd-proxy", "proxy", db_url=args.telemetry_db)
        print(f"[hybrid-pd proxy] spans -> {args.telemetry_db}", flush=True)
    if len(config.urls("prefill")) + len(config.urls("decode")) > 2:
        print(f"[hybrid-pd proxy] prefill: {' '.join(config.urls('prefill'))}; decode: "
              f"{' '.join(config.urls('decode'))}; policy {config.policy}"
              + (", KV-aware D" if config.kv_aware else ""), flush=True)
    app = create_app(config)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if tel is not None:
            tel.shutdown()  # flush what is queued
    return 0
