"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2, Qwen3, SmolLM2.

One definition; the variants are config switches: GQA/MQA through
num_kv_heads, qkv bias (Qwen2), q/k RMSNorm (Qwen3), Llama-3.1 RoPE scaling,
sliding window (Mistral), tied or untied embeddings.

In this file, top to bottom: the config (from HF config.json and from GGUF
metadata), the weight names (HF safetensors, GGUF), the KV-cache entries, and
the forward pass.

Shapes: T tokens in the ragged step, E hidden, H query heads, K KV heads,
D head dim, M MLP width, V vocab.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.runner.batch import Batch
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.layers import kv
from jaxinfer.layers.attention import paged_attention
from jaxinfer.layers.linear import Embed, Linear, project
from jaxinfer.layers.norm import RMSNorm
from jaxinfer.layers.rope import RopeScaling, apply_rope, llama3_scaling_from_factors, rope_inv_freq
from jaxinfer.models.base import ModelConfig, hf_common

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # llama.cpp writes Mistral as "llama"


# --- config -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` keys

    POSITIVE = ModelConfig.POSITIVE + ("intermediate_size", "num_heads", "num_kv_heads", "head_dim")

    def problems(self) -> list[str]:
        problems = super().problems()
        if not problems and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of "
                            f"num_kv_heads ({self.num_kv_heads})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive, got {self.sliding_window}")
        return problems

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return super().from_dict(d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], architecture: str) -> LlamaConfig:
        """From a transformers config.json dict (KeyError/ValueError/TypeError if malformed)."""
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        if architecture in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = None  # Qwen configs carry a window they do not use by default
        return cls(
            architecture=architecture,
            **hf_common(hf),
            intermediate_size=int(hf["intermediate_size"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(_hf_rope_theta(hf)),
            rope_scaling=_hf_rope_scaling(hf),
            attention_bias=bool(hf.get("attention_bias", architecture == "qwen2")),
            qk_norm=architecture == "qwen3",
            sliding_window=int(window) if window else None,
        )

    @classmethod
    def from_gguf(cls, f) -> LlamaConfig:
        """From a GGUF file's `{arch}.*` and `tokenizer.ggml.*` metadata
        (f: checkpoints.gguf_loader.GGUFFile)."""
        arch, md = f.architecture, f.metadata

        def get(key: str, default: Any = KeyError) -> Any:
            full = f"{arch}.{key}"
            if full in md:
                return md[full]
            if default is KeyError:
                raise ConfigError(f"{f.path}: GGUF metadata lacks {full!r}")
            return default

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv_heads = get("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer counts (some hybrids); one value is all we run
            if len(set(kv_heads)) != 1:
                raise ConfigError(f"{f.path}: per-layer KV head counts {kv_heads} are not supported")
            kv_heads = kv_heads[0]
        head_dim = int(get("attention.key_length", hidden // heads if heads else 0))
        vocab = get("vocab_size", None)
        if vocab is None and md.get("tokenizer.ggml.tokens"):
            vocab = len(md["tokenizer.ggml.tokens"])
        if vocab is None and "token_embd.weight" in f.tensors:
            vocab = f.tensor_shape("token_embd.weight")[0]
        window = get("attention.sliding_window", None)
        bos = md.get("tokenizer.ggml.bos_token_id")
        eos = md.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(vocab or 0),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=_gguf_rope_scaling(f, head_dim),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in f.tensors,
            attention_bias="blk.0.attn_q.bias" in f.tensors,
            qk_norm=arch == "qwen3",
            sliding_window=int(window) if window else None,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=() if eos is None else (int(eos),),
        )


Config = LlamaConfig


def _hf_rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return hf.get("rope_theta") or params.get("rope_theta") or 10000.0


def _hf_rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rs["factor"]))
    raise ConfigError(f"unsupported rope scaling {kind!r}: jaxinfer supports llama3 and linear")


def _gguf_rope_scaling(f, head_dim: int) -> RopeScaling | None:
    """Rope scaling from GGUF metadata. llama.cpp stores Llama-3.1 scaling as per-frequency
    divisors (`rope_freqs.weight`), from which the scaling is recovered and checked."""
    arch, md = f.architecture, f.metadata
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    orig_ctx = md.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in f.tensors:
        factors = f.array("rope_freqs.weight").astype(np.float64).reshape(-1)
        if np.allclose(factors, 1.0):
            return None
        theta = float(md.get(f"{arch}.rope.freq_base", 10000.0))
        dim = int(md.get(f"{arch}.rope.dimension_count", head_dim))
        try:
            return llama3_scaling_from_factors(factors, theta, dim, int(orig_ctx or 8192))
        except ValueError:
            raise ConfigError(f"{f.path}: rope_freqs.weight holds frequency factors that are not "
                              "llama3 scaling; jaxinfer cannot run them") from None
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(factor))
    raise ConfigError(f"{f.path}: unsupported rope scaling {kind!r}: jaxinfer supports "
                      "llama3 and linear")


# --- weight names -------------------------------------------------------------------------------
#
# Every reader yields tensors under their HF names in HF layout (Linear weights [out, in]);
# `hf_param` turns one into a parameter of the Model below (einsum layouts, inputs first,
# heads split out). GGUF names map onto HF names first.

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_param(cfg: LlamaConfig, name: str, t: np.ndarray) -> tuple[tuple, np.ndarray] | None:
    """One HF tensor -> (parameter path, array in our layout); None for tensors we drop."""
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if _HF_IGNORED.match(name):
        return None
    if name == "model.embed_tokens.weight":
        return ("embed", "weight"), t
    if name == "lm_head.weight":
        if cfg.tie_word_embeddings:
            return None
        # A QuantizedTensor (a GGUF's quantized head kept) is [vocab, hidden] already: the kernels' [N, K].
        return ("lm_head", "weight"), (t.T if isinstance(t, np.ndarray) else t)
    if name == "model.norm.weight":
        return ("final_norm", "scale"), t
    m = _HF_LAYER.fullmatch(name)
    if m is None:
        raise CheckpointError(f"unexpected tensor {name!r} for a {cfg.architecture} model")
    i, rest = int(m.group(1)), m.group(2)
    if i >= cfg.num_layers:
        raise CheckpointError(f"tensor {name!r} is for layer {i}, but the config has "
                              f"{cfg.num_layers} layers")
    heads = {"q": H, "k": K, "v": K}
    table = {
        "input_layernorm.weight": (("attn_norm", "scale"), lambda: t),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), lambda: t),
        "self_attn.o_proj.weight": (("attn", "o_proj", "weight"), lambda: t.reshape(E, H, D).transpose(1, 2, 0)),
        "self_attn.q_norm.weight": (("attn", "q_norm", "scale"), lambda: t),
        "self_attn.k_norm.weight": (("attn", "k_norm", "scale"), lambda: t),
        "mlp.gate_proj.weight": (("mlp", "gate_proj", "weight"), lambda: t.T),
        "mlp.up_proj.weight": (("mlp", "up_proj", "weight"), lambda: t.T),
        "mlp.down_proj.weight": (("mlp", "down_proj", "weight"), lambda: t.T),
    }
    for p in "qkv":
        table[f"self_attn.{p}_proj.weight"] = (
            ("attn", f"{p}_proj", "weight"), lambda n=heads[p]: t.reshape(n, D, E).transpose(2, 0, 1))
        table[f"self_attn.{p}_proj.bias"] = (("attn", f"{p}_proj", "bias"), lambda n=heads[p]: t.reshape(n, D))
    if rest not in table:
        raise CheckpointError(f"unexpected tensor {name!r} for a {cfg.architecture} model")
    path, fn = table[rest]
    if not isinstance(t, np.ndarray):  # a QuantizedTensor: [out, in] already is the kernels' [N, K]
        return ("layers", i, *path), t
    try:
        return ("layers", i, *path), fn()
    except ValueError:
        raise CheckpointError(f"tensor {name!r} has shape {t.shape}, which does not fit the "
                              "config (hidden size, heads, head_dim)") from None


_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# In llama.cpp files but not in HF weights: llama3 rope factors (read into the config instead).
_GGUF_SKIPPED = {"rope_freqs.weight"}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_hf_name(name: str) -> str | None:
    """HF name for a GGUF tensor name; None for tensors to skip; KeyError if unknown."""
    if name in _GGUF_SKIPPED:
        return None
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{int(m.group(1))}.{_GGUF_LAYER[m.group(2)]}"
    raise KeyError(name)


def gguf_to_hf(cfg: LlamaConfig, name: str, w: np.ndarray) -> np.ndarray:
    """A dequantized GGUF tensor in HF layout. llama.cpp reorders the q/k rows of
    architecture `llama` (LlamaModel.permute); that is undone here."""
    if cfg.architecture != "llama" or not (".attn_q." in name or ".attn_k." in name):
        return w
    heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
    if w.shape[0] != heads * cfg.head_dim or cfg.head_dim % 2:
        raise CheckpointError(f"{name} has {w.shape[0]} rows, expected {heads} heads x "
                              f"{cfg.head_dim} (an even head_dim)")
    return unpermute_qk(w, heads)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's LlamaModel.permute on q/k rows: `[n_heads * head_dim, ...]`.

    The converter regroups each head's rows from HF's rotate-half order
    (first half, second half) to interleaved pairs; this puts them back.
    """
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# --- KV cache -----------------------------------------------------------------------------------

def cache_entries(cfg: LlamaConfig) -> dict[str, kv.CacheEntry]:
    entry = kv.CacheEntry((cfg.num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"))
    return {"k": entry, "v": entry}


# --- forward ------------------------------------------------------------------------------------

class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear("te,ehd->thd", (E, H, D), ("embed", "heads", "head_dim"),
                             dtype=dtype, rngs=rngs, bias=bias)
        self.k_proj = Linear("te,ekd->tkd", (E, K, D), ("embed", "kv_heads", "head_dim"),
                             dtype=dtype, rngs=rngs, bias=bias)
        self.v_proj = Linear("te,ekd->tkd", (E, K, D), ("embed", "kv_heads", "head_dim"),
                             dtype=dtype, rngs=rngs, bias=bias)
        self.o_proj = Linear("thd,hde->te", (H, D, E), ("heads", "head_dim", "embed"),
                             dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, "head_dim", dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, "head_dim", dtype=dtype, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x: jax.Array, batch: Batch,
                 cache: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)  # [T, H, D], [T, K, D], [T, K, D]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # trace-time constant
        q = apply_rope(q, batch.positions, inv_freq)
        k = apply_rope(k, batch.positions, inv_freq)
        cache = {"k": kv.write(cache["k"], batch.slots, k), "v": kv.write(cache["v"], batch.slots, v)}
        out = paged_attention(q, cache["k"], cache["v"], batch, sm_scale=cfg.head_dim ** -0.5,
                              sliding_window=cfg.sliding_window)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """SwiGLU: hidden -> width -> hidden (the dense layers' MLP, and DeepSeek's shared experts)."""

    def __init__(self, hidden: int, width: int, *, dtype, rngs: nnx.Rngs):
        E, M = hidden, width
        self.gate_proj = Linear("te,em->tm", (E, M), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear("te,em->tm", (E, M), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear("tm,me->te", (M, E), ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block around an attention module and a feed-forward one (the family's own)."""

    def __init__(self, cfg: ModelConfig, attn: nnx.Module, mlp: nnx.Module, *, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)
        self.attn = attn
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)
        self.mlp = mlp

    def __call__(self, x, batch, cache):
        attn_out, cache = self.attn(self.attn_norm(x), batch, cache)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), cache


class Model(nnx.Module):
    """dtype: the compute dtype, which every weight here is declared in (as HF keeps them). The families
    with other layers subclass it (make_attention, make_mlp)."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, self.make_attention(cfg, dtype=dtype, rngs=rngs),
                                             self.make_mlp(cfg, i, dtype=dtype, rngs=rngs), dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear("te,ev->tv", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  dtype=dtype, rngs=rngs, preferred_element_type=jnp.float32)

    @staticmethod
    def make_attention(cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        """A layer's attention (deepseek.py overrides it with MLA)."""
        return Attention(cfg, dtype=dtype, rngs=rngs)

    @staticmethod
    def make_mlp(cfg: LlamaConfig, i: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        """Layer i's feed-forward block (the mixture-of-experts families override it: qwen3_moe.py, mixtral.py,
        deepseek.py)."""
        return MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, batch: Batch, cache: list[dict[str, jax.Array]], feature_layers: tuple[int, ...] = ()):
        """Run one ragged step over the KV cache (per layer: entry -> pages). Returns
        float32 logits [N, V] at batch.logits_indices, and the cache with the step's K/V; with
        `feature_layers`, also the hidden states after those layers at every token, side by side
        [T, len(feature_layers) * hidden] (what a trained draft head reads: jaxinfer/spec_decode/draft_head.py)."""
        x = self.embed(batch.tokens)
        new_cache, features = [], []
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache)):
            x, layer_cache = layer(x, batch, layer_cache)
            new_cache.append(layer_cache)
            if i in feature_layers:
                features.append(x)
        logits = self.head(x[batch.logits_indices])
        if feature_layers:
            return logits, new_cache, jnp.concatenate(features, axis=-1)
        return logits, new_cache

    def head(self, x: jax.Array) -> jax.Array:
        """Float32 logits of hidden states [N, E] (the final norm, then the output head)."""
        x = self.final_norm(x)
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(x, preferred_element_type=jnp.float32)
        return self.lm_head(x)
