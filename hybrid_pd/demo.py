"""``hybrid-pd demo``: the main job, end to end on one machine.

Builds the tiny hybrid model (unless ``--model`` names a real one), runs every prompt
on a plain single engine first (the reference; stopped before P/D starts, so the P/D
timings are not disturbed on a small machine), then starts P, D and the proxy, sends
the same prompts through the proxy one at a time, checks each P/D completion against
the reference token for token (greedy), prints a table (prompt tokens, TTFT, KV transfer
time, bytes and descriptors from D's ``vllm:nixl_*`` metrics) and stops everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from hybrid_pd.metrics import scrape_nixl_metrics
from hybrid_pd.serve import cli as serve_cli
from hybrid_pd.serve.supervisor import (
    LaunchError,
    auth_headers,
    build_reference_supervisor,
    build_supervisor,
    default_run_dir,
    warm_up_pair,
)

WORDS = (
    "the prefill engine computes the attention cache and the mamba state while the decode "
    "engine pulls them over the network and continues generating tokens for the user"
).split()


def demo_prompt(n_words: int) -> str:
    return " ".join(WORDS[(i * 7 + n_words) % len(WORDS)] for i in range(n_words))


DEFAULT_PROMPT_WORDS = (8, 60, 200, 420)


@dataclass
class Row:
    prompt_tokens: int
    ttft_ms: float
    total_ms: float
    xfer_ms: float
    xfer_bytes: int
    descriptors: int
    match: bool
    pd_tokens: list[int]
    ref_tokens: list[int]


def completion_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}


def stream_completion(client: httpx.Client, url: str, body: dict) -> tuple[list[int], float, float, int]:
    """POST a streaming completion; returns (generated token ids, ttft_s, total_s, prompt_tokens)."""
    t0 = time.perf_counter()
    ttft = None
    tokens: list[int] = []
    prompt_tokens = 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code >= 400:
            resp.read()
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {resp.text[:500]}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids and ttft is None:
                    ttft = time.perf_counter() - t0
                tokens.extend(ids)
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    total = time.perf_counter() - t0
    return tokens, ttft if ttft is not None else total, total, prompt_tokens


def completion_tokens(client: httpx.Client, url: str, body: dict) -> list[int]:
    """Non-streaming completion; the generated token ids."""
    resp = client.post(url, json=body)
    if resp.status_code >= 400:
        raise RuntimeError(f"{url}: HTTP {resp.status_code}: {resp.text[:500]}")
    return list(resp.json()["choices"][0]["token_ids"])


def reference_outputs(url: str, model: str, prompts: list[str], max_tokens: int,
                      api_key: str | None = None) -> list[list[int]]:
    with httpx.Client(timeout=600.0, headers=auth_headers(api_key)) as client:
        return [completion_tokens(client, url + "/v1/completions", completion_body(model, p, max_tokens))
                for p in prompts]


def run_prompts(proxy_url: str, decode_url: str, model: str, prompts: list[str], max_tokens: int,
                reference: list[list[int]], api_key: str | None = None) -> list[Row]:
    rows = []
    with httpx.Client(timeout=600.0, headers=auth_headers(api_key)) as client:
        for prompt, ref in zip(prompts, reference, strict=True):
            before = scrape_nixl_metrics(client, decode_url)
            tokens, ttft, total, n_prompt = stream_completion(
                client, proxy_url + "/v1/completions", completion_body(model, prompt, max_tokens))
            delta = scrape_nixl_metrics(client, decode_url) - before
            rows.append(Row(n_prompt, ttft * 1e3, total * 1e3, delta.xfer_seconds * 1e3,
                            int(delta.bytes), int(delta.descriptors), tokens == ref, tokens, ref))
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'prompt tok':>10} {'TTFT ms':>9} {'total ms':>9} {'KV xfer ms':>10} {'KV bytes':>10} {'descs':>6}  P/D == single"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.prompt_tokens:>10} {r.ttft_ms:>9.1f} {r.total_ms:>9.1f} {r.xfer_ms:>10.2f} "
            f"{r.xfer_bytes:>10} {r.descriptors:>6}  {'yes' if r.match else 'NO'}"
        )
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the CPU P/D demo end to end and check outputs")
    p.add_argument("--model", default=None, help="model id or path (default: the tiny hybrid, built offline)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-words", type=int, nargs="+", default=list(DEFAULT_PROMPT_WORDS),
                   help="prompt lengths in words (the tiny tokenizer makes ~1.2 tokens per word)")
    serve_cli.add_common_launch_args(p)
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        from hybrid_pd.tiny_models import model_path

        print("[demo] building the tiny hybrid model (offline, deterministic)...", file=sys.stderr)
        args.model = str(model_path("tiny-nemotron-h"))
    run_dir = args.run_dir or default_run_dir("demo")
    if args.kv_read_granularity is None:
        # the demo shows the monitoring: one READ per layer, so the dashboard's request
        # timeline has a row per layer (serve's default is one READ per request)
        args.kv_read_granularity = "layer"
    cfg = serve_cli.launch_config_from_args(args, run_dir)
    ports = serve_cli.ports_from_args(args)
    prompts = [demo_prompt(n) for n in args.prompt_words]
    host = args.host
    print(f"[demo] model {args.model}; logs in {run_dir}/", file=sys.stderr)
    try:
        print("[demo] 1/2 reference: a single engine (no P/D)", file=sys.stderr)
        with build_reference_supervisor(cfg, run_dir, ports.reference, args.decode_tp) as ref:
            ref.start()
            ref.wait_healthy(args.health_timeout)
            ref_start = ref.children[0].ready_after_s
            reference = reference_outputs(f"http://{host}:{ports.reference}", args.model, prompts,
                                          args.max_tokens, cfg.api_key)
        print("[demo] 2/2 P/D: prefill + decode + proxy", file=sys.stderr)
        with build_supervisor(cfg, run_dir, ports, args.prefill_tp, args.decode_tp) as sup:
            sup.start()
            sup.wait_healthy(args.health_timeout)
            starts = {c.name: c.ready_after_s for c in sup.children}
            # the first request through the pair (it runs the NIXL handshake), as serve does
            tries = warm_up_pair(f"http://{host}:{ports.proxy}", args.model, run_dir / "decode.log",
                                 api_key=cfg.api_key)
            print(f"[demo] first request through the pair (handshake): ok on attempt {tries}",
                  file=sys.stderr)
            rows = run_prompts(f"http://{host}:{ports.proxy}", f"http://{host}:{ports.decode}",
                               args.model, prompts, args.max_tokens, reference, cfg.api_key)
            if cfg.telemetry_db is not None:
                time.sleep(SPAN_FLUSH_S)  # the engines' span batches go out every 0.5 s
    except (LaunchError, RuntimeError, httpx.HTTPError) as exc:
        print(f"[demo] FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print()
    print(f"hybrid-pd demo: {Path(args.model).name}, P TP={args.prefill_tp}, D TP={args.decode_tp}, "
          f"connector={args.connector}, reads per {args.kv_read_granularity}, "
          f"KV integrity {args.kv_integrity or 'off'}, greedy, "
          f"{args.max_tokens} new tokens")
    print(f"engine start (s): reference {ref_start:.0f}, prefill {starts['prefill']:.0f}, "
          f"decode {starts['decode']:.0f}")
    print(format_table(rows))
    bad = [r for r in rows if not r.match]
    for r in bad:
        print(f"\nMISMATCH at {r.prompt_tokens} prompt tokens:\n  P/D:    {r.pd_tokens}\n  single: {r.ref_tokens}")
    print("\nall P/D completions identical to the single engine" if not bad
          else f"\n{len(bad)} of {len(rows)} completions differ")
    print(f"engine logs: {run_dir}/")
    if cfg.telemetry_db is not None:
        print(f"spans: {span_summary(cfg.telemetry_db)} in {cfg.telemetry_db}")
        print(f"see them: .venv/bin/hybrid-pd dashboard --db {cfg.telemetry_db}")
    return 0 if not bad else 1


SPAN_FLUSH_S = 2.0


def span_summary(db: str) -> str:
    """'N spans (proxy a, prefill b, decode c)' read back from the span database."""
    import sqlalchemy as sa

    from hybrid_pd.dashboard import queries

    try:
        with queries.open_engine(db).connect() as conn:
            counts = {str(role): int(n) for role, n in conn.execute(
                sa.text("SELECT coalesce(role, service), count(*) FROM spans GROUP BY 1"))}
    except Exception as exc:  # the demo's result stands; say why spans are missing
        return f"no spans readable ({exc})"
    total = sum(counts.values())
    return f"{total} spans (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"
