"""The DeepSeek family: DeepSeek-V2 / V2-Lite, V3 / R1 and the models of their shape (Kimi-K2, Moonlight).

Multi-head latent attention (MLA) and a mixture of experts. Config switches: `q_lora_rank` None (V2-Lite:
one q projection) or set (a low-rank q through its own norm); YaRN rope scaling, whose mscale also scales the
softmax; V2's softmax routing ("greedy" or "group_limited_greedy") and V3's sigmoid routing with
`e_score_correction_bias` ("noaux_tc"); group-limited top-k; `routed_scaling_factor`, `norm_topk_prob`;
shared experts; dense layers first (`first_k_dense_replace`) and every `moe_layer_freq`-th layer after.

MLA keeps one entry per token in each layer's paged cache, `latent` [1, kv_lora_rank + qk_rope_head_dim]:
the normalized compressed KV and the roped key, 576 values at the V2/V3 shapes, the format's minimum. The
attention is the absorbed form, as runtime einsums (the weights stay as the checkpoint has them):
q_nope . W_UK gives a query in the latent space, then one MQA over the latent pages (keys: the whole entry;
values: its first kv_lora_rank; layers/attention.mla_attention, the TPU kernel in pallas_kernels/mla_attention),
then W_UV and o_proj.

Checkpoints: HF safetensors (experts per expert or fused) and llama.cpp's `deepseek2` GGUF files (kv_b whole,
or split into k_b and v_b as newer converters write it).

Shapes: T tokens, E hidden, H heads, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, L kv_lora_rank,
X routed experts, I an expert's width.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.layers import kv
from jaxinfer.layers.attention import mla_attention
from jaxinfer.layers.linear import Linear, einsum, project
from jaxinfer.layers.moe import MoE, Routing
from jaxinfer.layers.norm import RMSNorm
from jaxinfer.layers.param import param
from jaxinfer.layers.rope import RopeScaling, apply_rope, rope_attention_factor, rope_inv_freq, yarn_mscale
from jaxinfer.models import llama, moe_names
from jaxinfer.models.base import ModelConfig, hf_common
from jaxinfer.runner.batch import Batch

ARCHITECTURES = ("deepseek_v2", "deepseek_v3", "deepseek2")
HF_ARCHITECTURES = {"DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}
GGUF_ARCHITECTURES = ("deepseek2",)  # llama.cpp's name for V2 and V3 alike

TOPK_METHODS = {"greedy": "max", "group_limited_greedy": "max", "noaux_tc": "top2_sum"}  # -> group score


# --- config -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepseekConfig(ModelConfig):
    intermediate_size: int  # the dense layers' MLP
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True  # the rope dimensions in pairs (2i, 2i + 1), as DeepSeek's checkpoints hold them
    # Experts
    num_experts: int = 0  # routed; 0: every layer dense
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    POSITIVE = ModelConfig.POSITIVE + ("intermediate_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                                       "qk_rope_head_dim", "v_head_dim")

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.topk_method not in TOPK_METHODS:
            problems.append(f"topk_method {self.topk_method!r} is not supported (expected one of "
                            f"{', '.join(TOPK_METHODS)})")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even")
        if self.num_experts:
            if self.moe_intermediate_size <= 0:
                problems.append("moe_intermediate_size must be positive with routed experts")
            if self.moe_layer_freq < 1:
                problems.append(f"moe_layer_freq must be positive, got {self.moe_layer_freq}")
            if self.topk_method in TOPK_METHODS:
                problems += self.routing().problems()
        return problems

    def routing(self) -> Routing:
        return Routing(num_experts=self.num_experts, top_k=self.num_experts_per_tok, scoring=self.scoring_func,
                       norm_topk=self.norm_topk_prob, scale=self.routed_scaling_factor,
                       n_group=self.n_group if self.topk_method != "greedy" else 1,
                       topk_group=self.topk_group if self.topk_method != "greedy" else 1,
                       group_score=TOPK_METHODS.get(self.topk_method, "max"),
                       bias=self.topk_method == "noaux_tc")

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.num_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """1 / sqrt(N + R), times yarn's mscale squared where the scaling sets mscale_all_dim (as HF)."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        s = self.rope_scaling
        if s is not None and s.kind == "yarn" and s.mscale_all_dim:
            scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
        return scale

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeepseekConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return super().from_dict(d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], architecture: str) -> DeepseekConfig:
        q_lora = hf.get("q_lora_rank")
        v3 = architecture == "deepseek_v3"
        return cls(
            architecture=architecture,
            **hf_common(hf),
            intermediate_size=int(hf["intermediate_size"]),
            num_heads=int(hf["num_attention_heads"]),
            kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]),
            q_lora_rank=int(q_lora) if q_lora else None,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
            rope_scaling=_hf_rope_scaling(hf),
            rope_interleave=bool(hf.get("rope_interleave", True)) if v3 else True,  # V2: always pairs
            num_experts=int(hf.get("n_routed_experts") or 0),
            num_experts_per_tok=int(hf.get("num_experts_per_tok") or 1),
            moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0),
            num_shared_experts=int(hf.get("n_shared_experts") or 0),
            first_k_dense_replace=int(hf.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(hf.get("moe_layer_freq") or 1),
            scoring_func=str(hf.get("scoring_func") or ("sigmoid" if v3 else "softmax")),
            topk_method=str(hf.get("topk_method") or ("noaux_tc" if v3 else "greedy")),
            n_group=int(hf.get("n_group") or 1),
            topk_group=int(hf.get("topk_group") or 1),
            # V2 never renormalizes (HF's DeepseekV2 ignores the field), V3 as the config says
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)) if v3 else False,
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        )


    @classmethod
    def from_gguf(cls, f) -> DeepseekConfig:
        """From llama.cpp's `deepseek2` metadata (its converter writes MLA as MQA: key_length is
        kv_lora_rank + rope, key_length_mla the per-head q/k width, value_length_mla v_head_dim)."""
        md, arch = f.metadata, f.architecture

        def get(key: str, default: Any = KeyError) -> Any:
            full = f"{arch}.{key}"
            if full in md:
                return md[full]
            if default is KeyError:
                raise ConfigError(f"{f.path}: GGUF metadata lacks {full!r}")
            return default

        rope = int(get("rope.dimension_count"))
        q_lora = get("attention.q_lora_rank", None)
        sigmoid = int(get("expert_gating_func", 1)) == 2  # llama.cpp: 1 softmax, 2 sigmoid
        groups = int(get("expert_group_count", 1))
        scaling = None
        if get("rope.scaling.type", None) == "yarn":
            mscale = float(get("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1  # written as 0.1 * mscale_all_dim
            scaling = RopeScaling(kind="yarn", factor=float(get("rope.scaling.factor")),
                                  original_max_position_embeddings=int(get("rope.scaling.original_context_length")),
                                  mscale=mscale, mscale_all_dim=mscale)
        vocab = get("vocab_size", None) or len(md.get("tokenizer.ggml.tokens") or ()) or \
            f.tensor_shape("token_embd.weight")[0]
        bos, eos = md.get("tokenizer.ggml.bos_token_id"), md.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch, vocab_size=int(vocab), hidden_size=int(get("embedding_length")),
            num_layers=int(get("block_count")), max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in f.tensors,
            bos_token_id=None if bos is None else int(bos), eos_token_ids=() if eos is None else (int(eos),),
            intermediate_size=int(get("feed_forward_length")), num_heads=int(get("attention.head_count")),
            kv_lora_rank=int(get("attention.kv_lora_rank")),
            qk_nope_head_dim=int(get("attention.key_length_mla")) - rope, qk_rope_head_dim=rope,
            v_head_dim=int(get("attention.value_length_mla")),
            q_lora_rank=int(q_lora) if q_lora else None,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
            num_experts=int(get("expert_count", 0)), num_experts_per_tok=int(get("expert_used_count", 1)),
            moe_intermediate_size=int(get("expert_feed_forward_length", 0)),
            num_shared_experts=int(get("expert_shared_count", 0)),
            first_k_dense_replace=int(get("leading_dense_block_count", 0)),
            scoring_func="sigmoid" if sigmoid else "softmax",
            topk_method="noaux_tc" if sigmoid else ("group_limited_greedy" if groups > 1 else "greedy"),
            n_group=groups, topk_group=int(get("expert_group_used_count", groups)),
            norm_topk_prob=bool(get("expert_weights_norm", False)),
            routed_scaling_factor=float(get("expert_weights_scale", 1.0)))


Config = DeepseekConfig


def _hf_rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    kind = (rs or {}).get("rope_type") or (rs or {}).get("type")
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"unsupported rope scaling {kind!r} for a DeepSeek model: jaxinfer supports yarn")
    return RopeScaling(
        kind="yarn", factor=float(rs["factor"]),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings")
                                              or hf.get("max_position_embeddings", 4096)),
        beta_fast=float(rs.get("beta_fast") or 32.0), beta_slow=float(rs.get("beta_slow") or 1.0),
        mscale=float(rs.get("mscale") or 0.0), mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0),
        attention_factor=None if rs.get("attention_factor") is None else float(rs["attention_factor"]),
        truncate=bool(rs.get("truncate", True)))


# --- weight names -------------------------------------------------------------------------------

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_tensors(cfg: DeepseekConfig, tensors):
    """Per-expert tensors stacked into one per layer and projection (moe_names); a GGUF's split
    `k_b_proj` and `v_b_proj` (see gguf_to_hf) joined back into kv_b_proj."""
    return _join_kv_b(cfg, moe_names.hf_tensors(cfg, tensors))


def _join_kv_b(cfg: DeepseekConfig, tensors):
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, t in tensors:
        if not name.endswith(("self_attn.k_b_proj.weight", "self_attn.v_b_proj.weight")):
            yield name, t
            continue
        prefix, part = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        got = halves.setdefault(prefix, {})
        got[part] = np.asarray(t)
        if len(got) == 2:  # [H, N, L] and [H, V, L] -> HF's [H * (N + V), L]
            del halves[prefix]
            kv_b = np.concatenate([got["k_b_proj"], got["v_b_proj"]], axis=1)
            yield f"{prefix}.kv_b_proj.weight", kv_b.reshape(-1, kv_b.shape[-1])
    if halves:
        raise CheckpointError(f"checkpoint has only one of k_b_proj and v_b_proj for {next(iter(halves))}")


def hf_param(cfg: DeepseekConfig, name: str, t: np.ndarray) -> tuple[tuple, np.ndarray] | None:
    """One HF tensor -> (parameter path, array in our layout); None for tensors we drop."""
    E, H = cfg.hidden_size, cfg.num_heads
    N, R, V, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "model.embed_tokens.weight":
        return ("embed", "weight"), t
    if name == "lm_head.weight":
        return None if cfg.tie_word_embeddings else (("lm_head", "weight"), t.T)
    if name == "model.norm.weight":
        return ("final_norm", "scale"), t
    m = _HF_LAYER.fullmatch(name)
    if m is None:
        raise CheckpointError(f"unexpected tensor {name!r} for a {cfg.architecture} model")
    i, rest = int(m.group(1)), m.group(2)
    if i >= cfg.num_layers:
        if i == cfg.num_layers:  # V3's multi-token-prediction layer: not run here (yet)
            return None
        raise CheckpointError(f"tensor {name!r} is for layer {i}, but the config has {cfg.num_layers} layers")
    table = {
        "input_layernorm.weight": (("attn_norm", "scale"), lambda: t),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), lambda: t),
        "self_attn.q_proj.weight": (("attn", "q_proj", "weight"), lambda: t.reshape(H, N + R, E).transpose(2, 0, 1)),
        "self_attn.q_a_proj.weight": (("attn", "q_a_proj", "weight"), lambda: t.T),
        "self_attn.q_a_layernorm.weight": (("attn", "q_a_norm", "scale"), lambda: t),
        "self_attn.q_b_proj.weight": (("attn", "q_b_proj", "weight"),
                                      lambda: t.reshape(H, N + R, -1).transpose(2, 0, 1)),
        "self_attn.kv_a_proj_with_mqa.weight": (("attn", "kv_a_proj", "weight"), lambda: t.T),
        "self_attn.kv_a_layernorm.weight": (("attn", "kv_a_norm", "scale"), lambda: t),
        "self_attn.kv_b_proj.weight": (("attn", "kv_b_proj"), lambda: t.reshape(H, N + V, L).transpose(2, 0, 1)),
        "self_attn.o_proj.weight": (("attn", "o_proj", "weight"), lambda: t.reshape(E, H, V).transpose(1, 2, 0)),
    }
    for p in ("gate_proj", "up_proj", "down_proj"):
        table[f"mlp.{p}.weight"] = (("mlp", p, "weight"), lambda: t.T)
        table[f"mlp.shared_experts.{p}.weight"] = (("mlp", "shared", p, "weight"), lambda: t.T)
    routed = moe_names.moe_param(rest, t, "mlp")
    if routed is not None:
        return ("layers", i, *routed[0]), routed[1]
    if rest not in table:
        raise CheckpointError(f"unexpected tensor {name!r} for a {cfg.architecture} model")
    path, fn = table[rest]
    try:
        return ("layers", i, *path), fn()
    except ValueError:
        raise CheckpointError(f"tensor {name!r} has shape {t.shape}, which does not fit the config") from None


_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight", "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight", "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    # llama.cpp's newer files split kv_b into k_b ([H, L, N]: transposed) and v_b ([H, V, L]); joined in hf_tensors
    "attn_k_b.weight": "self_attn.k_b_proj.weight", "attn_v_b.weight": "self_attn.v_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    # stacked [X, out, in] already
    "ffn_gate_exps.weight": "mlp.experts.gate_proj", "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_hf_name(name: str) -> str | None:
    """HF name for a `deepseek2` GGUF tensor name; KeyError if unknown."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{int(m.group(1))}.{_GGUF_LAYER[m.group(2)]}"
    raise KeyError(name)


def gguf_to_hf(cfg: DeepseekConfig, name: str, w: np.ndarray) -> np.ndarray:
    """k_b comes transposed per head ([H, L, N]); back to [H, N, L]. The rest is in HF layout (llama.cpp
    permutes nothing for deepseek2: its rope pairs are DeepSeek's interleaved ones)."""
    if name.endswith("attn_k_b.weight"):
        if w.ndim != 3 or w.shape[1] != cfg.kv_lora_rank:
            raise CheckpointError(f"{name} has shape {w.shape}, expected [heads, {cfg.kv_lora_rank}, "
                                  f"{cfg.qk_nope_head_dim}]")
        return np.ascontiguousarray(w.transpose(0, 2, 1))
    return w


# --- KV cache -----------------------------------------------------------------------------------

def cache_entries(cfg: DeepseekConfig) -> dict[str, kv.CacheEntry]:
    # Pages split over the tensor axis by sequence: data-parallel attention (layers/attention.mla_attention).
    return {"latent": kv.CacheEntry((1, cfg.kv_lora_rank + cfg.qk_rope_head_dim), (None, None),
                                    pages_axis="seq_pages")}


# --- forward ------------------------------------------------------------------------------------

class Attention(nnx.Module):
    """MLA, absorbed: see the module docstring."""

    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs):
        E, H = cfg.hidden_size, cfg.num_heads
        N, R, V, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = Linear("te,ehd->thd", (E, H, N + R), ("embed", "heads", None), dtype=dtype, rngs=rngs)
        else:
            Q = cfg.q_lora_rank
            self.q_a_proj = Linear("te,eq->tq", (E, Q), ("embed", None), dtype=dtype, rngs=rngs)
            self.q_a_norm = RMSNorm(Q, cfg.rms_norm_eps, None, dtype=dtype, rngs=rngs)
            self.q_b_proj = Linear("tq,qhd->thd", (Q, H, N + R), (None, "heads", None), dtype=dtype, rngs=rngs)
        self.kv_a_proj = Linear("te,ec->tc", (E, L + R), ("embed", None), dtype=dtype, rngs=rngs)
        self.kv_a_norm = RMSNorm(L, cfg.rms_norm_eps, None, dtype=dtype, rngs=rngs)
        # [L, H, N + V]: W_UK and W_UV side by side, read by the absorbed einsums (not a projection of x).
        self.kv_b_proj = param(rngs, (L, H, N + V), (None, "heads", None), dtype)
        self.o_proj = Linear("thd,hde->te", (H, V, E), ("heads", None, "embed"), dtype=dtype, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x: jax.Array, batch: Batch, cache: dict[str, jax.Array]):
        cfg = self.cfg
        N, L = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        # The projections that read x share one launch where they can (linear.project).
        if cfg.q_lora_rank is None:
            q, ckv = project(x, self.q_proj, self.kv_a_proj)  # [T, H, N + R], [T, L + R]
        else:
            q_a, ckv = project(x, self.q_a_proj, self.kv_a_proj)
            q = self.q_b_proj(self.q_a_norm(q_a))
        latent, k_pe = self.kv_a_norm(ckv[:, :L]), ckv[:, L:]
        inv_freq = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        rope = dict(interleaved=cfg.rope_interleave, attention_factor=rope_attention_factor(cfg.rope_scaling))
        q_pe = apply_rope(q[..., N:], batch.positions, inv_freq, **rope)
        k_pe = apply_rope(k_pe[:, None, :], batch.positions, inv_freq, **rope)
        entry = jnp.concatenate([latent[:, None, :], k_pe.astype(latent.dtype)], axis=-1)  # [T, 1, L + R]
        cache = {"latent": kv.write(cache["latent"], batch.slots, entry)}
        w = self.kv_b_proj[...]
        q_latent = einsum("thn,lhn->thl", q[..., :N], w[..., :N])
        query = jnp.concatenate([q_latent, q_pe.astype(q_latent.dtype)], axis=-1)  # [T, H, L + R]
        out = mla_attention(query, cache["latent"], batch, value_dim=L, sm_scale=cfg.softmax_scale)  # [T, H, L]
        values = einsum("thl,lhv->thv", out, w[..., N:])
        return self.o_proj(values), cache


class Model(llama.Model):
    """llama.Model's embedding, residual layers and head, with MLA and the experts in the layers."""

    @staticmethod
    def make_attention(cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        return Attention(cfg, dtype=dtype, rngs=rngs)

    @staticmethod
    def make_mlp(cfg: DeepseekConfig, i: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        E, I = cfg.hidden_size, cfg.moe_intermediate_size  # noqa: E741
        if not cfg.is_moe_layer(i):
            return llama.MLP(E, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        shared = llama.MLP(E, I * cfg.num_shared_experts, dtype=dtype, rngs=rngs) if cfg.num_shared_experts else None
        return MoE(E, I, cfg.routing(), shared=shared, dtype=dtype, rngs=rngs)
