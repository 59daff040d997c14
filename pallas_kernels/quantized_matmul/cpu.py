"""The native CPU kernel for quantized matmuls: cpu.cc, an XLA FFI handler, built on first use.

XLA's CPU backend runs a float32 GEMV near the memory's speed but any narrower operand about ten
times slower (docs/benchmarks.md), so int8 / int4 weights are multiplied here instead: each block of 32
weights is widened and dequantized in registers and meets x in float32 FMAs, exact to float rounding
(cpu.cc says why not llama.cpp's int8 activations). One custom call takes every weight of a
`quantized_matmul_many` (q, k and v; gate and up), its outputs split over XLA's intra-op thread pool.
fp8 weights, and K or groups that are not whole blocks of 32 (Q6_K's groups of 16), stay on XLA's path
(`supports`); x in bf16 is widened first and the outputs cast back.

The library is compiled on first use, not at `pip install`: `-march=native` can only be chosen on the
machine that runs it (a wheel built elsewhere would target the build machine's CPU or the lowest
common one), the package stays one pure-Python wheel that installs without a compiler, a checkout or
editable install needs no build step, and GPU and TPU hosts never build it. The first use on a CPU
costs one g++ run (about 10 s, measured in docs/benchmarks.md); the library is then cached under
`$JAXINFER_CACHE` (default: the user cache directory, ~/.cache/jaxinfer or $XDG_CACHE_HOME/jaxinfer)
in `kernels/`, named by a digest of the source, the compiler and its flags, the jax version and the
CPU's flags, so a later start only loads it. Several processes building at once each write their own
temporary file and rename it into place. Without a compiler (`$JAXINFER_CXX`, else `$CXX`, else g++)
or when the build fails, matmuls take XLA's path, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul.reference import QuantScheme

# The FFI target. Steps lowered with it are kept on disk (jaxinfer/runner/compilations.py, keyed by this file's
# source): a new name where its arguments or attributes change.
TARGET = "jaxinfer_quantized_matmul"
EXPORT_CHECKS = (jax.export.DisabledSafetyCheck.custom_call(TARGET),)  # jax.export refuses unknown targets
SOURCE = pathlib.Path(__file__).with_name("cpu.cc")
# -ffp-contract=off: every tiling of rows and outputs sums an output in the same order, bit for bit.
FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")
BLOCK = 32  # x's quantization block (cpu.cc)

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once tried; "library", "avx2", "error"


def compiler() -> str:
    return os.environ.get("JAXINFER_CXX") or os.environ.get("CXX") or "g++"


def library_path() -> pathlib.Path:
    """Where the built library for this source, compiler, flags, jax and CPU lives (it may not exist yet)."""
    from checkpoints.default_model import cache_dir  # the one place that derives the cache directory

    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler().encode(), " ".join(FLAGS).encode(), jax.__version__.encode(),
                 _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / "kernels" / f"quantized_matmul_cpu-{h.hexdigest()[:24]}.so"


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), else its name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def build(path: pathlib.Path) -> None:
    """Compile cpu.cc into `path`, atomically (a temporary file in the same folder, renamed)."""
    cxx = shutil.which(compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler {compiler()!r} on PATH (set JAXINFER_CXX or CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> bool:
    """Build (once, cached) and register the kernel; False, after one warning, where it cannot be."""
    with _lock:
        if "ok" not in _state:
            try:
                path = library_path()
                if not path.is_file():
                    build(path)
                library = ctypes.CDLL(str(path))
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.jaxinfer_quantized_matmul),
                                            platform="cpu")
                _state.update(ok=True, library=path, avx2=bool(library.jaxinfer_quantized_matmul_avx2()))
            except Exception as e:  # no compiler, a failed build, a library that does not load
                _state.update(ok=False, error=str(e))
                warnings.warn(f"jaxinfer: the native CPU kernel for quantized matmuls is not available, so they "
                              f"take XLA's slower path: {e}", RuntimeWarning, stacklevel=2)
        return _state["ok"]


def ready_for(exported) -> bool:
    """Whether a step lowered earlier (a jax.export.Exported) can be compiled here: it calls no native
    kernel, or the kernel is built and registered (a step loaded from disk was never traced, so nothing
    registered it yet)."""
    return TARGET.encode() not in exported.mlir_module_serialized or load()


def supports(x: jax.Array, values: jax.Array, scheme: QuantScheme) -> bool:
    """Whether the kernel takes x [M, K] times these values: int8 or int4 (zero points or not), K and the group
    whole blocks of 32 (Q6_K's groups of 16 stay on XLA's path)."""
    k = x.shape[-1]
    return (scheme.method in ("int8", "int4") and x.ndim == 2 and values.ndim == 2 and values.shape[1] == k
            and k % BLOCK == 0 and scheme.group(k) % BLOCK == 0)


def quantized_matmul_many(x: jax.Array, weights, scheme: QuantScheme, *, out_dtype) -> list[jax.Array]:
    """x [M, K] (float32 or bf16) times each (values [N, K], scales [K // g, N], zeros or None): one custom
    call, [M, N] each in `out_dtype`. The caller checked `supports` and `load`."""
    m, k = x.shape
    flat = []
    for values, scales, zeros in weights:
        flat += [values, scales] + ([zeros] if scheme.zero_points else [])
    out = [jax.ShapeDtypeStruct((m, values.shape[0]), jnp.float32) for values, _, _ in weights]
    ys = jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), *flat, group=np.int64(scheme.group(k)),
                                       int4=scheme.method == "int4", zero_points=bool(scheme.zero_points))
    return [y.astype(out_dtype) for y in ys]
