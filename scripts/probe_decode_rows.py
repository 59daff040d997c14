"""Probe: decode step time vs number of rows, Llama-3-8B shape, dummy bf16 weights."""
import sys, pathlib, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax, jax.numpy as jnp, numpy as np
from jaxinfer import params as params_lib
from jaxinfer.batch import Batch
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import SamplingArrays, SamplingParams
from jaxinfer.sharding import make_mesh
from scripts.bench_generate import LLAMA3_8B

mesh = make_mesh()
g, st = params_lib.dummy_params(LLAMA3_8B, jnp.bfloat16, mesh)
runner = ModelRunner(LLAMA3_8B, g, st, mesh, num_pages=1024, page_size=16)
for R in (1, 2, 4, 8, 16):
    ctx = 576
    pt = np.zeros((R, 64), np.int32)
    for r in range(R):
        pt[r, :40] = 1 + r * 40 + np.arange(40)
    b = Batch(tokens=np.arange(R, dtype=np.int32) + 5, positions=np.full(R, ctx, np.int32),
              cu_q_lens=np.arange(R + 1, dtype=np.int32), kv_lens=np.full(R, ctx + 1, np.int32),
              page_table=pt, logits_indices=np.arange(R, dtype=np.int32), max_q_len=1)
    s = SamplingArrays.from_params([SamplingParams()] * R, [0] * R, R)
    pos = np.full(R, ctx + 1, np.int32)
    for _ in range(3):
        t, _ = runner.step(b, s, pos); t.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(20):
        t, _ = runner.step(b, s, pos)
    t.block_until_ready()
    pipelined = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(10):
        t, _ = runner.step(b, s, pos); t.block_until_ready()
    synced = (time.perf_counter() - t0) / 10
    print(f"rows {R}: step {pipelined*1e3:.2f} ms pipelined, {synced*1e3:.2f} ms synced", flush=True)



def bandwidth(label, f, x, w):
    f(x, w).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(50):
        y = f(x, w)
    y.block_until_ready()
    dt = (time.perf_counter() - t0) / 50
    print(f"{label}: {dt*1e6:.0f} us = {w.nbytes/dt/1e9:.0f} GB/s", flush=True)


for R in (1, 8):
    x = jnp.ones((R, 4096), jnp.bfloat16)
    w = jnp.ones((4096, 14336), jnp.bfloat16) * 0.01
    bandwidth(f"matmul [{R},4096]x[4096,14336]", jax.jit(lambda x, w: x @ w), x, w)
    bandwidth(f"einsum te,ehd [{R}]", jax.jit(lambda x, w: jnp.einsum("te,ehd->thd", x, w)), x,
              w.reshape(4096, 112, 128))
