"""Native CPU kernels: C++ XLA FFI handlers, built into one library on first use and registered with XLA.

    pallas_kernels/quantized_matmul/cpu.cc    quantized matmuls (int8 / int4 weights)
    pallas_kernels/paged_attention/cpu.cc     paged attention for decode rows

XLA's CPU backend runs these shapes slowly (docs/benchmarks.md): a narrow weight operand about ten times
below a float32 GEMV, and decode attention as gathers and small einsums, blockwise over pages.

The library is compiled on first use, not at `pip install`: `-march=native` can only be chosen on the
machine that runs it (a wheel built elsewhere would target the build machine's CPU or the lowest
common one), the package stays one pure-Python wheel that installs without a compiler, a checkout or
editable install needs no build step, and GPU and TPU hosts never build it. The first use on a CPU
costs one g++ run (seconds, measured in docs/benchmarks.md); the library is then cached under
`$JAXINFER_CACHE` (default: the user cache directory, ~/.cache/jaxinfer or $XDG_CACHE_HOME/jaxinfer)
in `kernels/`, named by a digest of the sources, the compiler and its flags, the jax version and the
CPU's flags, so a later start only loads it. Several processes building at once each write their own
temporary file and rename it into place. Without a compiler (`$JAXINFER_CXX`, else `$CXX`, else g++)
or when the build fails, both take XLA's path, with one warning.
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

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / "quantized_matmul" / "cpu.cc", _HERE / "paged_attention" / "cpu.cc")
# The FFI targets, each the name of its handler's symbol. Steps lowered with them are kept on disk
# (jaxinfer/runner/compilations.py, keyed by the source): a new name where arguments or attributes change.
QUANTIZED_MATMUL = "jaxinfer_quantized_matmul"  # quantized_matmul/cpu.cc
PAGED_ATTENTION_DECODE = "jaxinfer_paged_attention_decode"  # paged_attention/cpu.cc
TARGETS = (QUANTIZED_MATMUL, PAGED_ATTENTION_DECODE)
EXPORT_CHECKS = tuple(jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS)  # export refuses unknown ones
# -ffp-contract=off: every tiling of rows and outputs sums an output in the same order, bit for bit.
FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once tried; "library", "avx2", "error"


def compiler() -> str:
    return os.environ.get("JAXINFER_CXX") or os.environ.get("CXX") or "g++"


def library_path() -> pathlib.Path:
    """Where the built library for these sources, compiler, flags, jax and CPU lives (it may not exist yet)."""
    from checkpoints.default_model import cache_dir  # the one place that derives the cache directory

    h = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES), compiler().encode(), " ".join(FLAGS).encode(),
                 jax.__version__.encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / "kernels" / f"native_cpu-{h.hexdigest()[:24]}.so"


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
    """Compile the sources into one library at `path`, atomically (a temporary file in the same folder, renamed)."""
    cxx = shutil.which(compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler {compiler()!r} on PATH (set JAXINFER_CXX or CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> bool:
    """Build (once, cached) and register the kernels; False, after one warning, where they cannot be."""
    with _lock:
        if "ok" not in _state:
            try:
                path = library_path()
                if not path.is_file():
                    build(path)
                library = ctypes.CDLL(str(path))
                for target in TARGETS:
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
                _state.update(ok=True, library=path, avx2=bool(library.jaxinfer_quantized_matmul_avx2()))
            except Exception as e:  # no compiler, a failed build, a library that does not load
                _state.update(ok=False, error=str(e))
                warnings.warn(f"jaxinfer: the native CPU kernels (quantized matmuls, decode attention) are not "
                              f"available, so those take XLA's slower path: {e}", RuntimeWarning, stacklevel=2)
        return _state["ok"]


def ready_for(exported) -> bool:
    """Whether a step lowered earlier (a jax.export.Exported) can be compiled here: it calls no native
    kernel, or the kernels are built and registered (a step loaded from disk was never traced, so nothing
    registered them yet)."""
    return not any(t.encode() in exported.mlir_module_serialized for t in TARGETS) or load()
