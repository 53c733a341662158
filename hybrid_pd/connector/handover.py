"""Handover timestamps from inside the engines, for the proxy's ``hybrid_pd.ttft.*`` spans.

The proxy knows its own instants (request in, P called, P's answer, first token out);
the engines know the rest, all as wall-clock nanoseconds:

* **P's scheduler** (:class:`HandoverSchedulerMixin`): when it allocated the request's
  blocks (prefill starts) and when the request finished (prefill and first sample
  done).  Both go back in P's answer, in ``kv_transfer_params[HANDOVER_PARAMS_KEY]``:
  the way P's engine id and block ids already travel to the proxy.
* **D's scheduler**: vLLM's arrival time of the request (``Request.arrival_time``, set
  by D's API server), when it saw the transfer finished and when the first token was
  sampled; **D's workers** (:class:`~.vllm_tracing.TracedWorkerMixin`): when each rank
  started the load, began reading (after a handshake it waited for), posted its last
  READ and NIXL completed it.  D's answer is streamed and vLLM does not stream
  ``kv_transfer_params`` back, so these ride vLLM's connector-stats channel (worker ->
  scheduler -> D's API server, :mod:`.stats`), where the proxy asks for them
  (:mod:`.handover_route`) once D answered.
"""

from __future__ import annotations

import time
from typing import Any

from hybrid_pd.settings import HANDOVER_PARAMS_KEY
from hybrid_pd.telemetry import engine as tel

# Stats keys (lists of rows, msgspec-serializable as vLLM's stats channel requires).
# D scheduler rows: [request_id, arrival_ns, noticed_ns, first_token_ns]
D_SCHED_KEY = "hy_handover_sched"
# D worker rows: [request_id, rank, load_ns, read_begin_ns, posted_ns, done_ns, cold]
D_WORKER_KEY = "hy_handover_worker"
# Pending D requests kept at most this long without a first token (aborted, failed).
PENDING_MAX_S = 600.0


def wall_ns() -> int:
    return time.time_ns()


def proxy_request_id(params: Any) -> str | None:
    """The proxy's request id from a request's trace hand-off (None without one)."""
    info = tel.from_params(params)
    return info.get("request_id") if info else None


def record(stats: Any, key: str, row: list[Any]) -> None:
    """Append ``row`` to ``stats.data[key]`` when the stats object carries our keys
    (upstream's worker, traced by the same mixin, has only vLLM's)."""
    data = getattr(stats, "data", None)
    if isinstance(data, dict) and key in data:
        data[key].append(row)


class HandoverSchedulerMixin:
    """Front of the pull scheduler: P's prefill instants into its answer, D's arrival,
    transfer-seen and first-token instants into the connector stats."""

    def _hy_handover(self) -> dict[str, Any]:
        st = self.__dict__.get("_hy_handover_state")
        if st is None:
            st = self.__dict__["_hy_handover_state"] = {"p": {}, "d": {}, "p_rows": [], "d_rows": []}
        return st

    # upstream: NixlPullConnectorScheduler.update_state_after_alloc (extended)
    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        now = wall_ns()
        params = request.kv_transfer_params or {}
        rid = proxy_request_id(params)
        st = self._hy_handover()
        if rid is not None and params.get("do_remote_decode"):
            st["p"].setdefault(request.request_id, now)
        elif rid is not None and params.get("do_remote_prefill") and num_external_tokens > 0:
            st["d"].setdefault(request.request_id, {
                "rid": rid, "req": request, "noticed": 0, "since": time.monotonic(),
                "arrival": int(float(request.arrival_time) * 1e9)})
        super().update_state_after_alloc(request, blocks, num_external_tokens)  # type: ignore[misc]

    # upstream: NixlPullConnectorScheduler.request_finished (wrapped)
    def request_finished(self, request: Any, block_ids: Any) -> Any:
        now = wall_ns()
        out = super().request_finished(request, block_ids)  # type: ignore[misc]
        st = self._hy_handover()
        entry = st["d"].pop(request.request_id, None)
        if entry is not None and entry["noticed"] and request.num_output_tokens > 0:
            # finished in the step that sampled its first token (max_tokens=1, a stop)
            st["d_rows"].append([entry["rid"], entry["arrival"], entry["noticed"], now])
        sched = st["p"].pop(request.request_id, None)
        params = out[1] if isinstance(out, tuple) and len(out) == 2 else None
        if sched is not None and isinstance(params, dict):
            params[HANDOVER_PARAMS_KEY] = {"p_sched_ns": sched, "p_done_ns": now}
            st["p_rows"].append([sched, now])
        return out

    # upstream: NixlBaseConnectorScheduler.update_connector_output (extended)
    def update_connector_output(self, connector_output: Any) -> None:
        super().update_connector_output(connector_output)  # type: ignore[misc]
        pending = self._hy_handover()["d"]
        if pending:
            now = wall_ns()
            for req_id in getattr(connector_output, "finished_recving", None) or ():
                entry = pending.get(req_id)
                if entry is not None and not entry["noticed"]:
                    entry["noticed"] = now

    def hy_handover_take(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """(D rows, P rows) since the last call.  D rows: requests whose first token was
        sampled in this step (vLLM asks the scheduler's connector stats after the step's
        tokens are in); P rows: [prefill start, prefill end] of finished prefills."""
        st = self._hy_handover()
        p_rows, st["p_rows"] = st["p_rows"], []
        d_rows, st["d_rows"] = st["d_rows"], []
        return d_rows + self._hy_first_tokens(st["d"]), p_rows

    def _hy_first_tokens(self, pending: dict[str, Any]) -> list[list[Any]]:
        rows: list[list[Any]] = []
        if not pending:
            return rows
        now, mono = wall_ns(), time.monotonic()
        for req_id, e in list(pending.items()):
            if e["noticed"] and e["req"].num_output_tokens > 0:
                rows.append([e["rid"], e["arrival"], e["noticed"], now])
                del pending[req_id]
            elif mono - e["since"] > PENDING_MAX_S:
                del pending[req_id]
        return rows


__all__ = ["D_SCHED_KEY", "D_WORKER_KEY", "HandoverSchedulerMixin", "proxy_request_id",
           "record", "wall_ns"]
