"""Prometheus metrics of each process (router, prefill worker, decode worker), via prometheus-client.

Every process owns one `CollectorRegistry` (not the library's global one: tests run several
servers in one process) and serves it over HTTP at /metrics when given a port:

    router          RouterMetrics   TTFT, ITL, end-to-end and queue-time histograms, running and
                                    waiting requests, finish reasons, rejections by gRPC code
    prefill worker  WorkerMetrics   prefill queue time, queued requests, KV bytes/time/failures sent
    decode worker   WorkerMetrics   KV pages used and total, running and waiting requests, KV
                                    bytes/time/failures received
    openai-server   HTTPMetrics     HTTP requests by handler and status, in flight, durations
                                    (served at its own /metrics, as vLLM's API server does)

Names follow vLLM's where one exists (`vllm:time_to_first_token_seconds` becomes
`splitserve_time_to_first_token_seconds`), so existing dashboards need only the prefix changed.
Gauges that mirror engine state are read at scrape time from a callback, never pushed.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "splitserve"
# Latency buckets in seconds, as vLLM uses for TTFT / ITL / end to end (ms up to minutes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _name(name: str) -> str:
    return f"{PREFIX}_{name}"


class _Callback(Collector):
    """Metrics whose values come from a callback at scrape time: {name: (help, value)}; gauges, or
    counters (`family=CounterMetricFamily`, names without _total) for totals kept elsewhere."""

    def __init__(self, read: Callable[[], dict[str, tuple[str, float]]], family=GaugeMetricFamily):
        self._read = read
        self._family = family

    def collect(self):
        for name, (doc, value) in self._read().items():
            yield self._family(_name(name), doc, value=value)


class HTTPMetrics:
    """An HTTP server's requests. The names are those prometheus-fastapi-instrumentator gives vLLM's API
    server (`http_requests_total{handler, status}`, `http_request_duration_seconds`), prefixed; the
    labels differ: exact status codes, no method, "other" for a path or method no route takes."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(_name("http_requests"), "HTTP requests answered, by handler (path) and status.",
                                ["handler", "status"], registry=r)
        self.duration = Histogram(_name("http_request_duration_seconds"),
                                  "Time from an HTTP request's arrival to the end of its answer (a stream's end).",
                                  ["handler"], buckets=REQUEST_BUCKETS, registry=r)
        self.in_flight = Gauge(_name("http_requests_in_flight"), "HTTP requests being answered.", registry=r)


class RouterMetrics:
    """What a client sees: one `RequestTimer` per Generate call records its latencies."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(_name("time_to_first_token_seconds"), "Time from request arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(_name("inter_token_latency_seconds"), "Time between consecutive output tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(_name("e2e_request_latency_seconds"), "Time from request arrival to its last token.",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram(_name("request_queue_time_seconds"),
                                    "Time from arrival until the prefill was sent (includes waiting for KV pages).",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.finished = Counter(_name("request_success_total"), "Requests finished, by finish reason.",
                                ["finished_reason"], registry=r)
        self.rejected = Counter(_name("request_rejected_total"),
                                "Requests that ended with an error status, by gRPC status code.", ["code"], registry=r)
        self.prompt_tokens = Counter(_name("prompt_tokens_total"), "Prompt tokens sent to prefill.", registry=r)
        self.generation_tokens = Counter(_name("generation_tokens_total"), "Output tokens sent.", registry=r)
        self.running = Gauge(_name("num_requests_running"), "Requests between their first and last token.",
                             registry=r)
        self.waiting = Gauge(_name("num_requests_waiting"), "Requests admitted that have no first token yet.",
                             registry=r)
        self.waiting_for_pages = Gauge(_name("num_requests_waiting_for_kv_pages"),
                                       "Requests in line for decode KV pages (every decode worker was full).",
                                       registry=r)

    def follow_page_line(self, count: Callable[[], int]) -> None:
        """`waiting_for_pages` reads `count()` (runtime/page_reservations.py) at each scrape."""
        self.waiting_for_pages.set_function(count)

    def start_request(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Turns one request's events into observations; `close()` exactly once, however it ended."""

    def __init__(self, metrics: RouterMetrics):
        self.m = metrics
        self.arrived = time.perf_counter()
        self.last_token: dict[int, float] = {}  # per sequence (n > 1 interleaves them on one call)
        self.first_token_seen = False
        self.closed = False
        metrics.waiting.inc()

    def prefill_sent(self, prompt_tokens: int) -> None:
        self.m.queue_time.observe(time.perf_counter() - self.arrived)
        self.m.prompt_tokens.inc(prompt_tokens)

    def tokens(self, count: int, sequence: int = 0) -> None:
        now = time.perf_counter()
        if not self.first_token_seen:
            self.first_token_seen = True
            self.m.ttft.observe(now - self.arrived)
            self.m.waiting.dec()
            self.m.running.inc()
        elif sequence in self.last_token:  # a message of several tokens (merged by the router): its gap, spread
            for _ in range(count):
                self.m.itl.observe((now - self.last_token[sequence]) / count)
        self.last_token[sequence] = now  # (a later sequence's first token has no gap to measure)
        self.m.generation_tokens.inc(count)

    def close(self, *, finish_reason: str = "", error_code: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        (self.m.running if self.first_token_seen else self.m.waiting).dec()
        if error_code:
            self.m.rejected.labels(code=error_code).inc()
        else:
            self.m.finished.labels(finished_reason=finish_reason or "unknown").inc()
            self.m.e2e.observe(time.perf_counter() - self.arrived)


class WorkerMetrics:
    """A worker's engine and KV-transfer figures. `watch_*` attach the scrape-time gauges."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.prefill_queue_time = Histogram(_name("prefill_queue_time_seconds"),
                                            "Time a prompt waited in the prefill queue before its batch ran.",
                                            buckets=REQUEST_BUCKETS, registry=r)
        self.kv_bytes = Counter(_name("kv_transfer_bytes_total"), "KV payload bytes moved, by direction.",
                                ["direction"], registry=r)
        self.kv_seconds = Histogram(_name("kv_transfer_seconds"), "Duration of one request's KV transfer.",
                                    ["direction"], buckets=TRANSFER_BUCKETS, registry=r)
        self.kv_failures = Counter(_name("kv_transfer_failures_total"), "KV transfers that failed, by direction.",
                                   ["direction"], registry=r)
        self.kv_transports = Counter(_name("kv_transfers_total"),
                                     "KV transfers ended (succeeded or failed), by direction and transport "
                                     "(socket: the KV data socket; grpc: Decode/TransferKV).",
                                     ["direction", "transport"], registry=r)

    def watch_decode(self, stats: Callable[[], dict]) -> None:
        """`stats()`: DecodeEngine.stats (free_pages, total_pages, running, waiting)."""
        def read():
            s = stats()
            used = s["total_pages"] - s["free_pages"]
            return {
                "kv_pages_used": ("KV cache pages in use (reserved or holding KV).", used),
                "kv_pages_total": ("KV cache pages in the pool.", s["total_pages"]),
                "kv_cache_usage_perc": ("Fraction of KV cache pages in use (0-1).",
                                        used / s["total_pages"] if s["total_pages"] else 0.0),
                "decode_requests_running": ("Requests in the decode batch.", s["running"]),
                "decode_requests_waiting": ("Requests holding pages that are not decoding yet.", s["waiting"]),
            }
        self.registry.register(_Callback(read))

    def watch_prefill(self, queued: Callable[[], int]) -> None:
        self.registry.register(_Callback(lambda: {
            "prefill_requests_queued": ("Prompts submitted and not yet prefilled.", queued())}))

    def watch_prefix_cache(self, cache) -> None:
        """`cache`: a PrefixCache (runtime/prefix_cache.py). Tokens, as vLLM's prefix_cache_queries/hits count them."""
        self.registry.register(_Callback(family=CounterMetricFamily, read=lambda: {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", cache.queried_tokens),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache (not computed again).", cache.hit_tokens)}))
        self.registry.register(_Callback(lambda: {
            "prefix_cache_blocks": ("Prompt blocks held by the prefix cache.", len(cache.index)),
            "prefix_cache_blocks_total": ("Prompt blocks the prefix cache can hold.", cache.index.capacity)}))

    def kv_transfer(self, direction: str, transport: str = "grpc") -> KVTransferTimer:
        return KVTransferTimer(self, direction, transport)


@dataclasses.dataclass
class KVTransferTimer:
    """Context manager around one transfer; set `.bytes` before leaving. An exception, or `.failed`
    set to True (a refusal handled in place), counts a failure instead."""

    metrics: WorkerMetrics
    direction: str  # "sent" | "received"
    transport: str = "grpc"  # "grpc" | "socket"
    bytes: int = 0
    failed: bool = False

    def __enter__(self) -> KVTransferTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.metrics.kv_transports.labels(direction=self.direction, transport=self.transport).inc()
        if exc_type is not None or self.failed:
            self.metrics.kv_failures.labels(direction=self.direction).inc()
            return
        self.metrics.kv_seconds.labels(direction=self.direction).observe(time.perf_counter() - self._start)
        self.metrics.kv_bytes.labels(direction=self.direction).inc(self.bytes)


class MetricsEndpoint:
    """The HTTP(S) server of one registry, running in a daemon thread until `close()`."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, tls=None):
        self._server = serve_metrics(registry, host, port, tls)
        self.host, self.port = host, self._server.server_port

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(getattr(self._server, "socket", None), ssl.SSLSocket) else "http"
        return f"{scheme}://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int, tls=None):
    """Serves `registry` at http(s)://host:port/metrics in a daemon thread; returns the server.

    `tls`: the process's TLSConfig; with a certificate the endpoint is HTTPS with it. Scrapers
    are not asked for client certificates (metrics carry no prompts, tokens or secrets).
    """
    kwargs = {}
    if tls is not None and tls.cert:
        kwargs = dict(certfile=tls.cert, keyfile=tls.key)
    server, _ = start_http_server(port, addr=host, registry=registry, **kwargs)
    return server
