"""Runs over several processes: JAX's multi-controller model, one process per host (or per GPU).

Every process loads the same model onto one global mesh and builds the same engine core. Process
0 (the leader) runs the scheduler, the tokenizer and any server; every step it sends the step's
device calls, one message each (its StepInputs buffer and the page copies and penalty resets
before it), to the others (the followers), which make the same calls in the same order: each
compiled step spans every process's devices and runs only when all of them call it. Their
results are replicated, so the sampled tokens come back identical everywhere (the followers
check this: jaxinfer/engine/engine_core.py, EngineCore.follow).

The messages travel through the key-value store of JAX's own coordination service (the one
`jax.distributed.initialize` starts), not a channel of ours; it also reports which processes are
alive. With JAX's recoverability on, a process that dies does not take the others down: the leader
sees it gone within a second (`Channel.lost`), fails what runs and reports NOT_SERVING, and a
follower whose leader is gone exits.

    leader: Channel.send(("launch", copies, resets, inputs)) ─▶ jaxinfer/m/<batch>/<n> ─▶ followers: receive()
    followers: every ACK_EVERY messages, jaxinfer/ack/<process> = n ─▶ leader deletes batches all have read
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable

import jax

from jaxinfer.errors import ConfigError, JaxinferError

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 10  # the coordination service calls a silent process dead after this
BEAT_EVERY_S = 0.5  # how often each process says it is alive
LOST_AFTER_S = 15.0  # a process silent this long is gone (a loaded host can stall for seconds)
RECEIVE_POLL_MS = 1000  # a follower waiting for a message checks on the leader this often
ACK_EVERY = 32  # a follower reports how far it has read every this many messages
BATCH = 256  # messages per key-value directory (deleted whole once every follower read it)
EXIT_WAIT_S = 30  # how long a process waits at exit for the others to exit too
DISCONNECT_S = 1.0  # how long the leader gives a follower's disconnect, after its goodbye, to land


class ProcessLost(JaxinferError):
    """A process of a multi-process run has gone: the run cannot continue."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run (`jax.distributed.initialize`) when one is asked for: by the
    arguments, by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or on a TPU pod
    slice of several hosts (detected by JAX). Returns whether this is a multi-process run. Call it
    before anything touches a device."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    try:
        num_processes = num_processes if num_processes is not None else (
            int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
        process_id = process_id if process_id is not None else (
            int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
    except ValueError as e:
        raise ConfigError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers: {e}") from None
    asked = coordinator_address is not None or num_processes is not None or process_id is not None
    if not asked and not _on_tpu_pod():
        return False
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"the number of processes must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is outside 0..{num_processes - 1}")
    from jax._src import distributed as jax_distributed
    if jax_distributed.global_state.client is not None:  # already joined (by the caller, or a second LLM)
        return jax.process_count() > 1
    # A process that dies must not take the others with it: the leader reports it and fails what runs.
    jax.config.update("jax_enable_recoverability", True)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"could not join the multi-process run (coordinator {coordinator_address}, "
                          f"{num_processes} processes, this one {process_id}): {e}") from None
    log.info("process %d of %d; %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    atexit.register(_leave_together)  # runs before JAX's own shutdown (registered earlier)
    return jax.process_count() > 1


def _leave_together() -> None:
    """At exit, leave in order: the leader hosts the coordination service, and a follower still
    connected when it goes aborts. So every live process meets at a barrier; then each follower says
    goodbye and disconnects, and the leader waits for the goodbyes (and a moment for the disconnects
    to land) before JAX's own shutdown stops the service. (With recoverability on, JAX's shutdown
    barrier no longer orders this.)"""
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        return
    lost = _channel.lost if _channel is not None else set()
    alive = [p for p in range(jax.process_count()) if p not in lost]
    try:
        client.wait_at_barrier("jaxinfer/exit", EXIT_WAIT_S * 1000, alive)
        if jax.process_index() != 0:
            client.key_value_set(f"jaxinfer/bye/{jax.process_index()}", "1")
            jax.distributed.shutdown()
            return
        for p in alive[1:]:
            client.blocking_key_value_get(f"jaxinfer/bye/{p}", EXIT_WAIT_S * 1000)
        time.sleep(DISCONNECT_S)
    except Exception as e:  # a process went meanwhile, or never came: leave anyway
        log.warning("leaving the multi-process run without the other processes: %s", e)


def _on_tpu_pod() -> bool:
    """A TPU VM that is one host of several (JAX then finds the coordinator itself)."""
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def multi_process() -> bool:
    return jax.process_count() > 1


def is_leader() -> bool:
    return jax.process_index() == 0


def check_mesh(mesh) -> None:
    """A multi-process run's mesh must hold every process's devices: a step runs only when every
    process calls it, and a process without a device in it would have nothing to call."""
    if not multi_process():
        return
    have = {d.process_index for d in mesh.devices.flat}
    if len(have) != jax.process_count():
        raise ConfigError(f"the mesh ({dict(mesh.shape)}) holds devices of {len(have)} of the {jax.process_count()} "
                          f"processes; a multi-process run needs every process's devices: set the tensor (and data) "
                          f"parallel sizes to cover all {jax.device_count()} devices")


_channel: Channel | None = None


def channel() -> Channel:
    """This run's one channel (the message numbers are the run's)."""
    global _channel
    if _channel is None:
        _channel = Channel()
    return _channel


class Channel:
    """The leader's device calls, in order, to every follower."""

    def __init__(self, prefix: str = "jaxinfer"):
        from jax._src import distributed as jax_distributed

        self.client = jax_distributed.global_state.client
        if self.client is None:
            raise RuntimeError("jax.distributed is not initialized")
        self.prefix = prefix
        self.process = jax.process_index()
        self.processes = list(range(jax.process_count()))
        self.sent = 0  # leader: messages sent
        self.received = 0  # follower: messages received
        self.deleted_batches = 0  # leader: batches deleted
        self.lost: set[int] = set()  # processes seen gone (all the others where a step failed)
        self.failure: ProcessLost | None = None  # what broke the run
        self._on_lost: list[Callable[[set[int]], None]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._beat_and_watch, name="jaxinfer-processes", daemon=True).start()

    # ---- leader -------------------------------------------------------------------------------

    def send(self, message: tuple) -> None:
        """Queue one message for every follower (never blocks on them)."""
        self.check()
        n = self.sent
        self.client.key_value_set_bytes(self._key(n), pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        self.sent = n + 1
        if self.sent % BATCH == 0:
            self._collect()

    def _collect(self) -> None:
        """Delete the batches of messages every follower has read."""
        read = min((self._acked(p) for p in self.processes if p != self.process), default=self.sent)
        while (self.deleted_batches + 1) * BATCH <= read:
            self.client.key_value_delete(f"{self.prefix}/m/{self.deleted_batches}/")
            self.deleted_batches += 1

    def _acked(self, process: int) -> int:
        try:
            return int(self.client.key_value_try_get(f"{self.prefix}/ack/{process}"))
        except Exception:  # not yet reported
            return 0

    def watch(self, on_lost: Callable[[ProcessLost], None]) -> None:
        """Call `on_lost(error)` (once, from the thread that noticed) when the run is broken."""
        with self._lock:
            if self.failure is None:
                self._on_lost.append(on_lost)
                return
        on_lost(self.failure)

    def _beat_and_watch(self) -> None:
        """Every process says it is alive (a counter in the store) and watches the others' counters:
        the leader every follower's, a follower the leader's. A counter that stops moving for
        LOST_AFTER_S, or a store that stops answering (it lives in the leader), is a process gone.
        (The coordination service's own liveness call is a barrier, not a query: no use here.)"""
        watched = [p for p in self.processes if p != self.process] if self.process == 0 else [0]
        seen = {p: (None, time.monotonic()) for p in watched}
        beat = 0
        while self.failure is None:
            beat += 1
            gone = set()
            try:
                self.client.key_value_set(f"{self.prefix}/beat/{self.process}", str(beat), allow_overwrite=True)
                now = time.monotonic()
                for p in watched:
                    try:
                        value = self.client.key_value_try_get(f"{self.prefix}/beat/{p}")
                    except Exception:  # not yet beating (still starting): it has LOST_AFTER_S to begin
                        value = None
                    last, since = seen[p]
                    if value != last:
                        seen[p] = (value, now)
                    elif now - since > LOST_AFTER_S:
                        gone.add(p)
            except Exception as e:  # the store does not answer: the leader is gone
                log.error("the coordination service does not answer: %s", e)
                gone = {0} if self.process != 0 else set(watched)
            if gone:
                self.fail(ProcessLost(f"process(es) {sorted(gone)} of the multi-process run are gone"), gone)
                return
            time.sleep(BEAT_EVERY_S)

    def fail(self, error: ProcessLost, gone: set[int] = frozenset()) -> None:
        """The run is broken (a process is gone, or a step across the processes failed): nothing more
        is sent or run; every `watch` callback hears it once."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = error
            self.lost = set(gone) or {p for p in self.processes if p != self.process}
            callbacks, self._on_lost = self._on_lost, []
        log.error("%s", error)
        for callback in callbacks:
            try:
                callback(error)
            except Exception:
                log.exception("a lost-process callback failed")

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def wait(self, out):
        """A step's output (or a Future of it, from a launch thread) once its tokens are computed, or
        ProcessLost if a process goes meanwhile (a step that needs it may never finish)."""
        while isinstance(out, concurrent.futures.Future):
            try:
                out = out.result(timeout=BEAT_EVERY_S)
            except concurrent.futures.TimeoutError:
                self.check()
        delay = 1e-5
        while not out.packed.is_ready():
            self.check()
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)
        return out

    # ---- follower -----------------------------------------------------------------------------

    def receive(self) -> tuple:
        """The next message; ProcessLost if the leader is gone."""
        n = self.received
        data = self._get(self._key(n))
        self.received = n + 1
        if self.received % ACK_EVERY == 0:
            self.client.key_value_set(f"{self.prefix}/ack/{self.process}", str(self.received), allow_overwrite=True)
        return pickle.loads(data)

    # ---- values and the outputs of replicas the leader does not hold ------------------------------

    def publish(self, name: str, value: str) -> None:
        self.client.key_value_set(f"{self.prefix}/{name}", value, allow_overwrite=True)

    def fetch(self, name: str) -> str:
        """A value another process publishes (waits for it; ProcessLost if the run breaks meanwhile)."""
        return self._get(f"{self.prefix}/{name}", bytes_=False)

    def publish_output(self, replica: int, n: int, data: bytes) -> None:
        """Owner of a replica: step n's read-back, for the leader."""
        self.client.key_value_set_bytes(f"{self.prefix}/out/{replica}/{n // BATCH}/{n}", data)

    def fetch_output(self, replica: int, n: int) -> bytes:
        """Leader: step n's read-back from the replica's owner (read in order: a batch is deleted as the next
        one starts)."""
        if n % BATCH == 0 and n:
            self.client.key_value_delete(f"{self.prefix}/out/{replica}/{n // BATCH - 1}/")
        return self._get(f"{self.prefix}/out/{replica}/{n // BATCH}/{n}")

    def _get(self, key: str, bytes_: bool = True):
        get = self.client.blocking_key_value_get_bytes if bytes_ else self.client.blocking_key_value_get
        while True:
            self.check()
            try:
                return get(key, RECEIVE_POLL_MS)
            except Exception:  # not there yet
                pass

    def _key(self, n: int) -> str:
        return f"{self.prefix}/m/{n // BATCH}/{n}"
