"""Data parallelism: independent engine replicas over the mesh's `data` axis (vLLM's
`data_parallel_size`), behind the one engine core interface.

    Engine (frontend) ──▶ DataParallelCore ── router ──▶ replica 0: EngineCore on mesh row 0 (its tensor axis)
                                                     └─▶ replica 1: EngineCore on mesh row 1 ...

Each replica is a whole EngineCore: its own scheduler, KV pool (sized from its own devices),
prefix cache and compiled step, on one row of the (data, tensor) mesh. In a multi-process run a
replica lives on one process where the tensor axis fits a process's devices (the leader schedules
it; the process holding it runs its steps and sends back their tokens), else on all of them. The weights are loaded
once over the whole mesh (replicated over `data`) and each replica takes its row's copies as they
are, without a copy (`replica_state`). A request goes to one replica for its whole life
(jaxinfer/engine/router.py picks which); a step steps every replica, each dispatching to its own
devices before the next reads back, so the replicas' devices run side by side.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from checkpoints.loader import LoadedModel
from jaxinfer.core.config import EngineConfig
from jaxinfer.engine.engine_core import CoreRequest, CoreStep, EngineCore
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.engine.router import PrefixAffinityRouter
from jaxinfer.errors import ConfigError

SWEEP_EVERY = 64  # steps between forgetting the replicas of finished requests


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One (data=1, tensor) mesh per row of the data axis."""
    rows = mesh.devices.reshape(mesh.shape["data"], -1, *mesh.devices.shape[2:])
    return [Mesh(row.reshape(1, *mesh.devices.shape[1:]), mesh.axis_names) for row in rows]


def replica_state(state, mesh: Mesh):
    """The weights of a (data, tensor) mesh as arrays of one replica's mesh: the shards already on its
    devices, not copied. Weights are never split over `data`, so each row holds a whole copy."""
    devices = set(mesh.devices.flat)

    def view(x):
        if not isinstance(x, jax.Array):
            return x
        spec = x.sharding.spec
        if any(axis == "data" or (isinstance(axis, tuple) and "data" in axis) for axis in spec):
            raise ConfigError(f"a weight split over the data axis ({spec}) cannot serve a replica of its own")
        shards = [s.data for s in x.addressable_shards if s.device in devices]
        return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(mesh, spec), shards)
    return jax.tree.map(view, state)


class DataParallelCore:
    def __init__(self, model: LoadedModel, mesh: Mesh, config: EngineConfig = EngineConfig(), draft=None):
        if draft is not None:
            raise ConfigError("a preloaded draft model does not combine with data parallelism (give its path in "
                              "speculative_config instead: each replica loads its own)")
        self.replicas = []
        for i, sub in enumerate(replica_meshes(mesh)):
            # A replica on another process's devices only (a multi-process run) gets no weights here.
            held = any(d.process_index == jax.process_index() for d in sub.devices.flat)
            state = replica_state(model.state, sub) if held else None
            self.replicas.append(EngineCore(dataclasses.replace(model, state=state), sub, config, replica=i))
        first = self.replicas[0]
        for r in self.replicas:  # one channel for all, its messages tagged by replica
            r.group = self.replicas
        self.channel, self.follower = first.channel, first.follower
        self.share, self.follow = first.share, first.follow
        # What a request is checked against: the smallest replica's pool (each sized from its own devices).
        self.config = min((r.config for r in self.replicas), key=lambda c: c.num_pages)
        self.max_model_len, self.eos_token_ids = first.max_model_len, first.eos_token_ids
        self.ban_width = first.ban_width
        self.metrics = EngineMetrics()  # the frontend's (its output processor fills it); the replicas keep their own
        self.router = PrefixAffinityRouter(len(self.replicas), self.config.page_size,
                                           max_imbalance=self.config.max_num_seqs)
        self.route: dict[str, int] = {}  # request id -> its replica, while it may run
        self._steps = 0

    @property
    def data_parallel_size(self) -> int:
        return len(self.replicas)

    # ---- requests -----------------------------------------------------------------------------

    def loads(self) -> list[int]:
        """Sequences running or waiting, per replica."""
        return [len(r.scheduler.running) + len(r.scheduler.waiting) for r in self.replicas]

    def add_request(self, r: CoreRequest) -> None:
        replica = self.router.route(r.prompt_token_ids, self.loads())
        self.route[r.request_id] = replica
        self.replicas[replica].add_request(r)

    def abort(self, request_id: str) -> None:
        replica = self.route.pop(request_id, None)
        if replica is not None:
            self.replicas[replica].abort(request_id)

    def finish_stop(self, request_id: str, index: int, stop_reason: str) -> None:
        replica = self.route.get(request_id)
        if replica is not None:
            self.replicas[replica].finish_stop(request_id, index, stop_reason)

    def set_prefix_caching(self, enabled: bool) -> None:
        for r in self.replicas:
            r.set_prefix_caching(enabled)
        self.config = self.config.replace(enable_prefix_caching=enabled)

    def has_work(self) -> bool:
        return any(r.has_work() for r in self.replicas)

    # ---- the step loop ------------------------------------------------------------------------

    def step(self) -> tuple[list[CoreStep], bool]:
        """Every replica's step: each dispatches its next step, then reads back its previous one."""
        records, dispatched = [], False
        for r in self.replicas:
            if r.has_work():
                got, sent = r.step()
                records += got
                dispatched |= sent
        self._steps += 1
        if self._steps % SWEEP_EVERY == 0:
            self.route = {rid: i for rid, i in self.route.items() if rid in self.replicas[i].requests}
        return records, dispatched

    # ---- state --------------------------------------------------------------------------------

    def gauges(self) -> dict:
        each = [r.gauges() for r in self.replicas]
        pools = [r.scheduler.pool for r in self.replicas]
        queried = sum(p.prefix_queried_tokens for p in pools)
        return {"running": sum(g["running"] for g in each), "waiting": sum(g["waiting"] for g in each),
                "kv_usage": float(np.mean([g["kv_usage"] for g in each])),
                "kv_pages": sum(g["kv_pages"] for g in each),
                "prefix_cache_hit_rate": sum(p.prefix_hit_tokens for p in pools) / queried if queried else 0.0,
                "preemptions": sum(g["preemptions"] for g in each), "spec_k": max(g["spec_k"] for g in each),
                "data_parallel_size": len(self.replicas)}

    def counters(self) -> dict:
        each = [r.counters() for r in self.replicas]
        total = {}
        for key, value in each[0].items():
            if isinstance(value, list):
                total[key] = [sum(c[key][i] for c in each) for i in range(len(value))]
            else:
                total[key] = sum(c[key] for c in each)
        total["replica_requests"] = list(self.router.routed)
        total["router_affine"], total["router_overruled"] = self.router.affine, self.router.overruled
        return total

    # ---- warm-up and shutdown -----------------------------------------------------------------

    def warmup(self, progress: bool = False, background: bool = False) -> int:
        return sum(r.warmup(progress=progress, background=background) for r in self.replicas)

    def stop_warmup(self) -> None:
        for r in self.replicas:
            r.stop_warmup()

    def wait_for_warmup(self) -> None:
        for r in self.replicas:
            r.wait_for_warmup()

    def close(self) -> None:
        for r in self.replicas:  # replica 0 first: in a multi-process run it lets the followers go
            r.close()
