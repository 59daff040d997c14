"""Start-up to ready, as a user meets it: each command in a fresh process, run once to fill
the caches (lowered steps, XLA executables), then timed `--runs` times.

    python scripts/bench_startup.py            # default model: LLM(), and `jaxinfer serve` to SERVING
    python scripts/bench_startup.py --runs 5

`LLM()` is timed from process start to its return (imports included; the interpreter's exit
after it is not). `serve` is timed from
process start to the gRPC health check answering SERVING. Prints a table and each run's
INFO start-up lines (where the time went: load, engine, warm-up).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLM_SNIPPET = ("import logging, time; t = time.monotonic(); "
               "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
               "from jaxinfer import LLM; LLM(progress=False); "
               "print(f'READY {time.monotonic() - t:.2f}', flush=True)")


def time_llm() -> tuple[float, list[str]]:
    """Process start to LLM() returning (the snippet prints READY then); the process then exits
    on its own, letting the background warm-up finish the shape it is on."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", LLM_SNIPPET], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    took = None
    for line in proc.stdout:
        if line.startswith("READY"):
            took = time.monotonic() - started
    _, err = proc.communicate(timeout=600)
    if proc.returncode or took is None:
        raise RuntimeError(f"LLM() failed ({proc.returncode}): {err[-2000:]}")
    return took, [line for line in err.splitlines() if "start-up" in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_serve() -> tuple[float, list[str]]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "jaxinfer.cli", "serve", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Retry the connection every 50 ms: gRPC's default backoff (1 s and growing) would count
        # its own waiting as start-up time.
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 50)])
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        took = time.monotonic() - started
        channel.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if "start-up" in line or "warm-up" in line]
    return took, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=["llm", "serve"])
    args = p.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(f"# python scripts/bench_startup.py {' '.join(sys.argv[1:])}".rstrip())
    rows = []
    for name, fn in (("LLM()", time_llm), ("jaxinfer serve → SERVING", time_serve)):
        if args.only and not name.lower().startswith(args.only):
            continue
        first, _ = fn()  # fills the caches
        times, lines = [], []
        for _ in range(args.runs):
            took, lines = fn()
            times.append(took)
        print(f"\n{name}, last run's start-up log:")
        for line in lines:
            print(f"    {line[:300]}")
        rows.append((name, first, times))
    print("\n| command | first start (s) | warm starts (s) | median | goal (issue 11) |")
    print("|---|---:|---|---:|---:|")
    for name, first, times in rows:
        print(f"| {name} | {first:.1f} | {', '.join(f'{t:.1f}' for t in times)} | "
              f"{statistics.median(times):.1f} | ≤ 10 |")


if __name__ == "__main__":
    main()
