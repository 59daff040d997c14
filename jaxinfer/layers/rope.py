"""Rotary position embeddings (HF's rotate-half layout, or interleaved pairs) and their scalings."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency-dependent RoPE scaling ("llama3"), plain "linear", or "yarn" (DeepSeek)."""

    kind: str  # "llama3", "linear" or "yarn"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn: the ramp between interpolated and extrapolated frequencies, and the attention factor's inputs
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True  # the ramp's ends rounded to whole dimensions


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """What cos and sin are multiplied by (HF's `attention_scaling`): 1 except under yarn."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """YaRN: extrapolated (unscaled) high frequencies, interpolated (divided by factor) low ones, a linear
    ramp between the dimensions that turn beta_fast and beta_slow times over the original context."""
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (np.float32(s.factor) * pos_freqs)

    def correction_dim(rotations):
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the extrapolated share
    return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32 numpy (as HF computes them),
    with Llama-3.1 or linear scaling applied."""
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if scaling.kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    # llama3: leave high frequencies alone, divide low ones by `factor`, blend between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, *, interleaved: bool = False,
               attention_factor: float = 1.0) -> jax.Array:
    """RoPE. x: [T, heads, head_dim]; positions: [T]. Rotate-half (HF's layout: dimension i pairs with
    i + head_dim / 2), or `interleaved` (2i with 2i + 1, as DeepSeek's checkpoints are laid out; the output
    in rotate-half order, as HF's DeepSeek code leaves it). cos and sin carry `attention_factor` (yarn)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None]
    cos = jnp.cos(angles)[:, None, :] * attention_factor  # [T, 1, head_dim // 2]
    sin = jnp.sin(angles)[:, None, :] * attention_factor
    x32 = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
    else:
        x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# --- llama3 scaling as llama.cpp stores it: per-frequency divisors ------------------------------

def llama3_rope_factors(s: RopeScaling, theta: float, dim: int) -> np.ndarray:
    """The per-frequency divisors `[dim/2]` that llama3 scaling applies (as llama.cpp bakes
    them into `rope_freqs.weight`): 1 for high frequencies, `factor` for low ones, and
    1 / ((1 - s) / factor + s) between, s = (old_ctx / wavelen - low) / (high - low)."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, s.factor, mid))


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, dim: int,
                                original_max_position_embeddings: int) -> RopeScaling:
    """Recover llama3 scaling from its per-frequency divisors. With old_ctx given, s is linear
    in 1/wavelen, so the two smoothing factors follow from a line fitted through the blended
    frequencies. ValueError when the divisors are not llama3 scaling."""
    orig_ctx = original_max_position_embeddings
    factor = float(factors.max())
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    low, high = 1.0, 4.0
    if factors.shape[0] == freqs.shape[0] and factor > 1:
        mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
        if mid.sum() >= 2:  # fit s = a / wavelen + b, a = old_ctx / (high - low), b = -low a / old_ctx
            s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
            a, b = np.polyfit(freqs[mid] / (2 * np.pi), s, 1)
            span = orig_ctx / a
            low = float(np.round(-b * span, 4))
            high = float(np.round(low + span, 4))
    scaling = RopeScaling(kind="llama3", factor=factor, low_freq_factor=low,
                          high_freq_factor=high, original_max_position_embeddings=orig_ctx)
    if factors.shape[0] != freqs.shape[0] or not np.allclose(
            llama3_rope_factors(scaling, theta, dim), factors, rtol=1e-3):
        raise ValueError("the frequency factors are not llama3 scaling")
    return scaling
