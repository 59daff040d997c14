"""Does donating a buffer that a queued computation is still writing make the host wait?
(GPU diagnosis for issue 11: the decode step donates the KV pages the step before writes,
and its call returns only when the device is nearly done.)

A slow computation (a chain of matmuls, about `--ms` long) writes a buffer; right after
queueing it, the host calls a cheap jitted function on that buffer, donating it or not, and
times how long the call takes to return. Also timed: the same with a `lax.cond` on a value
computed on the device, donating nothing.

    python scripts/probe_donation.py            # on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=4096, help="matmul size")
    p.add_argument("--chain", type=int, default=40, help="matmuls in the slow computation")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    n = args.size
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    pages = jnp.zeros((64, 1024, 128), jnp.bfloat16)

    @jax.jit
    def slow(a, pages):
        x = a
        for _ in range(args.chain):
            x = (x @ a) * 0.01
        return pages.at[0, 0, 0].add(x[0, 0].astype(pages.dtype))

    def touch(pages):
        return pages.at[1, 0, 0].add(1)

    donating = jax.jit(touch, donate_argnums=0)
    keeping = jax.jit(touch)

    @jax.jit
    def branching(a, pages):
        return jax.lax.cond(a[0, 0] > 0, lambda p: p.at[2].add(1), lambda p: p, pages)

    def measure(call) -> tuple[float, float]:
        nonlocal pages
        returns, device = [], []
        for _ in range(args.repeats):
            pages = slow(a, pages)
            pages.block_until_ready()
            start = time.perf_counter()
            pages = slow(a, pages)  # queued: the device is busy writing `pages`
            t = time.perf_counter()
            pages = call(pages)
            returns.append((time.perf_counter() - t) * 1e3)
            pages.block_until_ready()
            device.append((time.perf_counter() - start) * 1e3)
        return statistics.median(returns), statistics.median(device)

    for fn in (donating, keeping):  # compile first
        jax.block_until_ready(fn(slow(a, pages)))
    jax.block_until_ready(branching(a, pages))
    rows = [("donating the buffer being written", measure(donating)),
            ("not donating it", measure(keeping)),
            ("a lax.cond on a device value", measure(lambda pages: branching(a, pages)))]
    print(f"device: {jax.devices()[0].device_kind}; a queued computation of about "
          f"{rows[1][1][1]:.1f} ms writes the buffer")
    print("| call right after it | host time to return (ms) |")
    print("|---|---:|")
    for name, (ret, _) in rows:
        print(f"| {name} | {ret:.3f} |")


if __name__ == "__main__":
    main()
