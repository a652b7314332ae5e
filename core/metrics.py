"""The process's Prometheus metrics, defined in one place: HTTP requests, the drafting engine,
the adapter cache. The training runs and the gate's decisions are read from the database at
scrape time (training/metrics.py), so they are right whichever process trains.

With several API worker processes (`draftloop serve --workers N`), PROMETHEUS_MULTIPROC_DIR is
set before they start: each process writes its values to files there and a scrape of any one
of them answers the sum of all (prometheus_client's multiprocess mode)."""

import glob
import os
import re
from collections.abc import Iterable

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
disable_created_metrics()  # no `_created` series: half the samples, and multiprocess mode has none either

# HTTP (api/request_metrics.py): `route` is the route's template, never the raw path
HTTP_REQUESTS = Counter(
    "draftloop_http_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "draftloop_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response (a stream's whole length), by method and route template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

# The drafting engine (agent/engine.py)
QUEUE_DEPTH = Gauge(
    "draftloop_engine_queue_depth", "Drafts waiting for a place in the decode batch", multiprocess_mode="livesum"
)
BATCH_SIZE = Histogram(
    "draftloop_engine_batch_size", "Drafts decoded together, per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
STEP_DURATION = Histogram(
    "draftloop_engine_step_duration_seconds",
    "Duration of one decode step (one token for every draft in the batch)",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
GENERATED_TOKENS = Counter("draftloop_engine_generated_tokens", "Tokens decoded, every draft together")
TIME_TO_FIRST_TOKEN = Histogram(
    "draftloop_engine_time_to_first_token_seconds",
    "Time from a draft's submission to its first token, its wait in the queue included",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# Shadow drafting (training/shadow.py): the shadow's drafts beside the champion's, best effort
SHADOW_DRAFTS = Counter(
    "draftloop_shadow_drafts",
    "The shadow adapter's drafts beside the champion's: stored, shed (no room in the tenant's share or the "
    "queue) or failed",
    ["outcome"],
)

# The adapter cache (agent/adapters.py)
ADAPTER_LOADS = Counter("draftloop_adapter_cache_loads", "Adapters read from the registry into the cache")
ADAPTER_HITS = Counter("draftloop_adapter_cache_hits", "Adapter requests answered from the cache")
ADAPTER_EVICTIONS = Counter("draftloop_adapter_cache_evictions", "Adapters evicted from the cache, least recently used")


class _Scrape:
    """What one scrape exposes: the process's registry (or every process's) and the extra families."""

    def __init__(self, registry: CollectorRegistry, extra: Iterable[Metric]) -> None:
        self.registry, self.extra = registry, extra

    def collect(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        yield from self.extra


def exposition(extra: Iterable[Metric] = (), accept: str | None = None) -> tuple[bytes, str]:
    """Every metric, with the `extra` families read at scrape time, in the format the scraper's
    Accept header asks for (Prometheus' text format, or OpenMetrics), and its content type."""
    encoder, content_type = choose_encoder(accept or "")
    registry = REGISTRY
    if folder := os.environ.get(MULTIPROC_DIR):
        forget_dead_processes(folder)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, folder)
    return encoder(_Scrape(registry, extra)), content_type


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


def forget_dead_processes(folder: str) -> None:
    """Drop the live gauges (queue depth) of worker processes that have died, killed or not, so
    that a scrape does not add a dead worker's last value. Counters and histograms keep its counts."""
    for path in glob.glob(os.path.join(folder, "gauge_live*.db")):
        if (match := _LIVE_GAUGE_FILE.search(path)) and not _alive(int(match[1])):
            mark_process_dead(int(match[1]), folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True
