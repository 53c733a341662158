"""Numbers and tables for people: human units, few digits, human column names.

Values keep three significant digits (``25.2 ms``, ``229 MiB``, ``1.23 GiB/s``) so that
a metric fits its column at 1280 px and a table column reads at a glance.  Bytes are in
powers of 1024, as memory (KV blocks) is sized; bandwidth likewise in GiB/s.

Tables go to ``st.dataframe`` as a pandas ``Styler`` (:func:`table`): the cells keep
their numbers (the browser sorts by them, tests read them with ``.value``) and show the
formatted text beside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from pandas.io.formats.style import Styler

MISSING = "–"
_BIN_UNITS: tuple[tuple[str, int], ...] = (("KiB", 1 << 10), ("MiB", 1 << 20),
                                           ("GiB", 1 << 30), ("TiB", 1 << 40))
_NEXT_UNIT_AT = 999.5  # what sig3 would write as "1,000": the next unit's "1.00" instead


def sig3(x: float) -> str:
    """``x`` to three significant digits, without exponent (``0.0123``, ``4.50``, ``25.2``,
    ``229``, ``1,234``: integers above 999 keep their digits)."""
    r = float(f"{x:.3g}")  # rounded first: 99.96 is "100", not "100.0"
    if abs(r) >= 100 or r == 0:
        return f"{x:,.0f}"
    decimals = 2 - math.floor(math.log10(abs(r)))  # 4.5 -> 2, 25.2 -> 1, 0.0123 -> 4
    return f"{r:.{decimals}f}"


def fmt_bin_bytes(n: float) -> str:
    """``1.50 MiB``, ``229 MiB``, ``1,023 B``: powers of 1024, three significant digits."""
    if abs(n) < 1024:
        return f"{n:,.0f} B"
    for unit, div in _BIN_UNITS[:-1]:
        if abs(n) / div < _NEXT_UNIT_AT:
            return f"{sig3(n / div)} {unit}"
    unit, div = _BIN_UNITS[-1]
    return f"{sig3(n / div)} {unit}"


def fmt_rate(bytes_per_s: float | None) -> str:
    """``1.23 GiB/s``; a missing or infinite rate (no time spent) is ``–``."""
    if bytes_per_s is None or not math.isfinite(bytes_per_s):
        return MISSING
    return fmt_bin_bytes(bytes_per_s) + "/s"


def fmt_duration_ms(ms: float | None) -> str:
    """A duration given in ms, in the unit that reads best: ``512 µs``, ``25.2 ms``, ``1.23 s``."""
    if ms is None or pd.isna(ms):
        return MISSING
    if abs(ms) >= _NEXT_UNIT_AT:
        return f"{sig3(ms / 1000)} s"
    if 0 < abs(ms) < _NEXT_UNIT_AT / 1000:
        return f"{sig3(ms * 1000)} µs"
    return f"{sig3(ms)} ms"


def fmt_count(n: float | None) -> str:
    return MISSING if n is None or pd.isna(n) else f"{int(n):,}"


def fmt_time(t: pd.Timestamp) -> str:
    """``2026-11-30 12:20:44.123``: to the ms, without the ``+00:00`` (the header says UTC)."""
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


# ---------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Col:
    """One table column for people: its header and how its cells are written.

    kind: ``text`` (as is), ``count`` (thousands separators), ``bytes`` (KiB/MiB/GiB),
    ``ms`` (a number of ms, the unit in the header), ``rate`` (bytes/s as GiB/s), ``num``
    (three significant digits), ``time`` (a UTC timestamp to the ms).  ``scale`` turns the raw value into the kind's unit
    (µs -> ms: 1e-3; GB/s -> bytes/s: 1e9).
    """

    name: str
    kind: str = "text"
    scale: float = 1.0


_FORMATS: dict[str, Callable[[float], str]] = {
    "count": fmt_count,
    "bytes": fmt_bin_bytes,
    "ms": sig3,
    "rate": fmt_rate,
    "num": sig3,
    "time": fmt_time,
}


def frame(df: pd.DataFrame, cols: dict[str, Col]) -> pd.DataFrame:
    """The columns ``cols`` of ``df`` (those it has), renamed and scaled; numbers stay numbers."""
    out = pd.DataFrame(index=df.index)
    for raw, col in cols.items():
        if raw not in df:
            continue
        v = df[raw]
        if col.kind not in ("text", "time"):
            v = pd.to_numeric(v, errors="coerce")
            if col.scale != 1.0:
                v = v * col.scale
        out[col.name] = v
    return out.reset_index(drop=True)


def table(df: pd.DataFrame, cols: dict[str, Col]) -> Styler:
    """:func:`frame` as a Styler that writes each cell in its column's unit."""
    out = frame(df, cols)
    formats = {c.name: _FORMATS[c.kind] for c in cols.values()
               if c.kind in _FORMATS and c.name in out}
    return out.style.format(formats, na_rep=MISSING)


def span_name(name: str | None) -> str | None:
    """A span name without the package prefix (``kv.read``)."""
    return None if name is None else str(name).removeprefix("hybrid_pd.")
