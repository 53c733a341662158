"""The wire and test-hook side of KV integrity checks (:mod:`.integrity`): the policy from
the connector's extra config, P's digests packed for its API server and unpacked on D,
D's bounded fetch of them, mismatches grouped for spans, and the two test-only hooks.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlsplit
from urllib.request import ProxyHandler, Request, build_opener

import numpy as np

from hybrid_pd.planner.descs import PeerTemplate
from hybrid_pd.planner.integrity_units import (
    VIEWS,
    BlockKey,
    UnitMismatch,
)
from hybrid_pd.planner.layout import EngineLayout
from hybrid_pd.settings import (
    DEFAULT_KV_INTEGRITY,
    ENV_TEST_INTEGRITY_FLIP,
    INTEGRITY_ROUTE,
    KEY_KV_INTEGRITY,
)
from hybrid_pd.transfer.integrity import IntegrityPolicy

logger = logging.getLogger("hybrid_pd.connector")

META_ATTR = "hybrid_pd_integrity"  # on the connector metadata: scheduler -> workers (P)
FLIP_MARKER = "integrity-flip"  # test hooks: proxy request ids containing these
PLANT_MARKER = "integrity-plant"
WITHHOLD_MAX_S = 30.0  # P: longest a guarded request's finished_sending is held back
FETCH_MAX_S = 60.0  # D: a fetch thread's own bound (from the first READ on)
FETCH_POLL_S = 0.02  # D: between two GETs while P's digests are not all there
FETCH_GET_TIMEOUT_S = 2.0
FETCH_MAX_BYTES = 64 << 20
CHECK_MAX_S = 600.0  # D: a check whose READs never finished is dropped after this
MAX_MISMATCH_SPANS = 16  # per request and D rank; the log has the full count


class DigestsUnavailable(Exception):
    """P's digests of a request could not be had (or compared): the request goes on
    unchecked."""


def policy_from(extra: Mapping[str, Any] | None) -> IntegrityPolicy:
    """The policy in ``kv_connector_extra_config`` (default off); a ``ValueError`` naming
    the key, the bad value and the accepted forms."""
    value = (extra or {}).get(KEY_KV_INTEGRITY, DEFAULT_KV_INTEGRITY)
    try:
        return IntegrityPolicy.parse(str(value))
    except ValueError as exc:
        raise ValueError(f"kv_connector_extra_config.{KEY_KV_INTEGRITY}: {exc}") from exc


# -------------------------------------------------------------------- wire (plain data)


def pack_digests(keys: Sequence[BlockKey], values: np.ndarray) -> tuple[str, str]:
    """Keys as little-endian int32 ``(layer, view index, index, block)`` rows and digests
    as little-endian uint64, each base64 text (what the stats channel and JSON carry)."""
    arr = np.asarray([(k.layer, VIEWS.index(k.view), k.index, k.block) for k in keys],
                     dtype="<i4").reshape(-1, 4)
    vals = np.asarray(values, dtype="<u8")
    if len(arr) != len(vals):
        raise ValueError(f"{len(arr)} keys but {len(vals)} digests")
    return (base64.b64encode(arr.tobytes()).decode("ascii"),
            base64.b64encode(vals.tobytes()).decode("ascii"))


def unpack_digests(keys: str, digests: str) -> dict[BlockKey, int]:
    """:func:`pack_digests` undone; ``ValueError`` on malformed input."""
    try:
        arr = np.frombuffer(base64.b64decode(keys, validate=True), dtype="<i4").reshape(-1, 4)
        vals = np.frombuffer(base64.b64decode(digests, validate=True), dtype="<u8")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed digests: {exc}") from exc
    if len(arr) != len(vals) or (len(arr) and not (0 <= arr[:, 1].min()
                                                   and arr[:, 1].max() < len(VIEWS))):
        raise ValueError(f"malformed digests: {len(arr)} keys, {len(vals)} digests")
    return {BlockKey(int(la), VIEWS[int(v)], int(i), int(b)): int(d)
            for (la, v, i, b), d in zip(arr.tolist(), vals.tolist(), strict=True)}


def prefill_digests(doc: Mapping[str, Any], block_size: int) -> dict[int, dict[BlockKey, int]]:
    """P's digests per P rank from its route's answer, once every rank's are there and
    P's logical block size equals D's ``block_size``; else :class:`DigestsUnavailable`."""
    try:
        tp, bs, ranks = int(doc["tp"]), int(doc["block_size"]), doc["ranks"]
        if len(ranks) < tp:
            raise DigestsUnavailable(f"P's digests of {len(ranks)} of its {tp} ranks")
        if bs != block_size:
            raise DigestsUnavailable(f"P's logical block is {bs} tokens, D's {block_size}: "
                                     "K/V units are cut per block, so they cannot be compared")
        return {int(r): unpack_digests(v["keys"], v["digests"]) for r, v in ranks.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DigestsUnavailable(f"P's digests malformed: {exc}") from exc


def mismatch_groups(mismatches: Sequence[UnitMismatch]
                    ) -> list[tuple[tuple[int, str, int | None], list[UnitMismatch]]]:
    """Mismatches per (layer, view, first P holder), in the order first seen."""
    out: dict[tuple[int, str, int | None], list[UnitMismatch]] = {}
    for m in mismatches:
        p = m.prefill_ranks[0] if m.prefill_ranks else None
        out.setdefault((m.key.layer, m.key.view, p), []).append(m)
    return list(out.items())


def integrity_url(prefill_url: str, prefill_request_id: str) -> str:
    """P's route for one request; ``ValueError`` unless ``prefill_url`` is an http(s) base."""
    parts = urlsplit(prefill_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ValueError(f"prefill_url {prefill_url!r} is not an http(s) base URL")
    return f"{prefill_url.rstrip('/')}{INTEGRITY_ROUTE}/{quote(prefill_request_id, safe='')}"


def fetch_prefill_digests(url: str, deadline: float, *, poll_s: float = FETCH_POLL_S,
                          api_key: str | None = None) -> dict[str, Any]:
    """GET ``url`` until P's digests of every P rank are there (``len(ranks) >= tp``), or
    raise :class:`DigestsUnavailable` at ``deadline`` (monotonic) or when P's server
    cannot be reached at all."""
    opener = build_opener(ProxyHandler({}))  # never through an HTTP proxy
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = "not served yet"
    while True:
        timeout = max(0.05, min(FETCH_GET_TIMEOUT_S, deadline - time.monotonic()))
        try:
            with opener.open(Request(url, headers=headers), timeout=timeout) as resp:
                doc = json.loads(resp.read(FETCH_MAX_BYTES))
            if isinstance(doc, dict) and len(doc.get("ranks") or ()) >= int(doc.get("tp", 1)):
                return doc
            last = f"{len(doc.get('ranks') or ())} of {doc.get('tp')} P ranks' digests"
        except HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (URLError, ConnectionError) as exc:
            raise DigestsUnavailable(f"P's API server unreachable at {url}: {exc}") from exc
        except (OSError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() + poll_s > deadline:
            raise DigestsUnavailable(f"P's digests not at {url} in time ({last})")
        time.sleep(poll_s)


def planted_template(template: PeerTemplate, layout: EngineLayout) -> PeerTemplate:
    """TEST ONLY: ``template`` with D's B run (the conv run at equal TP) one channel row
    (``conv_rows`` elements) late: the bytes stay inside the Mamba page (B ends inside
    C's channels; conv is followed by the SSM state)."""
    name = "B" if any(r.name == "B" for r in template.mamba_runs) else "conv"
    row = layout.conv_rows * layout.conv_dtype_size
    runs = tuple(replace(r, local_offset=r.local_offset + row) if r.name == name else r
                 for r in template.mamba_runs)
    if runs == template.mamba_runs:
        raise ValueError(f"no {name} run to plant a bug in: {template}")
    return replace(template, mamba_runs=runs)


def parse_flip(value: str | None) -> tuple[int, str] | None:
    """``"LAYER:VIEW"`` (test hook) -> (layer, view); None when unset or malformed."""
    if not value:
        return None
    layer, _, view = value.partition(":")
    if not layer.isdigit() or view not in VIEWS:
        logger.error("%s=%r ignored: expected LAYER:VIEW with VIEW one of %s",
                     ENV_TEST_INTEGRITY_FLIP, value, ", ".join(VIEWS))
        return None
    return int(layer), view


# ------------------------------------------------------------------------- scheduler
