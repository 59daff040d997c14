"""Engine metrics, kept for export (Prometheus in the server, tables in benchmarks).

Counters and raw per-request latencies; `snapshot()` gives a plain dict with
percentiles. Gauges (KV utilization, running/waiting) are read from the engine
when asked, not stored.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

# Latency samples kept per kind: enough for stable p99s, bounded for million-prompt runs.
MAX_SAMPLES = 100_000


@dataclasses.dataclass
class EngineMetrics:
    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of finished requests
    generation_tokens: int = 0  # tokens sampled and kept
    computed_tokens: int = 0  # tokens run through the model (recompute and padding excluded)
    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by finish reason
    rejected: int = 0  # requests refused at admission (bad input)
    ttft: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))
    tpot: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))
    queue_time: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))
    e2e: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))

    def observe_request(self, output) -> None:
        """Record a finished RequestOutput (jaxinfer/engine/outputs.py)."""
        m = output.metrics
        self.requests[output.outputs[0].finish_reason if output.outputs else "abort"] += 1
        self.prompt_tokens += len(output.prompt_token_ids)
        if m.time_to_first_token is not None:
            self.ttft.append(m.time_to_first_token)
        if output.time_per_output_token is not None:
            self.tpot.append(output.time_per_output_token)
        if m.queue_time is not None:
            self.queue_time.append(m.queue_time)
        if m.finished_time is not None:
            self.e2e.append(m.finished_time - m.arrival_time)


def percentiles(samples, qs=(50, 90, 99)) -> dict[str, float]:
    if not samples:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in qs}}
    a = np.asarray(samples, np.float64)
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in qs}}
