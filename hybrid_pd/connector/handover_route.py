"""``GET /hybrid_pd/handover/{request_id}`` on an engine's API server: D's handover
instants of one request (:mod:`.handover`, :data:`.stats.HANDOVERS`), for the proxy.

Added through vLLM's own seam, ``vllm serve --middleware
hybrid_pd.connector.handover_route.HandoverRoute`` (``hybrid-pd serve`` passes it with
our connector).  The instants arrive in this process with the connector stats of the
engine step that sampled the request's first token; 404 until then, or when the
request is unknown (another connector, or evicted after :data:`.stats.HANDOVERS_MAX`).
Timings and counts only: nothing of a prompt or an answer.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from starlette.responses import JSONResponse

from hybrid_pd.settings import HANDOVER_ROUTE


class HandoverRoute:
    """ASGI middleware: answers the handover route, passes everything else on."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.prefix = HANDOVER_ROUTE + "/"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        if not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "GET":
            answer = JSONResponse({"error": "use GET"}, status_code=405)
        else:
            from hybrid_pd.connector import stats  # vLLM's, loaded with the connector

            rid = unquote(path[len(self.prefix):])
            entry = stats.handover(rid)
            answer = (JSONResponse(entry) if entry is not None else
                      JSONResponse({"error": f"no handover record for request {rid!r} (yet)"},
                                   status_code=404))
        await answer(scope, receive, send)
