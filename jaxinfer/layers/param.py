"""A parameter declared once: shape, dtype, logical axes and initializer.

The declaration travels with the parameter as nnx metadata (`logical_axes`,
`init`, `init_scale`), so everything else derives from it: shardings
(jaxinfer/sharding.py), the dtype a checkpoint tensor is cast to on loading,
and random weights for benchmarks (jaxinfer/params.py `dummy_params`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

INITS = ("normal", "ones", "zeros", "levels", "fill")


def initial_value(init: str, key: jax.Array | None, shape: Sequence[int], dtype,
                  scale: float = 0.02) -> jax.Array:
    """A value for a parameter declared with `init`: "ones" (norm scales), "zeros"
    (biases), "normal" (scale * N(0, 1), drawn in float32 then cast), "fill" (every
    element `scale`: a quantized weight's scales) or "levels" (a quantized weight's values:
    uniform over an integer dtype's range, N(0, 1) for a float8)."""
    if init == "fill":
        return jnp.full(shape, scale, dtype)
    if init == "levels":
        if jnp.issubdtype(dtype, jnp.integer):
            info = jnp.iinfo(dtype)
            return jax.random.randint(key, shape, info.min, info.max, jnp.int32).astype(dtype)
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)
    if init == "ones":
        return jnp.ones(shape, dtype)
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    if init == "normal":
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    raise ValueError(f"unknown init {init!r}: expected one of {INITS}")


def param(rngs: nnx.Rngs, shape: Sequence[int], logical_axes: Sequence[str | None], dtype,
          init: str = "normal", scale: float = 0.02) -> nnx.Param:
    """Declare a parameter. `dtype` is the parameter's own: loading casts its
    checkpoint tensor to it, whatever the model's compute dtype."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    if _abstract.get():
        value = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    else:
        value = initial_value(init, rngs.params() if init in ("normal", "levels") else None, shape, dtype, scale)
    return nnx.Param(value, logical_axes=tuple(logical_axes), init=init, init_scale=scale)


def value_of(variable):
    """A Variable's array (or ShapeDtypeStruct), across flax versions."""
    get = getattr(variable, "get_value", None)
    return get() if get is not None else variable.value


_abstract = contextvars.ContextVar("jaxinfer_abstract_params", default=False)


@contextlib.contextmanager
def abstract() -> Iterator[None]:
    """Declare parameters without values (ShapeDtypeStructs): building a model's structure
    this way traces nothing, where nnx.eval_shape traces every initializer."""
    token = _abstract.set(True)
    try:
        yield
    finally:
        _abstract.reset(token)
