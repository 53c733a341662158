"""Read vLLM's ``vllm:nixl_*`` Prometheus metrics from an engine's ``/metrics``.

Upstream exports per-transfer histograms (transfer time, post time, bytes, descriptor
count) and a failure counter; summing a histogram's ``_sum`` over label sets and taking
the difference before/after a request gives that request's totals when requests run one
at a time (which is how the demo uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

_FIELDS = {
    "vllm:nixl_xfer_time_seconds": "xfer_seconds",
    "vllm:nixl_post_time_seconds": "post_seconds",
    "vllm:nixl_bytes_transferred": "bytes",
    "vllm:nixl_num_descriptors": "descriptors",
    "vllm:nixl_num_failed_transfers": "failed",
    # P side: leases that expired before D's notification, and notifications that
    # arrived after their lease expired (the blocks may have been reused meanwhile)
    "vllm:nixl_num_kv_expired_reqs": "kv_expired",
    "vllm:nixl_num_notifications_after_expiry": "notifs_after_expiry",
}


@dataclass(frozen=True)
class NixlMetrics:
    xfer_seconds: float = 0.0
    post_seconds: float = 0.0
    bytes: float = 0.0
    descriptors: float = 0.0
    failed: float = 0.0
    transfers: float = 0.0  # count of observed transfers (xfer-time histogram _count)
    kv_expired: float = 0.0
    notifs_after_expiry: float = 0.0

    def __sub__(self, other: NixlMetrics) -> NixlMetrics:
        return NixlMetrics(**{k: getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__})


def parse_nixl_metrics(text: str) -> NixlMetrics:
    values = dict.fromkeys(NixlMetrics.__dataclass_fields__, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            for metric, field in _FIELDS.items():
                if name in (metric + "_sum", metric + "_total", metric):
                    values[field] += sample.value
            if name == "vllm:nixl_xfer_time_seconds_count":
                values["transfers"] += sample.value
    return NixlMetrics(**values)


def scrape_nixl_metrics(client: httpx.Client, base_url: str) -> NixlMetrics:
    resp = client.get(base_url.rstrip("/") + "/metrics")
    resp.raise_for_status()
    return parse_nixl_metrics(resp.text)


KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"  # 0..1 (despite the name), per engine core
# Engine gauges that are all 0 when an engine holds no request and no KV block.
IDLE_GAUGES = (KV_CACHE_USAGE, "vllm:num_requests_running", "vllm:num_requests_waiting")


def parse_gauges(text: str, names: tuple[str, ...] = IDLE_GAUGES) -> dict[str, float]:
    """Each metric in ``names`` summed over its label sets (0.0 when absent)."""
    values = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name] += sample.value
    return values


def scrape_gauges(client: httpx.Client, base_url: str,
                  names: tuple[str, ...] = IDLE_GAUGES) -> dict[str, float]:
    resp = client.get(base_url.rstrip("/") + "/metrics")
    resp.raise_for_status()
    return parse_gauges(resp.text, names)


def parse_kv_cache_usage(text: str) -> float | None:
    """An engine's KV cache usage (0..1) from its ``/metrics`` text: the highest over the
    gauge's label sets (one per engine core under data parallelism: the fullest one is
    what refuses the next request); None when the engine does not export it."""
    values = [sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == KV_CACHE_USAGE]
    return max(values) if values else None
