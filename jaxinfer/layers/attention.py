"""The one attention function models call; it picks an implementation.

Every attention type is paged. Implementations, by name:

    auto       the Mosaic TPU kernel on TPU and the Mosaic GPU kernel on CUDA where
               their `supports` accepts the shapes; on the CPU `xla` with its decode
               rows in the native kernel (pallas_kernels/paged_attention/cpu.cc);
               `xla` everywhere else (default)
    kernels    pallas_kernels/paged_attention's public function: the platform's
               kernel where it fits, its reference elsewhere (for tests and checks)
    xla        jaxinfer/layers/attention_xla.py: plain JAX, blockwise over pages
    reference  pallas_kernels/paged_attention/reference.py: dense, obviously right

Pick one with `EngineConfig(attention=...)` / `--attention` (the engine traces
its step under `implementation(name)`), JAXINFER_ATTENTION=<name> (the process
default, read at import), `set_implementation(name)`, or
`with implementation(name): ...`. The choice is read when a function is traced:
an already-compiled jit keeps the one it saw.

A Pallas kernel is one custom call that XLA cannot split, so when the trace
runs under `on_mesh(mesh)` (the model runner does this) and the mesh has a
`tensor` axis, the kernels run inside `shard_map`, each device on its own heads (the CPU's
native decode kernel too).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxinfer.runner.batch import Batch
from jaxinfer.core.config import ATTENTION_IMPLEMENTATIONS
from jaxinfer.layers import attention_xla
from pallas_kernels import paged_attention as paged_kernels


def _reference(q, k_pages, v_pages, batch: Batch, *, sm_scale, sliding_window, soft_cap):
    return paged_kernels.reference(q, k_pages, v_pages, batch.kv_lens, batch.page_table,
                                   batch.cu_q_lens, max_q_len=batch.max_q_len, sm_scale=sm_scale,
                                   sliding_window=sliding_window, soft_cap=soft_cap)


def _per_device(attend):
    """`attend(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)`, run per device over the
    heads when the trace is under a mesh with a `tensor` axis (see `on_mesh`)."""
    def call(*args):
        q, k_pages = args[0], args[1]
        mesh = kernel_mesh()
        if mesh is None or mesh.shape.get("tensor", 1) == 1:
            return attend(*args)
        tp = mesh.shape["tensor"]
        mqa = k_pages.shape[2] == 1  # one KV head (MLA's latent): every device reads all of it
        if q.shape[1] % tp or (k_pages.shape[2] % tp and not mqa):
            # Heads that do not split evenly are replicated by the model's rules; so is the kernel.
            return attend(*args)
        heads, page_heads = P(None, "tensor", None), P() if mqa else P(None, None, "tensor", None)
        return jax.shard_map(attend, mesh=mesh, in_specs=(heads, page_heads, page_heads, P(), P(), P()),
                             out_specs=heads, check_vma=False)(*args)
    return call


def _kernel_call(kernel, q, k_pages, v_pages, batch: Batch, *, sm_scale, sliding_window, soft_cap):
    attend = functools.partial(kernel, max_q_len=batch.max_q_len, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap)
    return _per_device(attend)(q, k_pages, v_pages, batch.kv_lens, batch.page_table, batch.cu_q_lens)


def _kernels(q, k_pages, v_pages, batch: Batch, **options):
    return _kernel_call(paged_kernels.ragged_paged_attention, q, k_pages, v_pages, batch, **options)


def _auto(q, k_pages, v_pages, batch: Batch, **options):
    # The one platform dispatch of the step: each platform's kernel where its supports() takes
    # the shapes (e.g. not head_dim 64 with several KV heads on TPU), `xla` everywhere else.
    xla = functools.partial(attention_xla.paged_attention, **options)
    # Imported when a step is traced: a restart that loads its steps lowered never needs them.
    from pallas_kernels import native_cpu
    from pallas_kernels.paged_attention import cpu as paged_cpu
    from pallas_kernels.paged_attention import gpu as paged_gpu
    from pallas_kernels.paged_attention import tpu as paged_tpu

    tpu = (functools.partial(_kernel_call, paged_tpu.ragged_paged_attention, **options)
           if paged_tpu.supports(q, k_pages, v_pages) is None else xla)
    cuda = (functools.partial(_kernel_call, paged_gpu.ragged_paged_attention, **options)
            if paged_gpu.supports(q, k_pages, v_pages) is None else xla)
    # The CPU's native decode kernel (built once, cached) only where the default backend is the CPU, so a GPU
    # or TPU host never compiles it; the prefill region stays on the xla path.
    cpu = xla
    if jax.default_backend() == "cpu" and paged_cpu.supports(q, k_pages, v_pages) and native_cpu.load():
        decode = _per_device(functools.partial(paged_cpu.decode_attention, **options))
        cpu = functools.partial(attention_xla.paged_attention, decode_attention=decode, **options)
    return lax.platform_dependent(q, k_pages, v_pages, batch, tpu=tpu, cuda=cuda, cpu=cpu, default=xla)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "auto": _auto,
    "kernels": _kernels,
    "xla": attention_xla.paged_attention,
    "reference": _reference,
}

_current = os.environ.get("JAXINFER_ATTENTION", "auto")
assert set(IMPLEMENTATIONS) == set(ATTENTION_IMPLEMENTATIONS), "EngineConfig validates against that list"
if _current not in IMPLEMENTATIONS:
    raise ValueError(f"JAXINFER_ATTENTION={_current!r}: expected one of {sorted(IMPLEMENTATIONS)}")


# Per thread: data-parallel replicas warm up side by side, each tracing over its own devices.
_mesh: contextvars.ContextVar[jax.sharding.Mesh | None] = contextvars.ContextVar("kernel_mesh", default=None)


@contextlib.contextmanager
def on_mesh(mesh: jax.sharding.Mesh | None) -> Iterator[None]:
    """Traces inside the block (on this thread) shard the kernels over `mesh`'s tensor axis."""
    token = _mesh.set(mesh)
    try:
        yield
    finally:
        _mesh.reset(token)


def kernel_mesh():
    """The mesh the kernels' shard_map runs over: `on_mesh`'s, or where an abstract mesh of the same
    axes is the context (jax.export for another platform, e.g. TPU from the CPU), that one."""
    mesh = _mesh.get()
    if mesh is None:
        return None
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and dict(context.shape) == dict(mesh.shape):
        return context
    return mesh


def set_implementation(name: str) -> None:
    global _current
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}: expected one of "
                         f"{sorted(IMPLEMENTATIONS)}")
    _current = name


def get_implementation() -> str:
    return _current


@contextlib.contextmanager
def implementation(name: str | None) -> Iterator[None]:
    """Use `name` inside the block; None keeps the current choice."""
    previous = _current
    if name is not None:
        set_implementation(name)
    try:
        yield
    finally:
        set_implementation(previous)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: Batch, *,
                    sm_scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None) -> jax.Array:
    """q: [T, H, Dh] over pages [num_pages, page_size, K, Dh] -> [T, H, Dh]."""
    return IMPLEMENTATIONS[_current](q, k_pages, v_pages, batch, sm_scale=sm_scale,
                                     sliding_window=sliding_window, soft_cap=soft_cap)


def mla_attention(q: jax.Array, latent_pages: jax.Array, batch: Batch, *, value_dim: int,
                  sm_scale: float) -> jax.Array:
    """Multi-head latent attention, absorbed (pallas_kernels/mla_attention): q [T, H, L + R] over the
    single-head latent pages [num_pages, page_size, 1, L + R] -> [T, H, value_dim]. Implementations as
    for `paged_attention`: the Mosaic kernels on TPU, and on CUDA for decode-sized steps (max_q_len up to
    the GPU kernel's MAX_Q_LEN); elsewhere the paged path reads the same pages as keys and values and its
    output is cut to value_dim."""
    from pallas_kernels import mla_attention as mla

    mesh = kernel_mesh()
    tp = mesh.shape.get("tensor", 1) if mesh is not None else 1
    if tp > 1 and latent_pages.shape[0] % tp == 0:  # pages split by sequence: jaxinfer/models/deepseek.py
        return _data_parallel(functools.partial(mla_attention, value_dim=value_dim, sm_scale=sm_scale),
                              q, latent_pages, batch, mesh)

    def paged(name):
        def run(q, pages, batch):
            return IMPLEMENTATIONS[name](q, pages, pages, batch, sm_scale=sm_scale, sliding_window=None,
                                         soft_cap=None)[..., :value_dim]
        return run

    def kernel(module):
        def run(q, pages, batch):
            def attend(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens):
                return module.mla_attention(q, k_pages[:, :, 0], kv_lens, page_table, cu_q_lens, value_dim=value_dim,
                                            max_q_len=batch.max_q_len, sm_scale=sm_scale)
            return _per_device(attend)(q, pages, pages, batch.kv_lens, batch.page_table, batch.cu_q_lens)
        return run

    def reference(q, pages, batch):
        return mla.reference(q, pages[:, :, 0], batch.kv_lens, batch.page_table, batch.cu_q_lens,
                             value_dim=value_dim, max_q_len=batch.max_q_len, sm_scale=sm_scale)

    if _current == "reference":
        return reference(q, latent_pages, batch)
    if _current == "xla":
        return paged("xla")(q, latent_pages, batch)
    # kernels: the platform's kernel, the reference where there is none; auto: the paged path there
    fallback = reference if _current == "kernels" else paged("auto")
    pages = latent_pages[:, :, 0]
    tpu = kernel(mla.tpu) if mla.tpu.supports(q, pages, value_dim) is None else fallback
    gpu_ok = mla.gpu.supports(_per_device_view(q), pages, value_dim) is None and batch.max_q_len <= mla.gpu.MAX_Q_LEN
    return lax.platform_dependent(q, latent_pages, batch, tpu=tpu, cuda=kernel(mla.gpu) if gpu_ok else fallback,
                                  default=fallback)


def _data_parallel(attend, q: jax.Array, pages: jax.Array, batch: Batch, mesh) -> jax.Array:
    """Data-parallel attention over pages split along the tensor axis: device d holds partition d of the
    pool (core/page_pool.py) and every sequence's pages lie in one partition, so each device attends its own
    sequences, with every head, over its own pages; the other rows it leaves at zero and one psum gathers
    them. The latent cache is held once across the devices instead of once on each."""
    def local(q, pages, batch):
        d = jax.lax.axis_index("tensor")
        per = pages.shape[0]  # this device's pages: global ids d * per .. (d + 1) * per - 1
        mine = batch.page_table[:, 0] // per == d
        table = jnp.where(mine[:, None], jnp.clip(batch.page_table - d * per, 0, per - 1), 0)
        own = dataclasses.replace(batch, page_table=table, kv_lens=jnp.where(mine, batch.kv_lens, 0))
        def reference(q, pages, batch):
            with implementation("reference"):
                return attend(q, pages, batch)

        with on_mesh(None):  # one device's view: the kernels see every head
            # XLA's CPU compiler crashes (SIGSEGV) on the blockwise path's loop in this shard_map at decode
            # shapes; the CPU (the simulated devices of the tests) takes the reference there.
            out = lax.platform_dependent(q, pages, own, cpu=reference, default=attend)
        seq = jnp.searchsorted(batch.cu_q_lens, jnp.arange(q.shape[0]), side="right") - 1
        row_mine = mine[jnp.clip(seq, 0, mine.shape[0] - 1)]
        return jax.lax.psum(jnp.where(row_mine[:, None, None], out, 0).astype(out.dtype), "tensor")

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("tensor"), P()), out_specs=P(),
                         check_vma=False)(q, pages, batch)


def _per_device_view(q: jax.Array) -> jax.ShapeDtypeStruct:
    """q [T, H, D] as one device holds it inside `_per_device` (its share of the heads)."""
    mesh = kernel_mesh()
    tp = mesh.shape.get("tensor", 1) if mesh is not None else 1
    heads = q.shape[1] // tp if q.shape[1] % tp == 0 else q.shape[1]
    return jax.ShapeDtypeStruct((q.shape[0], heads, q.shape[2]), q.dtype)
