"""The proxy's pure request rewriting (unit-tested without servers): what P/D can serve,
the body P gets, the body D gets, the trace hand-off they carry."""

from __future__ import annotations

import copy
import json
from typing import Any

from hybrid_pd.serve.proxy_calls import EngineError
from hybrid_pd.settings import HANDOVER_PARAMS_KEY, TRACE_PARAMS_KEY

# Fields that must not reach P: P only prefills one token, which is thrown away.
# min_tokens: P refuses min_tokens > max_tokens=1; logprobs/top_logprobs: only D's tokens
# are the answer; kv_transfer_params: the client's never reach an engine (we set P's).
_PREFILL_DROP = ("stream", "stream_options", "max_completion_tokens", "n", "best_of",
                 "min_tokens", "logprobs", "top_logprobs", "kv_transfer_params")


def parse_body(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the request body, None) or (None, why it is not a JSON object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"body is not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})"
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"body is not JSON: {exc}"
    except RecursionError:
        return None, "body is not JSON: nested too deeply"
    if not isinstance(body, dict):
        return None, f"body must be a JSON object, not {type(body).__name__}"
    return body, None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_batch(prompt: object) -> bool:
    # A list of ints is one token-id prompt; a list of strings or of lists is a batch.
    return isinstance(prompt, list) and any(isinstance(p, (str, list)) for p in prompt)


# What P/D can serve, field by field (checked before P runs, so a refused request never
# holds blocks on P that D would not read):
# - n, best_of > 1: several sequences from one prompt; the P/D hand-off is one request's
#   blocks for one D request, and vLLM's connector does not fan it out -> 400.
# - prompt_logprobs (and echo with logprobs, which asks for them too): computed while
#   prefilling, on P; D loads the prompt's KV and never sees those logits -> 400.
# - a batch prompt of several prompts: one KV hand-off per request -> 400; a batch of
#   one is that prompt (same answer shape), so it is unwrapped.
# - stream_options without stream: vLLM refuses it, but only on D, after P has
#   prefilled -> 400 here.
# - min_tokens: D honours it; P must not get it (its max_tokens is 1); above max_tokens
#   D would refuse after P ran -> 400 here.
# - logprobs / top_logprobs: D samples the answer, so D computes them; P does not get them.
# - a token-id prompt (list of ints): passes through to both engines unchanged.
def check_request(body: dict[str, Any]) -> tuple[str, str] | None:
    """(field, why) when P/D cannot serve ``body``; None when it can."""
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and not (_is_int(value) and value == 1):
            return name, f"'{name}' must be 1 (got {value!r}): disaggregated P/D serves one sequence per request"
    if body.get("prompt_logprobs") is not None or (body.get("echo") and body.get("logprobs") is not None):
        return "prompt_logprobs", ("prompt logprobs ('prompt_logprobs', or 'echo' with 'logprobs') are not "
                                   "available: the prompt is prefilled on another engine")
    prompt = body.get("prompt")
    if _is_batch(prompt) and len(prompt) > 1:
        return "prompt", f"batch of {len(prompt)} prompts: send one prompt per request through the P/D proxy"
    if body.get("stream_options") is not None and not body.get("stream"):
        return "stream_options", "'stream_options' is only allowed with 'stream': true"
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    least = body.get("min_tokens")
    if _is_int(least) and _is_int(limit) and least > limit:
        return "min_tokens", f"'min_tokens' ({least}) is above the maximum tokens ({limit})"
    return None


def check_length(body: dict[str, Any], max_model_len: int | None) -> tuple[str, str] | None:
    """(field, why) when the output length asked for cannot fit the model at all.  P
    gets ``max_tokens=1``, so only D would refuse it -- after P prefilled the prompt
    (a cheap amplifier); checked before P runs.  ``max_model_len``: None when unknown."""
    if max_model_len is None:
        return None
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if _is_int(value) and value >= max_model_len:
            return name, (f"{name}={value} leaves no room for a prompt: the model's "
                          f"max_model_len is {max_model_len}; ask for fewer tokens")
    return None


def normalize_request(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as both engines get it: a batch of one prompt becomes that prompt."""
    prompt = body.get("prompt")
    if _is_batch(prompt) and len(prompt) == 1:
        return {**body, "prompt": prompt[0]}
    return body


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The body P gets: one token, no streaming, and the remote-decode marker (vLLM's
    connectors read only ``do_remote_decode`` from it)."""
    out = {k: v for k, v in copy.deepcopy(body).items() if k not in _PREFILL_DROP}
    out["max_tokens"] = 1
    out["stream"] = False
    out["kv_transfer_params"] = {"do_remote_decode": True}
    return out


def with_trace(body: dict[str, Any], request_id: str, headers: dict[str, str],
               prefill_url: str | None = None) -> dict[str, Any]:
    """``body`` with the trace hand-off for the engines' KV connector added to its
    ``kv_transfer_params``: the ``traceparent``/``tracestate`` of the engine call
    (``headers``, as sent) and our request id, so the connector's spans join the trace
    under that call (see :mod:`hybrid_pd.telemetry.engine`); in D's, ``prefill_url``: the
    P engine that prefilled it, where D fetches P's integrity digests
    (:mod:`hybrid_pd.connector.integrity`, ``--kv-integrity``)."""
    hand_off = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
    hand_off["request_id"] = request_id
    if prefill_url:
        hand_off["prefill_url"] = prefill_url
    out = dict(body)
    out["kv_transfer_params"] = {**out["kv_transfer_params"], TRACE_PARAMS_KEY: hand_off}
    return out


def decode_request(body: dict[str, Any], prefill_response: dict[str, Any]) -> dict[str, Any]:
    """The body D gets: the user's request plus P's kv_transfer_params (less P's handover
    instants, which are the proxy's)."""
    params = prefill_response.get("kv_transfer_params")
    if not isinstance(params, dict):
        raise EngineError(
            "prefill",
            502,
            "answer has no kv_transfer_params: is the prefill engine started with a KV "
            "connector and kv_role=kv_producer (hybrid-pd serve does this)?",
        )
    out = copy.deepcopy(body)
    out["kv_transfer_params"] = {k: v for k, v in params.items() if k != HANDOVER_PARAMS_KEY}
    return out


def remote_engine_id(prefill_response: dict[str, Any]) -> str | None:
    """The engine id P put in its answer's kv_transfer_params (None when it did not)."""
    params = prefill_response.get("kv_transfer_params")
    value = params.get("remote_engine_id") if isinstance(params, dict) else None
    return value if isinstance(value, str) else None
