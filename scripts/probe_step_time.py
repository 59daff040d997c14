"""Where a decode step's time goes: one engine step at the Llama-3-8B shape (random
weights), 256 decode rows at a 2048-token context, timed with each attention
implementation and with greedy vs temperature sampling.

    python scripts/probe_step_time.py [--rows 256] [--context 2048]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer import params as params_lib  # noqa: E402
from jaxinfer.runner.step_inputs import build  # noqa: E402
from jaxinfer.core.sampling_params import SamplingParams  # noqa: E402
from jaxinfer.core.shapes import BatchShape, SeqWork  # noqa: E402
from jaxinfer.layers import attention  # noqa: E402
from jaxinfer.runner.model_runner import ModelRunner  # noqa: E402
from jaxinfer.runner.sampler import Row, SamplingArrays  # noqa: E402
from jaxinfer.sharding import make_mesh  # noqa: E402
from scripts.bench_throughput import LLAMA3_8B  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--context", type=int, default=2048)
    args = p.parse_args()
    mesh = make_mesh()
    graphdef, state = params_lib.dummy_params(LLAMA3_8B, jnp.bfloat16, mesh)
    ps, ctx, rows = 16, args.context, args.rows
    per_seq = ctx // ps + 1
    runner = ModelRunner(LLAMA3_8B, graphdef, state, mesh, num_pages=rows * per_seq + 1, page_size=ps,
                         max_rows=rows, penalty_slots=rows, max_model_len=ctx + ps)
    shape = BatchShape(rows, 0, 64, per_seq)
    works = [SeqWork([1], ctx - 1, list(range(1 + s * per_seq, 1 + (s + 1) * per_seq)), logit_offsets=[0])
             for s in range(rows)]
    batch, _ = build(shape, works, [], ps)
    kv_bytes = rows * ctx * LLAMA3_8B.num_layers * 2 * LLAMA3_8B.num_kv_heads * LLAMA3_8B.head_dim * 2
    w_bytes = params_lib.param_bytes(state)
    for label, impl, temp in [("xla attention, greedy", "xla", 0.0), ("xla attention, temperature 1", "xla", 1.0),
                              ("reference attention, greedy", "reference", 0.0)]:
        attention.set_implementation(impl)
        runner._executables.clear()  # retrace with this impl
        sp = SamplingParams(temperature=temp, max_tokens=1)
        arrays = SamplingArrays.from_rows([Row(sp, 1, ctx)] * rows, rows, 8)
        try:
            runner.step(batch, arrays).tokens.block_until_ready()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                runner.step(batch, arrays).tokens.block_until_ready()
                times.append(time.perf_counter() - t)
            ms = 1e3 * float(np.median(times))
            print(f"{label:32s} {ms:8.1f} ms/step  ({(kv_bytes + w_bytes) / ms / 1e6:.0f} GB/s of weights + KV)")
        except Exception as e:  # e.g. out of memory for the reference at large sizes
            print(f"{label:32s} failed: {str(e).splitlines()[0][:150]}")
    print(f"rows {rows}, context {ctx}: KV {kv_bytes / 2**30:.1f} GiB + weights {w_bytes / 2**30:.1f} GiB per step")


if __name__ == "__main__":
    main()
