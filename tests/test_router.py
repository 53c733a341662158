"""The router's pure logic (hybrid_pd.serve.router): policies, KV-aware choice, taking a
backend out and bringing it back, the retry target, and which failures are the engine's.
No HTTP, no engines: plain Backend records."""

from __future__ import annotations

from collections import Counter

import pytest

from hybrid_pd.serve.router import (
    CAUSE_ANSWER,
    CAUSE_BUSY,
    CAUSE_PROXY,
    CAUSE_TIMEOUT,
    CAUSE_UNREACHABLE,
    KV_USAGE_STEP,
    Backend,
    Pool,
    is_backend_failure,
    pick,
)

URLS = ("http://a:1", "http://b:1", "http://c:1")


def names(backends) -> list[str]:
    return [b.url.split("//")[1][0] for b in backends]


def choose_n(pool: Pool, n: int) -> list[str]:
    return names(pool.choose() for _ in range(n))


# -- policies ------------------------------------------------------------------------------


def test_least_outstanding_takes_the_least_loaded():
    pool = Pool("decode", URLS)
    a, b, c = pool.backends
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert pool.choose() is b
    b.in_flight = 5  # now c (2) has the fewest
    assert pool.choose() is c


def test_least_outstanding_ties_go_round_the_pool():
    # An idle pool (every in-flight count 0) is used evenly, in order.
    assert choose_n(Pool("prefill", URLS), 6) == ["a", "b", "c", "a", "b", "c"]


def test_least_outstanding_with_calls_held_spreads_them():
    # Each chosen backend keeps its call: 6 calls end up 2 per backend.
    pool = Pool("prefill", URLS)
    for _ in range(6):
        pool.choose().in_flight += 1
    assert [b.in_flight for b in pool.backends] == [2, 2, 2]


def test_round_robin_ignores_load():
    pool = Pool("prefill", URLS, policy="round-robin")
    pool.backends[0].in_flight = 100
    assert choose_n(pool, 4) == ["a", "b", "c", "a"]


def test_round_robin_skips_backends_that_are_out():
    pool = Pool("prefill", URLS, policy="round-robin")
    Pool.take_out(pool.backends[1], "refused", now=1.0)
    assert choose_n(pool, 4) == ["a", "c", "a", "c"]


@pytest.mark.parametrize("policy", ["least-outstanding", "round-robin"])
def test_a_full_backend_is_chosen_only_when_all_are_full(policy):
    pool = Pool("decode", URLS[:2], policy=policy, capacity=2)
    a, b = pool.backends
    a.in_flight = 2  # full
    assert choose_n(pool, 3) == ["b", "b", "b"]
    b.in_flight = 2  # both full: one is chosen all the same (its own 503 stands)
    assert pool.choose() in (a, b)


def test_unknown_policy_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="unknown routing policy 'random'.*least-outstanding, round-robin"):
        Pool("prefill", URLS, policy="random")
    with pytest.raises(ValueError, match="at least one backend"):
        Pool("prefill", ())


# -- KV-aware choice (D) ------------------------------------------------------------------------


def kv_pool(*usages: float | None, in_flight: tuple[int, ...] = (0, 0, 0)) -> Pool:
    pool = Pool("decode", URLS[:len(usages)], kv_aware=True)
    for b, usage, n in zip(pool.backends, usages, in_flight, strict=False):
        b.kv_usage, b.in_flight = usage, n
    return pool


def test_kv_aware_prefers_lower_kv_usage_over_fewer_in_flight():
    # a: 80% full, idle; b: 10% full, 4 in flight -> b
    pool = kv_pool(0.8, 0.1, in_flight=(0, 4))
    assert names([pool.choose()]) == ["b"]


def test_kv_aware_close_usages_are_a_tie_decided_by_in_flight():
    # 0.31 and 0.33 lie in the same KV_USAGE_STEP (0.05) bucket: 0.31/0.05 = 6.2, 0.33/0.05 = 6.6
    assert KV_USAGE_STEP == 0.05
    pool = kv_pool(0.31, 0.33, in_flight=(3, 1))
    assert names([pool.choose()]) == ["b"]


def test_kv_aware_unknown_usage_falls_back_to_least_outstanding():
    # b's usage could not be read: the whole choice is least-outstanding (a has fewer)
    pool = kv_pool(0.9, None, in_flight=(1, 2))
    assert names([pool.choose()]) == ["a"]


def test_kv_aware_only_where_asked():
    # the same state without kv_aware: least-outstanding picks a (0 in flight)
    candidates = [Backend("http://a:1", "decode", kv_usage=0.9),
                  Backend("http://b:1", "decode", kv_usage=0.0, in_flight=1)]
    assert pick(candidates, "least-outstanding").url == "http://a:1"
    assert pick(candidates, "least-outstanding", kv_aware=True).url == "http://b:1"


# -- out and back in -------------------------------------------------------------------------


def test_a_backend_taken_out_gets_no_calls_until_brought_back():
    pool = Pool("prefill", URLS)
    a, b, c = pool.backends
    assert Pool.take_out(b, "HTTP 500", now=10.0) is True
    assert Pool.take_out(b, "HTTP 502", now=11.0) is False  # already out: out_since stays
    assert (b.healthy, b.out_since, b.last_error) == (False, 10.0, "HTTP 502")
    assert set(choose_n(pool, 6)) == {"a", "c"}
    assert Pool.bring_back(b) is True and Pool.bring_back(b) is False
    assert (b.healthy, b.out_since, b.last_error) == (True, None, None)
    assert Counter(choose_n(pool, 6)) == {"a": 2, "b": 2, "c": 2}


def test_when_all_are_out_the_one_out_longest_is_tried():
    # A pool of one behaves as a plain engine: its calls go on, and fail on their own.
    pool = Pool("decode", URLS)
    for b, t in zip(pool.backends, (5.0, 2.0, 9.0), strict=True):
        Pool.take_out(b, "refused", now=t)
    assert names([pool.choose()]) == ["b"]
    assert pool.choose(healthy_only=True) is None
    single = Pool("decode", URLS[:1])
    Pool.take_out(single.backends[0], "refused", now=1.0)
    assert single.choose() is single.backends[0]


def test_retry_target_is_another_healthy_backend_or_none():
    pool = Pool("prefill", URLS[:2])
    a, b = pool.backends
    Pool.take_out(a, "refused", now=1.0)
    assert pool.retry_target(a) is b
    Pool.take_out(b, "refused", now=2.0)
    assert pool.retry_target(a) is None  # the other one is out too: no retry
    single = Pool("prefill", URLS[:1])
    assert single.retry_target(single.backends[0]) is None  # a pool of one: nowhere else


# -- whose failure -------------------------------------------------------------------------------


@pytest.mark.parametrize(("cause", "status", "engine_failed"), [
    (CAUSE_UNREACHABLE, 502, True),   # refused / reset before any answer
    (CAUSE_TIMEOUT, 504, True),       # no answer in time
    (CAUSE_ANSWER, 500, True),        # the engine's own 5xx
    (CAUSE_ANSWER, 503, True),
    (CAUSE_ANSWER, 400, False),       # about the request: the engine is fine
    (CAUSE_ANSWER, 404, False),
    (CAUSE_BUSY, 503, False),         # our own call limit, not the engine
    (CAUSE_PROXY, 502, False),        # e.g. P's answer without kv_transfer_params
])
def test_only_the_engines_own_failures_take_it_out(cause, status, engine_failed):
    assert is_backend_failure(cause, status) is engine_failed


def test_backend_host_is_the_urls_host():
    assert Backend("http://10.0.0.5:8100", "prefill").host == "10.0.0.5"
    assert Backend("http://[::1]:8100", "prefill").host == "::1"
