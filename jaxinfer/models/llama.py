"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2, Qwen3, SmolLM2.

One definition; the variants are config switches: GQA/MQA through
num_kv_heads, qkv bias (Qwen2), q/k RMSNorm (Qwen3), Llama-3.1 RoPE scaling,
sliding window (Mistral), tied or untied embeddings.

Shapes: T tokens in the ragged step, E hidden, H query heads, K KV heads,
D head dim, M MLP width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer import kv_cache
from jaxinfer.attention import paged_attention
from jaxinfer.batch import Batch
from jaxinfer.config import ModelConfig
from jaxinfer.layers import RMSNorm, apply_rope, param, rope_inv_freq


def cache_entries(cfg: ModelConfig) -> dict[str, kv_cache.CacheEntry]:
    kv = kv_cache.CacheEntry((cfg.num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"))
    return {"k": kv, "v": kv}


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = param(rngs, (E, H, D), ("embed", "heads", "head_dim"), dtype)
        self.k_proj = param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = param(rngs, (H, D, E), ("heads", "head_dim", "embed"), dtype)
        if cfg.attention_bias:
            self.q_bias = param(rngs, (H, D), ("heads", "head_dim"), dtype, init="zeros")
            self.k_bias = param(rngs, (K, D), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = param(rngs, (K, D), ("kv_heads", "head_dim"), dtype, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, "head_dim", dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, "head_dim", dtype=dtype, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x: jax.Array, batch: Batch, slots: jax.Array,
                 cache: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        q = jnp.einsum("te,ehd->thd", x, self.q_proj[...])
        k = jnp.einsum("te,ekd->tkd", x, self.k_proj[...])
        v = jnp.einsum("te,ekd->tkd", x, self.v_proj[...])
        if cfg.attention_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # trace-time constant
        q = apply_rope(q, batch.positions, inv_freq)
        k = apply_rope(k, batch.positions, inv_freq)
        cache = {"k": kv_cache.write(cache["k"], slots, k),
                 "v": kv_cache.write(cache["v"], slots, v)}
        out = paged_attention(
            q, cache["k"], cache["v"], batch, sm_scale=cfg.head_dim ** -0.5,
            sliding_window=cfg.sliding_window)
        return jnp.einsum("thd,hde->te", out, self.o_proj[...]), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        E, M = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = param(rngs, (E, M), ("embed", "mlp"), dtype)
        self.up_proj = param(rngs, (E, M), ("embed", "mlp"), dtype)
        self.down_proj = param(rngs, (M, E), ("mlp", "embed"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jnp.einsum("te,em->tm", x, self.gate_proj[...])
        up = jnp.einsum("te,em->tm", x, self.up_proj[...])
        return jnp.einsum("tm,me->te", jax.nn.silu(gate) * up, self.down_proj[...])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, batch, slots, cache):
        attn_out, cache = self.attn(self.attn_norm(x), batch, slots, cache)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), cache


class Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def __call__(self, batch: Batch, cache: kv_cache.KVCache) -> tuple[jax.Array, kv_cache.KVCache]:
        """Run one ragged step. Returns float32 logits [N, V] at batch.logits_indices."""
        slots = batch.slots
        x = self.embed[...][batch.tokens]
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, batch, slots, layer_cache)
            new_cache.append(layer_cache)
        x = self.final_norm(x[batch.logits_indices])
        if self.cfg.tie_word_embeddings:
            logits = jnp.einsum("te,ve->tv", x, self.embed[...], preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("te,ev->tv", x, self.lm_head[...], preferred_element_type=jnp.float32)
        return logits, new_cache
