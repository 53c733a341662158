"""Two read-only routes on an engine's API server, for the proxy and the other engine:

* ``GET /hybrid_pd/handover/{request_id}`` (on D): D's handover instants of one request
  (:mod:`.handover`, :data:`.stats.HANDOVERS`), for the proxy;
* ``GET /hybrid_pd/integrity/{request_id}`` (on P, ``--kv-integrity``): P's digests of
  one request's KV units (:mod:`.integrity`, :data:`.stats.INTEGRITY`; ``request_id`` is
  vLLM's id on P, the ``remote_request_id`` D reads with), for D.

Added through vLLM's own seam, ``vllm serve --middleware
hybrid_pd.connector.handover_route.HandoverRoute`` (``hybrid-pd serve`` passes it with
our connector).  Both arrive in this process with the connector stats of an engine step
(D: the step that sampled the request's first token; P: the step after its prefill); 404
until then, or when the request is unknown (another connector, or evicted).  Timings,
counts and 64-bit digests only: nothing of a prompt or an answer in clear.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from starlette.responses import JSONResponse

from hybrid_pd.settings import HANDOVER_ROUTE, INTEGRITY_ROUTE, ROUTE_HEADER


class HandoverRoute:
    """ASGI middleware: answers our two routes, passes everything else on."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.prefixes = (HANDOVER_ROUTE + "/", INTEGRITY_ROUTE + "/")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        prefix = next((p for p in self.prefixes if path.startswith(p)), None)
        if prefix is None:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "GET":
            answer = JSONResponse({"error": "use GET"}, status_code=405)
        else:
            from hybrid_pd.connector import stats  # vLLM's, loaded with the connector

            rid = unquote(path[len(prefix):])
            if prefix.startswith(HANDOVER_ROUTE):
                entry, what = stats.handover(rid), "handover record"
            else:
                entry, what = stats.integrity(rid), "integrity digests"
            answer = (JSONResponse(entry) if entry is not None else
                      JSONResponse({"error": f"no {what} for request {rid!r} (yet)"},
                                   status_code=404, headers={ROUTE_HEADER: "1"}))
        await answer(scope, receive, send)
