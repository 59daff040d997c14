"""Prometheus metrics for the server, served over HTTP.

`ServerMetrics` owns a private CollectorRegistry (not prometheus_client's global one),
so several servers can live in one process (tests). It holds:

- per-request histograms and counters, fed by `observe_finished(output)` for each
  finished request and `count(status)` for requests that never reached the engine;
- engine gauges read at scrape time from `set_engine_source(fn)`, where fn() returns a
  dict shaped like `Engine.stats()` (plus "active_streams" from the server).

prometheus_client's metrics are thread-safe: the engine thread observes while the HTTP
thread scrapes. The engine source runs on the HTTP thread, so it must be safe to call
from there (return a snapshot, not live engine state).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from jaxinfer.engine.outputs import RequestOutput

log = logging.getLogger(__name__)

# Finish reasons of the engine, plus requests that failed in the server or were refused.
STATUSES = ("stop", "length", "abort", "error", "rejected")

# Seconds. Wide enough for a CPU run of a small model and a busy accelerator queue alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                 80.0, 160.0, 320.0, 640.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# Engine.stats() key -> (metric name, help, kind)
_ENGINE_GAUGES = (
    ("running", "jaxinfer_num_requests_running", "Requests in the engine's running batch.", "gauge"),
    ("waiting", "jaxinfer_num_requests_waiting", "Requests queued for the engine.", "gauge"),
    ("kv_usage", "jaxinfer_kv_cache_usage_ratio", "Fraction of KV-cache pages in use (0 to 1).", "gauge"),
    ("prefix_cache_hit_rate", "jaxinfer_prefix_cache_hit_rate",
     "Fraction of queried prompt tokens served by the prefix cache.", "gauge"),
    ("preemptions", "jaxinfer_preemptions", "Sequences preempted since the engine started.", "counter"),
    ("active_streams", "jaxinfer_active_streams", "Open Generate streams.", "gauge"),
    ("spec_draft_tokens", "jaxinfer_spec_decode_num_draft_tokens", "Drafted tokens verified (speculation).",
     "counter"),
    ("spec_accepted_tokens", "jaxinfer_spec_decode_num_accepted_tokens",
     "Drafted tokens the target kept (speculation).", "counter"),
    ("spec_k", "jaxinfer_spec_decode_k", "Most drafts a sequence may carry in the next step (0: none).", "gauge"),
)


class _EngineCollector(Collector):
    """Reads the engine source at scrape time; a failing source leaves the gauges out."""

    def __init__(self):
        self.source: Callable[[], dict] | None = None

    def collect(self):
        source = self.source
        if source is None:
            return
        try:
            stats = source()
        except Exception:  # a scrape must not fail because the engine is busy or gone
            log.warning("engine stats source failed; engine gauges left out of this scrape", exc_info=True)
            return
        for key, name, doc, kind in _ENGINE_GAUGES:
            value = stats.get(key)
            if value is None:
                continue
            value = float(value)
            if math.isnan(value):
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=value)
        # vLLM's per-position acceptance: position i counts the drafts kept at place i of their sequence's run.
        per_position = stats.get("spec_accepted_per_position")
        if per_position:
            family = CounterMetricFamily("jaxinfer_spec_decode_num_accepted_tokens_per_pos",
                                         "Drafted tokens kept, by their place in the drafted run.", labels=["position"])
            for i, count in enumerate(per_position):
                family.add_metric([str(i)], float(count))
            yield family

    def describe(self):
        return []  # names depend on what the source returns; collect() at registration is not wanted


class ServerMetrics:
    """The server's Prometheus metrics in a registry of their own (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = prometheus_client.Histogram(
            "jaxinfer_time_to_first_token_seconds", "Arrival to the first generated token.",
            buckets=TTFT_BUCKETS, registry=r)
        self.tpot = prometheus_client.Histogram(
            "jaxinfer_time_per_output_token_seconds", "Mean time between output tokens after the first, "
            "per request.", buckets=TPOT_BUCKETS, registry=r)
        self.queue_time = prometheus_client.Histogram(
            "jaxinfer_queue_time_seconds", "Arrival to the first scheduled engine step.",
            buckets=QUEUE_BUCKETS, registry=r)
        self.e2e = prometheus_client.Histogram(
            "jaxinfer_e2e_request_latency_seconds", "Arrival to finish.", buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = prometheus_client.Counter(
            "jaxinfer_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = prometheus_client.Counter(
            "jaxinfer_generation_tokens", "Tokens generated by finished requests, over all n samples.",
            registry=r)
        self.requests = prometheus_client.Counter(
            "jaxinfer_requests", "Requests by outcome: stop, length, abort (engine finish reasons), "
            "error (failed in the server), rejected (refused before the engine).",
            ["status"], registry=r)
        for status in STATUSES:  # every series exists from the start, at 0
            self.requests.labels(status=status)
        self._engine = _EngineCollector()
        r.register(self._engine)
        self._http = None
        self.http_port: int | None = None
        self._http_lock = threading.Lock()

    def set_engine_source(self, fn: Callable[[], dict] | None) -> None:
        """fn() -> dict like Engine.stats() (keys running, waiting, kv_usage,
        prefix_cache_hit_rate, preemptions, and active_streams); called on each scrape,
        on the HTTP thread. Missing keys and NaN values are left out. None: no engine gauges."""
        self._engine.source = fn

    def observe_finished(self, output: RequestOutput) -> None:
        """Record one finished request: latencies, tokens, and its status (the first
        sample's finish reason; "abort" when it has none)."""
        m = output.metrics
        reason = output.outputs[0].finish_reason if output.outputs else None
        self.count(reason if reason in STATUSES else "abort")
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(sum(len(o.token_ids) for o in output.outputs))
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        if output.time_per_output_token is not None:
            self.tpot.observe(output.time_per_output_token)
        if m.queue_time is not None:
            self.queue_time.observe(m.queue_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)

    def count(self, status: str) -> None:
        """Count one request by outcome, for those that observe_finished does not see
        ("rejected", "error")."""
        if status not in STATUSES:
            raise ValueError(f"unknown request status {status!r}; expected one of {STATUSES}")
        self.requests.labels(status=status).inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format, as a scrape would get them."""
        return prometheus_client.generate_latest(self.registry)

    def start_http(self, port: int, host: str = "127.0.0.1"):
        """Serve /metrics on host:port in a daemon thread (port 0: a free port).

        Returns (server, thread); the bound port is `server.server_port`, also kept as
        `self.http_port`. `stop_http()` shuts it down.
        """
        with self._http_lock:
            if self._http is not None:
                raise RuntimeError("the metrics HTTP server is already running")
            server, thread = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
            self._http = (server, thread)
            self.http_port = server.server_port
            log.info("metrics on http://%s:%d/metrics", host, self.http_port)
            return server, thread

    def stop_http(self) -> None:
        with self._http_lock:
            if self._http is None:
                return
            server, thread = self._http
            self._http = None
            self.http_port = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
