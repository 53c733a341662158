"""The READ path both users drive: inside vLLM (``connector.executor_worker``) and
``hybrid-pd bench`` (:class:`~hybrid_pd.transfer.executor.NixlExecutor`).

One request's reads from one peer are *parts* (one READ handle each: the whole
request, or one cache layer).  :func:`post_reads` makes every handle first and then
starts each, so a per-layer read costs handle creation, not serialisation;
:func:`poll_read` is one ``check_xfer_state`` (plus NIXL's telemetry once, on DONE);
:class:`StallGuard` is the deadline.  Every outcome is written into a
:class:`ReadResult` as plain ``time.monotonic_ns()`` stamps: spans are built from those
afterwards (:mod:`hybrid_pd.telemetry.recorder`), never on the transfer's path, and
the read path does the same NIXL calls whether anything records or not.

Clock: monotonic ns, so a wall-clock step cannot stretch a read; the recorder adds the
wall-clock offset when it turns stamps into spans.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybrid_pd.planner.layout import EngineLayout
from hybrid_pd.planner.plan import ReadPlan

# ------------------------------------------------------------------------- granularity


def parse_granularity(value: str) -> tuple[str, int]:
    """``"request"`` -> ("request", 0); ``"layer"`` -> ("layer", 1); ``"sampled:K"`` ->
    ("sampled", K): per-layer for one request in K."""
    if value in ("request", "layer"):
        return value, 0 if value == "request" else 1
    if value.startswith("sampled:"):
        try:
            k = int(value.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "sampled", k
    raise ValueError(
        f"granularity must be 'request', 'layer' or 'sampled:K' with K >= 1, got {value!r}"
    )


def per_layer_for(granularity: str, request_index: int) -> bool:
    """Whether request number ``request_index`` (0-based) is read layer by layer."""
    kind, k = parse_granularity(granularity)
    if kind == "sampled":
        return request_index % k == 0
    return kind == "layer"


def layer_of_units(
    read: ReadPlan,
    layout: EngineLayout,
    decode_block_ids: Sequence[Sequence[int]],
) -> np.ndarray:
    """Cache layer of every unmerged unit of ``read`` (D side): the unit's region and
    block name the HMA group, and the group's layer at that region position.  Needs an
    unmerged plan (``local`` 1:1 with ``local_ids``)."""
    units = read.local_array
    if len(units) != len(read.local_id_array):
        raise ValueError(
            "per-layer reads need an unmerged plan (plan_request(..., merge=False)); got "
            f"{len(units)} descriptors for {len(read.local_id_array)} units"
        )
    group_of = np.full(layout.num_blocks, -1, np.int64)
    for gi, ids in enumerate(decode_block_ids):
        group_of[np.asarray(ids, np.int64)] = gi
    table = np.full((len(layout.hma_groups), layout.num_regions), -1, np.int64)
    for gi, g in enumerate(layout.hma_groups):
        table[gi, :len(g.layers)] = g.layers
    return table[group_of[units[:, 0] // layout.page_size_bytes], units[:, 2]]


def split_units(
    read: ReadPlan,
    layout: EngineLayout,
    decode_block_ids: Sequence[Sequence[int]],
    per_layer: bool,
) -> list[tuple[int | None, np.ndarray]]:
    """Unit indices of ``read`` per READ: one array (layer None), or one per cache layer
    in plan order."""
    n = len(read.local_id_array)
    if not per_layer:
        return [(None, np.arange(n))]
    layers = layer_of_units(read, layout, decode_block_ids)
    uniq, first = np.unique(layers, return_index=True)
    return [(int(layer), np.flatnonzero(layers == layer))
            for layer in uniq[np.argsort(first)]]


def layer_kinds(layout: EngineLayout) -> dict[int, tuple[str, int]]:
    """Cache layer -> (kind, HMA group index): labels for per-layer read spans."""
    return {layer: (str(g.kind.value), gi)
            for gi, g in enumerate(layout.hma_groups) for layer in g.layers}


@dataclass(frozen=True)
class ReadPart:
    """One READ handle's worth of a request: descriptor ids into both prepped views."""

    local_ids: np.ndarray
    remote_ids: np.ndarray
    bytes: int
    layer: int | None = None  # None: the whole request from that peer
    kind: str = "mixed"  # layer kind label ("attention" / "mamba"), "mixed" for all
    group: int = -1
    units: np.ndarray | None = None  # indices into the ReadPlan's unmerged units


def plan_parts(read: ReadPlan, layout: EngineLayout, decode_block_ids: Sequence[Sequence[int]],
               per_layer: bool) -> list[ReadPart]:
    """The READ parts of one peer's share of an unmerged plan."""
    lids, rids = read.local_id_array, read.remote_id_array
    if not per_layer:  # the whole share in one READ: no per-unit work at all
        return [ReadPart(lids, rids, read.bytes, units=np.arange(len(lids)))]
    kinds = layer_kinds(layout)
    lengths = read.local_array[:, 1]
    out = []
    for layer, idx in split_units(read, layout, decode_block_ids, per_layer):
        kind, group = kinds.get(layer, ("mixed", -1)) if layer is not None else ("mixed", -1)
        out.append(ReadPart(lids[idx], rids[idx], int(lengths[idx].sum()), layer, kind, group,
                            idx))
    return out


# ------------------------------------------------------------------------------ results


@dataclass
class XferTelemetry:
    """NIXL's own numbers for one READ (``get_xfer_telemetry``), microseconds."""

    start_us: int
    post_us: int
    xfer_us: int
    total_bytes: int
    desc_count: int


@dataclass
class ReadResult:
    """One READ handle: which peer, which layer (None = whole request), how it went."""

    prefill_rank: int
    layer: int | None
    bytes: int
    descriptors: int  # descriptors we handed NIXL (units in prepped mode)
    status: str  # "PROC" | "DONE" | "ERR" | "TIMEOUT" | "POST_FAILED" | "ABORTED"
    reason: str = ""
    t_make_ns: int = 0  # before the handle was created
    t_created_ns: int = 0  # handle made, before transfer()
    t_post_ns: int = 0  # after transfer() returned
    t_done_ns: int = 0  # first poll that saw DONE (0 if never)
    # Previous poll of this handle (or the post): the real completion lies in
    # (t_prev_poll_ns, t_done_ns], so t_done_ns - t_prev_poll_ns bounds the span-end lag.
    t_prev_poll_ns: int = 0
    t_end_ns: int = 0  # when the outcome was seen (DONE, ERR, abort)
    polls: int = 0
    telemetry: XferTelemetry | None = None
    kind: str = "mixed"
    group: int = -1
    request_id: str = ""
    peer_engine: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def now_ns() -> int:
    return time.monotonic_ns()


def short_reason(exc: BaseException) -> str:
    # Span reasons stay short and payload-free: exception type plus the message head.
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# ------------------------------------------------------------------------------ posting


class PostError(RuntimeError):
    """Posting failed part-way.  ``started`` READs are in flight and must still be
    polled; ``retained`` handles NIXL would not release (it may still be using them):
    the caller keeps them, and their blocks, until a later release succeeds."""

    def __init__(self, message: str, started: list[tuple[Any, ReadResult]],
                 retained: list[Any]) -> None:
        super().__init__(message)
        self.started = started
        self.retained = retained


def release(agent: Any, handle: Any) -> str:
    """Release a handle; "" on success, else why (NIXL keeps it: do not reuse its
    blocks until a later release succeeds)."""
    try:
        agent.release_xfer_handle(handle)
    except Exception as exc:
        return short_reason(exc)
    return ""


def held_read_ended(agent: Any, handle: Any) -> str | None:
    """How a given-up (held) READ ended; None while it may still write: in flight, or
    NIXL's answer does not prove that no byte can land any more (only a remote
    disconnect does; NIXL 1.5.1's release does not cancel a READ)."""
    try:
        state = agent.check_xfer_state(handle)
    except Exception as exc:
        if "RemoteDisconnect" in type(exc).__name__ or "REMOTE_DISCONNECT" in str(exc):
            return "peer disconnected (nothing more can land)"
        return None
    if state == "PROC":
        return None
    return "READ completed late (its bytes landed in the held blocks)" if state == "DONE" \
        else f"READ ended {state}"


def post_reads(agent: Any, local_view: Any, remote_view: Any, parts: Sequence[ReadPart], *,
               prefill_rank: int, notif: bytes | None = None,
               request_id: str = "", peer_engine: str = "") -> list[tuple[Any, ReadResult]]:
    """Make one prepped READ handle per part, then start them all.

    ``notif`` rides on the READ itself when there is exactly one part (NIXL delivers it
    to the peer once the READ is done); with several parts the caller notifies after the
    last one is DONE.  Raises :class:`PostError` when a handle cannot be made or started;
    handles made but not started are released first."""
    handles: list[Any] = []
    recs: list[ReadResult] = []
    kw = {"notif_msg": notif} if notif is not None and len(parts) == 1 else {}
    try:
        for part in parts:
            rec = ReadResult(prefill_rank, part.layer, part.bytes, len(part.local_ids), "PROC",
                             t_make_ns=now_ns(), kind=part.kind, group=part.group,
                             request_id=request_id, peer_engine=peer_engine)
            handles.append(agent.make_prepped_xfer("READ", local_view, part.local_ids,
                                                   remote_view, part.remote_ids, **kw))
            rec.t_created_ns = now_ns()
            recs.append(rec)
    except Exception as exc:
        retained = [h for h in handles if release(agent, h)]
        raise PostError(f"making READ {len(handles)} of {len(parts)} failed: "
                        f"{short_reason(exc)}", [], retained) from exc
    return start_reads(agent, handles, recs)


def start_reads(agent: Any, handles: Sequence[Any], recs: Sequence[ReadResult]
                ) -> list[tuple[Any, ReadResult]]:
    """``transfer()`` each made handle; a READ whose post already says ERR stays in the
    list (its first poll reports it, so every failure takes one path)."""
    started: list[tuple[Any, ReadResult]] = []
    for i, (handle, rec) in enumerate(zip(handles, recs, strict=True)):
        try:
            agent.transfer(handle)
        except Exception as exc:
            retained = [h for h in handles[i:] if release(agent, h)]
            raise PostError(f"starting READ {i + 1} of {len(handles)} failed: "
                            f"{short_reason(exc)}", started, retained) from exc
        rec.t_post_ns = rec.t_prev_poll_ns = now_ns()
        started.append((handle, rec))
    return started


# ------------------------------------------------------------------------------ polling


def fetch_telemetry(agent: Any, handle: Any) -> tuple[Any, XferTelemetry | None]:
    """NIXL's raw telemetry object (for vLLM's stats) and our parsed copy; best effort:
    an agent without telemetry capture raises, and the READ itself still succeeded."""
    try:
        raw = agent.get_xfer_telemetry(handle)
        return raw, XferTelemetry(int(raw.startTime), int(raw.postDuration),
                                  int(raw.xferDuration), int(raw.totalBytes),
                                  int(raw.descCount))
    except Exception:
        return None, None


def poll_read(agent: Any, handle: Any, rec: ReadResult, *, telemetry: bool = True) -> Any:
    """One ``check_xfer_state`` of a posted READ, stamped into ``rec``.

    Returns NIXL's raw telemetry on DONE (None otherwise); ``rec.status`` says the state.
    Exceptions from NIXL propagate (the caller reports them as a failure)."""
    state = agent.check_xfer_state(handle)
    now = now_ns()
    rec.polls += 1
    if state == "DONE":
        rec.status, rec.t_done_ns, rec.t_end_ns = "DONE", now, now
        if telemetry:
            raw, rec.telemetry = fetch_telemetry(agent, handle)
            return raw
    elif state == "PROC":
        rec.t_prev_poll_ns = now
    else:
        rec.status, rec.t_end_ns = "ERR", now
        rec.reason = rec.reason or f"READ of {rec.bytes} B returned {state}"
    return None


@dataclass(frozen=True)
class StallGuard:
    """The READ deadline: a READ still in flight ``timeout_s`` after its post is given up
    (released; the request fails).  ``None``: never (a stalled peer then hangs the request
    until its lease, which is why serving turns it on by default)."""

    timeout_s: float | None

    @classmethod
    def parse(cls, value: object, key: str) -> StallGuard:
        if value is None:
            return cls(None)
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{key}={value!r} is not a number of seconds; give e.g. 30") from exc
        if not seconds > 0:
            raise ValueError(f"{key}={value!r} must be > 0 seconds")
        return cls(seconds)

    def expired(self, rec: ReadResult, now: int) -> bool:
        return (self.timeout_s is not None and rec.status == "PROC"
                and now - rec.t_post_ns > self.timeout_s * 1e9)

    def reason(self, rec: ReadResult, now: int) -> str:
        return f"stalled: READ not done after {(now - rec.t_post_ns) / 1e9:.1f} s"


def abort_read(agent: Any, handle: Any, rec: ReadResult, status: str, reason: str) -> bool:
    """Give up a READ: mark it and release its handle.  False when NIXL refused the
    release (the caller must keep the handle, and the blocks it writes into)."""
    rec.status, rec.reason, rec.t_end_ns = status, reason, now_ns()
    err = release(agent, handle)
    if err:
        rec.reason += f"; release failed: {err}"
    return not err


__all__ = [
    "PostError",
    "ReadPart",
    "ReadResult",
    "StallGuard",
    "XferTelemetry",
    "abort_read",
    "fetch_telemetry",
    "layer_kinds",
    "layer_of_units",
    "now_ns",
    "parse_granularity",
    "per_layer_for",
    "plan_parts",
    "poll_read",
    "post_reads",
    "release",
    "short_reason",
    "split_units",
    "start_reads",
]
