"""Multi-process runs (jaxinfer/distributed.py) on the loopback: two processes of two simulated CPU
devices each, joined by jax.distributed with CPU (gloo) collectives, serve as one process of four
devices does; a follower that dies makes the leader answer UNAVAILABLE and report NOT_SERVING."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from jaxinfer import LLM
from serving.client import Client
from tests.multi_process_llm import ENGINE, PROMPTS, SAMPLING, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 600  # a cold XLA cache on a busy 2-core machine takes minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int = 2) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def start(args: list[str], n: int = 2, devices: int = 2) -> list[subprocess.Popen]:
    """n processes of `python -m <args>` (each with `devices` CPU devices), the run's flags filled in."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(n):
        procs.append(subprocess.Popen([sys.executable, "-m", *[a.format(coordinator=coordinator, i=i, n=n)
                                                               for a in args]], cwd=ROOT, env=env(devices),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def diagnosis(err: str) -> str:
    """A failed process's own words: its error lines first, then the end of its stderr."""
    lines = [line for line in err.splitlines() if any(w in line for w in ("rror", "gone", "F1", "E1", "WARNING"))]
    return "\n".join(lines[-30:]) + "\n---\n" + err[-2000:]


def stop(procs) -> None:
    for p in procs:
        p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def model_dir(data_dir):
    return data_dir / "hf_tiny" / "llama_gqa"


def one_process(model_dir, tp: int, dp: int = 1):
    """The same calls in this one process, over tp * dp of its devices."""
    with LLM(str(model_dir), tensor_parallel_size=tp, data_parallel_size=dp, **ENGINE) as llm:
        return run(llm)


@pytest.fixture(scope="module")
def expected(model_dir):
    return one_process(model_dir, 4)


@pytest.mark.parametrize("tp,dp,devices", [(4, 1, 2), (2, 2, 2), (2, 3, 3)])
def test_llm_over_two_processes_gives_the_one_process_outputs(model_dir, expected, tp, dp, devices):
    # Greedy, seeded, top-k/top-p and n=2 requests, then a stream, over
    # - tensor parallel over all four devices of both processes;
    # - two replicas of two devices, one on each process: the leader schedules both, the follower runs the
    #   second's steps and sends back its tokens;
    # - three replicas of two devices, each over both processes (three devices a process: the tensor axis
    #   does not fit in one).
    # Every process returns the leader's outputs, and a follower that runs a step with the leader checked that
    # it sampled the very tokens the leader did (EngineCore.follow raises otherwise).
    if dp > 1:
        expected = one_process(model_dir, tp, dp)
    procs = start(["tests.multi_process_llm", "{coordinator}", "{n}", "{i}", str(model_dir), str(tp), str(dp)],
                  devices=devices)
    try:
        results = []
        for p in procs:
            out, err = p.communicate(timeout=DEADLINE_S)
            assert p.returncode == 0, diagnosis(err)
            results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    finally:
        stop(procs)
    assert [r["leader"] for r in results] == [True, False]
    for r in results:
        assert r["tokens"] == expected


def wait_ready(proc, port: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    with Client("127.0.0.1", port, timeout=5) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError("the server never became SERVING")


def tokens(client: Client, ids, **sampling) -> list[int]:
    out = []
    for response in client.generate(ids, **sampling):
        for o in response.outputs:
            out += list(o.token_ids)
    return out


def test_serve_over_two_processes_then_a_follower_dies(model_dir, expected):
    port = free_port()
    flags = ["jaxinfer.cli", "serve", "--model", str(model_dir), "--tp", "4", "--port", str(port),
             "--num-pages", "64", "--page-size", "4", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
             "--coordinator-address", "{coordinator}", "--num-processes", "{n}", "--process-id", "{i}"]
    procs = start(flags)
    leader, follower = procs
    try:
        wait_ready(leader, port)
        with Client("127.0.0.1", port, timeout=120) as client:
            # The same requests as the offline run, through gRPC: the same tokens.
            for ids, sampling, want in zip(PROMPTS[:3], SAMPLING[:3], expected):
                assert tokens(client, ids, **sampling) == want

            # A long stream; once its first tokens are out, the follower freezes, then dies.
            stream = client.generate([1, 2, 3], max_tokens=240, temperature=0, ignore_eos=True)
            first = next(stream)
            assert first.outputs and not first.finished
            follower.send_signal(signal.SIGSTOP)
            killed = time.monotonic()
            time.sleep(1)
            follower.kill()
            with pytest.raises(grpc.RpcError) as failed:
                for response in stream:
                    assert not response.finished, "the stream finished although a process died under it"
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
            assert time.monotonic() - killed <= 30
            deadline = time.monotonic() + 30
            while client.health() != "NOT_SERVING":
                assert time.monotonic() < deadline, "health still SERVING 30 s after a process died"
                time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as refused:
                tokens(client, [1, 2], max_tokens=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        leader.send_signal(signal.SIGTERM)
        leader.communicate(timeout=60)  # exits: nothing hangs on the dead process
    finally:
        stop(procs)


CHANNEL_SCRIPT = """
import pickle, sys
from jax._src import distributed as jd
from jaxinfer import distributed
distributed.initialize("127.0.0.1:%d", 1, 0)
channel = distributed.Channel("t")
n = 2 * distributed.BATCH + 5
for i in range(n):
    channel.send(("launch", i))
client = jd.global_state.client
def present(i):
    try:
        return pickle.loads(client.key_value_try_get_bytes(channel._key(i)))[1] == i
    except Exception:
        return False
print("PRESENT", [present(i) for i in (0, distributed.BATCH - 1, distributed.BATCH, 2 * distributed.BATCH, n - 1)])
"""


def test_the_channel_deletes_the_batches_every_follower_has_read():
    # One process (no follower to wait for): every whole batch of messages is deleted, the last partial one kept.
    out = subprocess.run([sys.executable, "-c", CHANNEL_SCRIPT % free_port()], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PRESENT [False, False, False, True, True]" in out.stdout, out.stdout
