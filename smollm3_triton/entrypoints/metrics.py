"""Prometheus metrics of one server (its own registry, so several apps can live in one
process): request counters by endpoint and status, token counters, latency histograms, and
the engine's gauges read at scrape time."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily

from ..engine.outputs import EngineStats

disable_created_metrics()                 # the *_created series say nothing a scrape needs


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None]):
        """stats: the engine's stats now, or None while the model loads."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("smollm3:requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("smollm3:prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("smollm3:generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("smollm3:time_to_first_token_seconds", "request arrival to its first token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.itl = Histogram("smollm3:inter_token_latency_seconds", "time between a request's tokens",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        r.register(_EngineCollector(stats))


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        if s is None:
            return
        for name, doc, value in (
                ("num_requests_running", "sequences in the running batch", s.running),
                ("num_requests_waiting", "sequences waiting for admission", s.waiting),
                ("kv_cache_usage_perc", "fraction of KV-cache blocks in use", s.kv_usage),
                ("kv_cache_blocks_total", "KV-cache blocks in the pool", s.num_blocks),
                ("kv_cache_blocks_free", "KV-cache blocks free (cached prefix blocks count as free)",
                 s.free_blocks),
                ("prefix_cache_queries", "prompt tokens looked up in the prefix cache", s.prefix_queries),
                ("prefix_cache_hits", "prompt tokens served from the prefix cache", s.prefix_hits),
                ("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries",
                 s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0),
                ("num_preemptions", "sequences preempted (recomputed later)", s.preemptions)):
            yield GaugeMetricFamily(f"smollm3:{name}", doc, value=value)
