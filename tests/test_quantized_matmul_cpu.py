"""The native CPU kernel (pallas_kernels/quantized_matmul/cpu.cc): its products against the pure-JAX
reference, the entry point's choice of it, and its build: cached, shared by processes, replaced by XLA's
path with a warning where no compiler is found."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import native_cpu
from pallas_kernels.quantized_matmul import cpu, parse, quantize, quantized_matmul, quantized_matmul_many
from pallas_kernels.quantized_matmul import reference as reference_matmul

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECS = ["int8-g32", "int8-g64", "int8-g128", "int8-ch", "int4-g32", "int4-g64-zp", "int4-g128", "int4-ch",
         "int4-g32-zp", "int8-g32-zp"]

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU kernel")


@pytest.fixture(scope="module")
def built():
    if not native_cpu.load():
        pytest.skip(f"the native kernels could not be built here: {native_cpu._state.get('error')}")


def lowered_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_native_kernel_equals_the_reference_on_ragged_shapes(built, spec, m):
    """Two weights in one call (odd widths), each as the reference computes it, to float rounding."""
    scheme = parse(spec)
    rng = np.random.default_rng(m)
    k = 384
    weights = [quantize(rng.standard_normal((k, n)).astype(np.float32), scheme) for n in (24 + m, 7)]
    # A mean far from zero: the int4 offsets (level + 8, zero points) are taken back through x's sums.
    x = jnp.asarray(rng.standard_normal((m, k)) + 0.5, jnp.float32)
    parts = [(jnp.asarray(w["values"]), jnp.asarray(w["scales"]),
              None if "zeros" not in w else jnp.asarray(w["zeros"])) for w in weights]
    ys = jax.jit(lambda x, ws: quantized_matmul_many(x, ws, scheme))(x, parts)
    assert cpu.TARGET in lowered_text(lambda x, ws: quantized_matmul_many(x, ws, scheme), x, parts)
    for y, (values, scales, zeros) in zip(ys, parts):
        want = reference_matmul(x, values, scales, zeros, scheme)
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(y) / scale, np.asarray(want) / scale, atol=2e-6)


def test_bf16_activations_come_back_in_bf16(built):
    scheme = parse("int4-g32-zp")
    rng = np.random.default_rng(5)
    w = quantize(rng.standard_normal((128, 40)).astype(np.float32), scheme)
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.bfloat16)
    y = jax.jit(lambda x: quantized_matmul(x, w["values"], w["scales"], w["zeros"], scheme))(x)
    want = reference_matmul(x.astype(jnp.float32), w["values"], w["scales"], w["zeros"], scheme)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)


def test_a_row_does_not_depend_on_how_many_rows_share_the_call(built):
    """Each output is summed in one order whatever the tiling by rows (one to four at a time): bit for bit."""
    scheme = parse("int4-g32-zp")
    rng = np.random.default_rng(6)
    w = quantize(rng.standard_normal((256, 45)).astype(np.float32), scheme)
    x = jnp.asarray(rng.standard_normal((9, 256)), jnp.float32)

    def f(x):
        return quantized_matmul(x, w["values"], w["scales"], w["zeros"], scheme)
    whole = np.asarray(jax.jit(f)(x))
    for rows in (1, 2, 5):
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(x[:rows])), whole[:rows])


def test_fp8_and_k_not_whole_blocks_stay_on_xlas_path(built):
    rng = np.random.default_rng(7)
    for spec, k in (("fp8", 128), ("int4-ch", 48)):
        scheme = parse(spec)
        w = quantize(rng.standard_normal((k, 16)).astype(np.float32), scheme)
        x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)

        def f(x):
            return quantized_matmul(x, w["values"], w["scales"], w.get("zeros"), scheme)
        assert cpu.TARGET not in lowered_text(f, x)
        want = reference_matmul(x, w["values"], w["scales"], w.get("zeros"), scheme)
        np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_without_a_compiler_matmuls_take_xlas_path_after_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.setenv("JAXINFER_CXX", "no-such-compiler-here")
    monkeypatch.setattr(native_cpu, "_state", {})
    scheme = parse("int8-g32")
    rng = np.random.default_rng(8)
    w = quantize(rng.standard_normal((64, 8)).astype(np.float32), scheme)
    x = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)

    def f(x):
        return quantized_matmul(x, w["values"], w["scales"], None, scheme)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler 'no-such-compiler-here'"):
        text = lowered_text(f, x)
    assert cpu.TARGET not in text
    with _no_warning():
        y = jax.jit(lambda x: f(x) + 0)(x)  # a second trace: no second warning
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference_matmul(x, w["values"], w["scales"], None, scheme)),
                               rtol=2e-5, atol=2e-5)


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.record = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.record if issubclass(w.category, RuntimeWarning)], self.record


BUILD = ("import sys; from pallas_kernels import native_cpu; ok = native_cpu.load(); "
         "print(ok, native_cpu._state.get('library') or native_cpu._state.get('error'))")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_concurrent_first_builds_share_one_cached_library_that_a_later_process_loads(tmp_path):
    """Two processes build into an empty cache at once: both load, one library is left and no temporary
    file; a third process, whose build would fail, loads it from the cache."""
    env = {"JAXINFER_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0 and out.startswith("True"), err[-2000:]
    files = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert len(files) == 1 and files[0].endswith(".so"), files
    never_build = "native_cpu.build = lambda path: 1 / 0; "  # the compiler is part of the key: break the build instead
    later = run_python(BUILD.replace("ok = ", never_build + "ok = "), **env)
    assert later.returncode == 0 and later.stdout.startswith("True"), later.stderr[-2000:]
    assert files[0] in later.stdout
