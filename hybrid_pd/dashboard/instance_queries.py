"""Engine instances and hosts: who wrote the spans, their labels, and the P-D pairs.

The ``processes`` table (``telemetry/schema.py``) maps an engine id to its role and host;
spans carry the engine id but not the host.  A database made before the table existed
has none: every host is then unknown.

Labels read "decode rank 0 @ host-b (4322d720)": role, D rank where the row has one,
host, and the engine id (a UUID cut to its first 8 hex digits).  An engine missing from
``processes`` is named by the role its transfer spans show (D of a transfer: decode; the
P it read from: prefill), or "engine" ("engine rank 0 (4322d720)"): never by the raw
UUID.  An id that is no UUID is never cut; without a role from ``processes`` it is
the label itself ("decode-h rank 0").

The pair table: one row per (P instance, D instance), from D's transfer spans: D is the
span's ``engine_id``, P its ``kv.peer_engine_id`` (the P engine D read from).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pandas as pd
from sqlalchemy import Engine, inspect, select

from hybrid_pd.dashboard.display import fmt_bin_bytes
from hybrid_pd.dashboard.queries import (
    Engines,
    fetch_frame,
    for_engines,
    in_window,
    ranked,
    sql_literal,
)
from hybrid_pd.dashboard.transfer_queries import transfer_aggregates
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import processes_table, span_attr, spans_table

_S = spans_table.c
_P = processes_table.c

PROCESS_COLUMNS: tuple[str, ...] = ("service", "role", "engine_id", "pid", "host", "first_seen_ns")
_UUID = re.compile(r"^([0-9a-fA-F]{8})-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}(.*)$")


def processes(engine: Engine) -> pd.DataFrame:
    """Every row of ``processes`` (empty when the database predates the table)."""
    if not inspect(engine).has_table(processes_table.name):
        return pd.DataFrame(columns=list(PROCESS_COLUMNS))
    keys = [_P.engine_id, _P.host, _P.role, _P.service, _P.pid]
    # NULLS LAST spelled out: SQLite sorts NULL first, PostgreSQL last.
    stmt = select(*[_P[c] for c in PROCESS_COLUMNS]).order_by(
        *[k.asc().nulls_last() for k in keys], _P.first_seen_ns)
    return fetch_frame(engine, stmt)


def short_id(engine_id: str) -> str:
    """A vLLM engine id (a UUID) cut to its first 8 hex digits, a suffix kept
    (``4322d720-rank0``: a worker's resource id); other ids whole."""
    m = _UUID.match(engine_id)
    return m.group(1) + m.group(2) if m else engine_id


def engine_label(engine_id: str | None, role: str | None = None, host: str | None = None,
                 rank: int | None = None) -> str:
    """``decode rank 0 @ host-b (4322d720)``; see the module docstring."""
    if engine_id is None:
        return "unknown engine"
    where = "" if rank is None else f" rank {rank}"
    where += "" if not host else f" @ {host}"
    short = short_id(engine_id)
    if role:
        return f"{role}{where} ({short})"
    # A UUID tells a person nothing and fills a legend: cut it like the known ones.
    return f"engine{where} ({short})" if short != engine_id else f"{engine_id}{where}"


def _first(values: pd.Series) -> str | None:
    vals = sorted(str(v) for v in values.dropna().unique())
    return vals[0] if vals else None


def engine_directory(procs: pd.DataFrame, extra_ids: tuple[str, ...] = (),
                     roles: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per engine id: role, host (several joined by ", "), label.

    ``procs`` is :func:`processes`; ``extra_ids`` are engine ids seen in spans only
    (an older database, a P known only as a peer): host unknown.  ``roles`` (engine id
    -> role seen in the spans, :func:`span_roles`) names a UUID that ``procs`` does not.
    """
    # Only for UUIDs: a readable id ("decode-h") already says what it is.
    seen = {e: r for e, r in (roles or {}).items() if short_id(e) != e}
    rows: dict[str, dict[str, Any]] = {}
    known = procs.dropna(subset=["engine_id"])
    for eid, g in known.groupby("engine_id", sort=True):
        hosts = sorted(str(h) for h in g["host"].dropna().unique())
        rows[str(eid)] = {"engine_id": str(eid), "role": _first(g["role"]) or seen.get(str(eid)),
                          "host": ", ".join(hosts) or None}
    for eid in extra_ids:
        if eid is not None and eid not in rows:
            rows[eid] = {"engine_id": eid, "role": seen.get(eid), "host": None}
    out = pd.DataFrame(list(rows.values()), columns=["engine_id", "role", "host"])
    out = out.sort_values("engine_id", ignore_index=True)
    out["label"] = [engine_label(e, _text(r), _text(h)) for e, r, h in
                    zip(out["engine_id"], out["role"], out["host"], strict=True)]
    dup = out["label"].duplicated(keep=False)  # two UUIDs sharing 8 hex digits
    out.loc[dup, "label"] = out.loc[dup, "label"] + " " + out.loc[dup, "engine_id"]
    return out


def span_roles(pairs: pd.DataFrame) -> dict[str, str]:
    """Engine id -> role from :func:`transfer_pairs`: the span's engine (D) decodes, the
    engine it read from (P) prefills; decode wins for an engine seen as both."""
    roles = {str(p): "prefill" for p in pairs["p_engine_id"].dropna()}
    roles.update({str(d): "decode" for d in pairs["d_engine_id"].dropna()})
    return roles


def hosts(procs: pd.DataFrame) -> list[str]:
    return sorted(str(h) for h in procs["host"].dropna().unique())


def label_engines(df: pd.DataFrame, directory: pd.DataFrame, col: str = "engine_id",
                  rank_col: str | None = "rank", out: str = "engine") -> pd.DataFrame:
    """``df`` with column ``out``: the label of ``df[col]`` (with the rank of ``rank_col``)."""
    d = directory.set_index("engine_id")
    role, host = d["role"].to_dict(), d["host"].to_dict()
    ranks = df[rank_col] if rank_col and rank_col in df else [None] * len(df)
    df = df.copy()
    df[out] = [engine_label(_text(e), _text(role.get(e)), _text(host.get(e)),
                            None if r is None or pd.isna(r) else int(r))
               for e, r in zip(df[col], ranks, strict=True)]
    return df


def _text(v: Any) -> str | None:
    return None if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)


# ----------------------------------------------------------------------- P-D pairs


def transfer_pairs(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                   engines: Engines = None) -> pd.DataFrame:
    """Transfer spans per (D engine, P engine): transfers, errors (status ERROR), bytes,
    busy_ns, nearest-rank p50/p99 and max of the duration (ns).  One SQL statement; the
    P engine is ``kv.peer_engine_id`` from the JSON, so each transfer row is read."""
    base = (
        select(_S.engine_id.label("d_engine_id"),
               span_attr(A.KV_PEER_ENGINE_ID).label("p_engine_id"),
               _S.status, _S.bytes, _S.duration_ns)
        .where(_S.name == sql_literal(A.SPAN_KV_TRANSFER), *in_window(start_ns, end_ns),
               *for_engines(engines))
        .subquery()
    )
    r = ranked(base, ("d_engine_id", "p_engine_id"), ("duration_ns",))
    keys = [r.c.p_engine_id, r.c.d_engine_id]
    stmt = (
        select(*keys, *transfer_aggregates(r, "errors", (50, 99)))
        .group_by(*keys)
        .order_by(*[k.asc().nulls_last() for k in keys])
    )
    return fetch_frame(engine, stmt)


def label_pairs(pairs: pd.DataFrame, directory: pd.DataFrame) -> pd.DataFrame:
    """:func:`transfer_pairs` plus ``P instance`` / ``D instance`` labels and
    ``bytes moved`` in KiB/MiB/GiB."""
    df = label_engines(pairs, directory, "p_engine_id", None, "P instance")
    df = label_engines(df, directory, "d_engine_id", None, "D instance")
    df["P instance"] = df["P instance"].where(df["p_engine_id"].notna(), "unknown P")
    df["bytes moved"] = [fmt_bin_bytes(float(b)) for b in pd.to_numeric(df["bytes"])]
    return df


def pair_table(labelled: pd.DataFrame) -> pd.DataFrame:
    """:func:`label_pairs` rows for people: times in ms, GiB/s over the time spent in
    transfers (the per-transfer bandwidth a request saw)."""
    busy_s = pd.to_numeric(labelled["busy_ns"]) / 1e9
    return pd.DataFrame({
        "P instance": labelled["P instance"],
        "D instance": labelled["D instance"],
        "transfers": labelled["transfers"],
        "errors": labelled["errors"],
        "bytes": labelled["bytes moved"],
        "p50 (ms)": pd.to_numeric(labelled["p50_ns"]) / 1e6,
        "p99 (ms)": pd.to_numeric(labelled["p99_ns"]) / 1e6,
        "max (ms)": pd.to_numeric(labelled["max_ns"]) / 1e6,
        "GiB/s": pd.to_numeric(labelled["bytes"]) / (1 << 30) / busy_s.where(busy_s > 0),
    })
