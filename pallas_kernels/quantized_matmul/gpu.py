"""Mosaic GPU (Hopper) kernel: x [M, K] (bf16) times a quantized weight [K, N] (int8, int4 or fp8
values [N, K] with scales per group of input channels), for decode-sized M (1..128).

The weight is the operand that streams from HBM, so it is the one that goes through registers:
the kernel computes y^T = W^T x^T, with the weight as wgmma's left operand (held in registers,
where it is dequantized) and the activations as its right one (x^T: a transposed view of the x
tile in SMEM, N = M rounded up to 8). The weight's output-major layout [N, K] is what makes this
work: a [64, k] tile of it is the left operand as stored, with no transpose in the kernel.

One CUDA block per (64 outputs, K split): a pipeline of `stages` TMA loads (x tile [Mp, tile_k],
values tile [64, tile_k], the tile's scale rows [tile_k / g, 64]) feeds one warpgroup. Per chunk
of the tile (a scale group, at least 32 bytes of values a row, or 128 channels when scales are
per channel) it loads the values into registers in the layout made for widening
(WGMMA_UPCAST_2X for 8 bits; _4X for 4 bits, cast to 2X while still 4-bit), widens them exactly
to bf16 (int8 by the byte-permute trick, int4 by Mosaic's int4 trick, fp8 through f16 by cvt)
and feeds them to wgmma as they are. Each group's product is a fresh [64, Mp] float32
accumulator; its zero (z * the x group's sum) is taken off and its scale applied there, on M
columns rather than on g weights a row (`Config.overlap` issues a step's group wgmmas before
waiting for any). Per-channel scales multiply the finished tile.

With one block per output tile the kernel writes y [M, N] itself: the tile stored transposed
from registers into SMEM, in out_dtype, then only its first M rows to HBM; below 8 rows x
reaches the kernel unpadded (the TMA fills the tile with zeros). K is split where the outputs
alone leave SMs idle (a 4096-output projection has only 64 tiles): the splits then write float32
partials [splits, N, Mp] that a small XLA epilogue sums, transposes and casts.
`quantized_matmul_many` puts several weights that read one x (q, k, v; gate, up) on one grid:
one launch for them all.

`interpret=plgpu.InterpretGPUParams()` runs the kernel on the CPU. GPU interpret mode cannot run
a wgmma whose left operand is in registers, so there the accumulation is a plain dot into SMEM;
everything else (the pipeline, the tiles' indices, the dequantization) is the kernel's own.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.quantized_matmul.reference import QuantScheme

TILE_N = 64  # outputs per block: one wgmma M
MAX_M = 128  # larger batches take the dequantize-then-dot path (see __init__.py)
SMEM_BUDGET = 110 * 1024  # two blocks per SM (228 KiB each)
_DEFAULT_SMS = 132  # H100 / H200, when no GPU is attached (export)


@dataclasses.dataclass(frozen=True)
class Config:
    tile_k: int  # input channels per pipeline step
    stages: int  # steps in flight
    splits: int  # K splits (blocks per output tile)
    # Grouped scales: issue every group's wgmma of a pipeline step before waiting for any (the next group
    # widens while the last multiplies), instead of one wait per group. Off until measured on a GPU.
    overlap: bool = False


def _chunk(scheme: QuantScheme, k: int) -> int:
    """Channels widened and fed to one wgmma together: a scale group (at least 32 bytes of values
    per row, the smallest swizzle), or 128 when scales are per channel."""
    g = scheme.group(k)
    return max(min(g, 128), 256 // scheme.bits)


def supports(x: jax.Array, values: jax.Array, scheme: QuantScheme) -> str | None:
    """None when the kernel takes these shapes, else why not."""
    m, k = x.shape
    n = values.shape[0]
    if x.dtype != jnp.bfloat16:
        return f"x dtype {x.dtype} (bf16 only)"
    if m > MAX_M:
        return f"M = {m} > {MAX_M}"
    if n % TILE_N:
        return f"N = {n} is not a multiple of {TILE_N}"
    if k % _chunk(scheme, k):
        return f"K = {k} is not a multiple of {_chunk(scheme, k)}"
    return None


def default_config(m: int, k: int, n: int, scheme: QuantScheme, num_sms: int | None = None) -> Config:
    """The K tile, stages, K splits and overlap for an M x K x N matmul. Up to 16 rows (decode): a K tile of
    256 channels (else the largest below, or 512) whose pipeline fits the SMEM budget with at least 2 stages,
    K splits for up to four blocks per SM, every group's wgmma of a step issued together (overlap). From the
    H200 sweep at M = 2, int8 (check_quantized_gpu.py --sweep-only): 4096 x 6144 10.6 us against 13.2 with
    the rule for larger M; 4096 x 28672 35.5 against 37.9; end to end int4 at B = 1 went from 281 to 312 tok/s.
    Larger M (measured at 64 with it): tiles up to 512, splits for about two blocks per SM, no overlap."""
    mp = _padded_m(m)
    chunk = _chunk(scheme, k)
    small = mp <= 16
    for tile_k in (256, 192, 128, 64, 32, 512, 384) if small else (512, 384, 256, 192, 128, 64, 32):
        if tile_k % chunk or k % tile_k:
            continue
        stage = _stage_bytes(mp, tile_k, scheme, k)
        if 2 * stage + TILE_N * mp * 4 <= SMEM_BUDGET or tile_k == chunk:
            break
    stages = max(2, min(4, (SMEM_BUDGET - TILE_N * mp * 4) // stage))
    steps = k // tile_k
    target = (4 if small else 2) * (num_sms or _num_sms())
    tiles = n // TILE_N
    splits = 1
    for s in range(1, steps + 1):
        if steps % s == 0 and tiles * s <= target and steps // s >= 2:
            splits = s
    return Config(tile_k, stages, splits, overlap=small)


def _num_sms() -> int:
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return _DEFAULT_SMS
    return (getattr(device, "core_count", None) or _DEFAULT_SMS) if device.platform == "gpu" else _DEFAULT_SMS


def _padded_m(m: int) -> int:
    return max(8, -(-m // 8) * 8)


def _stage_bytes(mp: int, tile_k: int, scheme: QuantScheme, k: int) -> int:
    rows = 0 if scheme.group_size is None else tile_k // scheme.group(k)
    scales = rows * TILE_N * 4 * (1 + scheme.zero_points) + rows * mp * 4 * scheme.zero_points
    return mp * tile_k * 2 + TILE_N * tile_k * scheme.bits // 8 + scales


def _transforms(cols: int, bits: int):
    swizzle = min(128, cols * bits // 8)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def quantized_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                     scheme: QuantScheme, *, out_dtype=None, config: Config | None = None,
                     interpret=None) -> jax.Array:
    """x [M, K] bf16 times the weight (values [N, K], scales/zeros [K // g, N]): [M, N]."""
    return quantized_matmul_many(x, ((values, scales, zeros),), scheme, out_dtype=out_dtype, config=config,
                                 interpret=interpret)[0]


@functools.partial(jax.jit, static_argnames=("scheme", "out_dtype", "config", "interpret"))
def quantized_matmul_many(x: jax.Array, weights, scheme: QuantScheme, *, out_dtype=None,
                          config: Config | None = None, interpret=None) -> list[jax.Array]:
    """x [M, K] bf16 times each weight of `weights` ((values [N_i, K], scales, zeros) of one scheme) in one
    kernel launch (q, k and v; gate and up): [[M, N_i], ...]. The weights' output tiles share the grid."""
    m, k = x.shape
    ns = [values.shape[0] for values, _, _ in weights]
    for values, _, _ in weights:
        why = supports(x, values, scheme)
        if why is not None:
            raise ValueError(f"quantized_matmul GPU kernel: {why}")
    config = config or default_config(m, k, sum(ns), scheme)
    mp = _padded_m(m)
    grouped = scheme.group_size is not None
    with_zeros = weights[0][2] is not None
    g = scheme.group(k)
    chunk = _chunk(scheme, k)
    piece = min(g, chunk)  # channels sharing one scale within a chunk
    tile_k, splits = config.tile_k, config.splits
    if tile_k % chunk or k % (tile_k * splits):
        raise ValueError(f"quantized_matmul GPU kernel: {config} does not tile K = {k} in chunks of {chunk}")
    steps = k // tile_k // splits
    bits = scheme.bits
    on_gpu = interpret in (None, False)
    out_dtype = out_dtype or x.dtype
    # With one block per output tile the kernel writes y [M, N] itself (scaled, in out_dtype); K splits write
    # float32 partials [splits, N, Mp] that XLA sums and transposes.
    # (The transposed store takes 16-bit values only: a float32 y goes the partials' way.)
    final = splits == 1 and (grouped or not with_zeros) and jnp.dtype(out_dtype).itemsize == 2
    rows = m if m < 8 else mp  # x's and y's rows in the kernel: M below 8 (the TMA fills the tile), else padded
    operands = [jnp.pad(x, ((0, rows - m), (0, 0)))]
    if grouped and with_zeros:  # sum_k x_k (q_k - z) = x . q - z sum_k x_k, per group: [K // g, Mp]
        xs = x.astype(jnp.float32).reshape(m, k // g, g).sum(axis=2).T
        operands.append(jnp.pad(xs, ((0, 0), (0, mp - m))))
    per_weight = 1 + (grouped or final) + (grouped and with_zeros)  # values, scales, zeros in the kernel
    for values, scales, zeros in weights:
        operands += [values] + [scales] * (grouped or final) + [zeros] * (grouped and with_zeros)
    bounds = [0]
    for n in ns:
        bounds.append(bounds[-1] + n // TILE_N)  # the weights' output tiles, one after another on the grid
    wide = {8: plgpu.Layout.WGMMA_UPCAST_2X, 4: plgpu.Layout.WGMMA_UPCAST_4X}[bits]
    acc_layout = plgpu.Layout.WGMMA
    n_out = len(weights)

    def kernel(x_gmem, *rest):
        xs_gmem = rest[0] if grouped and with_zeros else None
        rest = rest[1:] if xs_gmem is not None else rest
        weight_gmem = [rest[i * per_weight:(i + 1) * per_weight] for i in range(n_out)]
        out_gmems = rest[n_out * per_weight:n_out * per_weight + n_out]
        out_smem, *channel_scratch = rest[n_out * per_weight + n_out:]
        global_tile, split = lax.axis_index("n"), lax.axis_index("split")
        first = split * steps

        def widened(v_smem, c):
            """Values [64, chunk] of chunk c from SMEM, in bf16 (exact) in the WGMMA layout."""
            cols = pl.ds(c * chunk, chunk)
            q = plgpu.load(v_smem.at[:, cols], layout=wide) if on_gpu else v_smem[:, cols]
            if bits == 4 and on_gpu:
                q = plgpu.layout_cast(q, plgpu.Layout.WGMMA_UPCAST_2X)
            if scheme.method == "fp8":  # the hardware widens e4m3 to f16 only
                q = q.astype(jnp.float16)
                q = plgpu.layout_cast(q, acc_layout) if on_gpu else q
                return q.astype(jnp.float32).astype(jnp.bfloat16)
            q = q.astype(jnp.bfloat16)
            return plgpu.layout_cast(q, acc_layout) if on_gpu else q

        def vector(ref, r, axis):
            """Row r of a group operand: per output (axis 1 reduced) or per x row (axis 0 reduced)."""
            return plgpu.load(ref.at[r], layout=acc_layout.reduce(axis)) if on_gpu else ref[r]

        def product(w, xt):
            """w [64, piece] bf16 times x^T [piece, Mp]: a fresh float32 [64, Mp]."""
            if on_gpu:
                zero = plgpu.layout_cast(jnp.zeros((TILE_N, mp), jnp.float32), acc_layout)
                return pl.run_state(lambda acc: plgpu.wgmma(acc, w, xt.T))(plgpu.ACC.init(zero))
            return lax.dot_general(w, xt[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        def grouped_body(_, x_smem, *refs):
            """Each group's product is scaled (and its zero taken off) on the small accumulator, in float32,
            not on the weight: Mp / 2 operations a thread per group instead of g / 2."""
            *refs, total = refs
            if with_zeros:
                xs_smem, v_smem, s_smem, z_smem = refs
            else:
                v_smem, s_smem = refs
            pieces = [(c, p) for c in range(tile_k // chunk) for p in range(chunk // piece)]

            def weight_of(c, p, q):
                return q if piece == chunk else q[:, p * piece:(p + 1) * piece]

            def x_of(c, p):
                return x_smem.at[:, pl.ds(c * chunk + p * piece, piece)]

            if config.overlap and on_gpu:
                def issue(accs):
                    q = None
                    for acc, (c, p) in zip(accs, pieces):
                        q = widened(v_smem, c) if p == 0 else q
                        plgpu.wgmma(acc, weight_of(c, p, q), x_of(c, p).T)
                zero = plgpu.layout_cast(jnp.zeros((TILE_N, mp), jnp.float32), acc_layout)
                parts = pl.run_state(issue)(tuple(plgpu.ACC.init(zero) for _ in pieces))
            else:
                parts, q = [], None
                for c, p in pieces:
                    q = widened(v_smem, c) if p == 0 else q
                    parts.append(product(weight_of(c, p, q), x_of(c, p)))
            for part, (c, p) in zip(parts, pieces):
                r = (c * chunk + p * piece) // g  # the group's row within the tile
                if with_zeros:
                    part = part - vector(z_smem, r, 1)[:, None] * vector(xs_smem, r, 0)[None, :]
                total = total + part * vector(s_smem, r, 1)[:, None]
            return total

        def channel_body(_, x_smem, v_smem, acc):
            """Per-channel scales come after the pipeline: every chunk accumulates in place."""
            for c in range(tile_k // chunk):
                w = widened(v_smem, c)
                xt = x_smem.at[:, pl.ds(c * chunk, chunk)]
                if on_gpu:
                    plgpu.wgmma(acc, w, xt.T)
                else:
                    acc[...] += product(w, xt)
            if on_gpu:
                plgpu.wgmma_wait(0)  # the slot's x is read until the wgmma is done

        def one_weight(refs, out_gmem, tile):
            """The pipeline and epilogue of output tile `tile` of one weight."""
            v_gmem, *group_gmem = refs
            group_rows = tile_k // g
            x_spec = plgpu.BlockSpec((mp, tile_k), lambda kk: (0, first + kk), transforms=_transforms(piece, 16))
            v_spec = plgpu.BlockSpec((TILE_N, tile_k), lambda kk: (tile, first + kk),
                                     transforms=_transforms(chunk, bits))
            outputs = pl.ds(tile * TILE_N, TILE_N)
            if grouped:
                specs = [x_spec] + ([plgpu.BlockSpec((group_rows, mp), lambda kk: (first + kk, 0))] * with_zeros)
                specs += [v_spec] + [plgpu.BlockSpec((group_rows, TILE_N), lambda kk: (first + kk, tile))] * (
                    1 + with_zeros)
                refs = (x_gmem,) + ((xs_gmem,) if with_zeros else ()) + (v_gmem, *group_gmem)
            else:
                specs, refs = [x_spec, v_spec], (x_gmem, v_gmem)
            channel_scales = group_gmem[0] if final and not grouped else None
            if channel_scales is not None:  # the tile's per-channel scales, fetched while the pipeline runs
                s_smem, s_ready = channel_scratch
                plgpu.copy_gmem_to_smem(channel_scales.at[:, outputs], s_smem, s_ready)

            def finish(total):
                """total [64, Mp] float32 -> the output: final, y's tile stored transposed ([Mp, 64], in out_dtype;
                rows past M are not copied out); else the float32 partial as it is."""
                if final:
                    if channel_scales is not None:
                        plgpu.barrier_wait(s_ready)
                        total = total * vector(s_smem, 0, 1)[:, None]
                    out_smem.T[...] = total.astype(out_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, m)] if m < 8 else out_smem, out_gmem.at[:, outputs])
                else:
                    out_smem[...] = total
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[split, outputs])
                plgpu.wait_smem_to_gmem(0)

            if grouped:
                zero = jnp.zeros((TILE_N, mp), jnp.float32)
                finish(plgpu.emit_pipeline(grouped_body, grid=(steps,), in_specs=specs,
                                           max_concurrent_steps=config.stages,
                                           init_carry=plgpu.layout_cast(zero, acc_layout) if on_gpu else zero)(*refs))
            elif on_gpu:
                def scope(acc):
                    plgpu.emit_pipeline(functools.partial(channel_body, acc=acc), grid=(steps,), in_specs=specs,
                                        max_concurrent_steps=config.stages)(*refs)
                    finish(acc[...])
                pl.run_scoped(scope, plgpu.ACC((TILE_N, mp), jnp.float32))
            else:
                def scope(acc):
                    acc[...] = jnp.zeros_like(acc)
                    plgpu.emit_pipeline(functools.partial(channel_body, acc=acc), grid=(steps,), in_specs=specs,
                                        max_concurrent_steps=config.stages)(*refs)
                    finish(acc[...])
                pl.run_scoped(scope, plgpu.SMEM((TILE_N, mp), jnp.float32))

        if n_out == 1:
            one_weight(weight_gmem[0], out_gmems[0], global_tile)
        for i in range(n_out if n_out > 1 else 0):
            pl.when((global_tile >= bounds[i]) & (global_tile < bounds[i + 1]))(
                functools.partial(one_weight, weight_gmem[i], out_gmems[i], global_tile - bounds[i]))

    out_types = [jax.ShapeDtypeStruct((rows, n), out_dtype) if final else
                 jax.ShapeDtypeStruct((splits, n, mp), jnp.float32) for n in ns]
    scratch = [plgpu.SMEM((mp, TILE_N), out_dtype) if final else plgpu.SMEM((TILE_N, mp), jnp.float32)]
    if final and not grouped:
        scratch += [plgpu.SMEM((1, TILE_N), jnp.float32), plgpu.Barrier()]
    outs = plgpu.kernel(
        kernel, out_type=out_types,
        grid=(bounds[-1], splits), grid_names=("n", "split"),
        scratch_types=scratch, compiler_params=plgpu.CompilerParams(), interpret=interpret,
    )(*operands)
    results = []
    for out, (_, scales, zeros) in zip(outs, weights):
        if final:
            results.append(out[:m])
            continue
        y = out.sum(axis=0)[:, :m].T
        if not grouped:  # per channel: sum_k x_k (q_k - z) s = (x . q - z sum_k x_k) s
            if zeros is not None:
                y = y - x.astype(jnp.float32).sum(axis=1, keepdims=True) * zeros[0]
            y = y * scales[0]
        results.append(y.astype(out_dtype))
    return results
