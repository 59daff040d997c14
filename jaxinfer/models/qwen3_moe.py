"""The Qwen3-MoE family (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (GQA, q/k RMSNorm) with a mixture
of experts in place of the MLP: softmax routing, top-k, renormalized where `norm_topk_prob`, no shared
experts. Layers in `mlp_only_layers`, and those off the `decoder_sparse_step` stride, keep a dense MLP.

Everything but the feed-forward block is llama.py's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from jaxinfer.layers.moe import MoE, Routing
from jaxinfer.models import llama, moe_names

ARCHITECTURES = ("qwen3_moe",)
HF_ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe"}
GGUF_ARCHITECTURES = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(llama.LlamaConfig):
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.decoder_sparse_step < 1:
            problems.append(f"decoder_sparse_step must be positive, got {self.decoder_sparse_step}")
        return problems + self.routing().problems()

    def routing(self) -> Routing:
        return Routing(num_experts=self.num_experts, top_k=self.num_experts_per_tok, norm_topk=self.norm_topk_prob)

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen3MoeConfig:
        d = dict(d)
        d["mlp_only_layers"] = tuple(d.get("mlp_only_layers") or ())
        return super().from_dict(d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], architecture: str) -> Qwen3MoeConfig:
        base = llama.LlamaConfig.from_hf(hf, "qwen3")  # q/k norm, no window unless asked
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        return cls(**{**fields, "architecture": architecture},
                   num_experts=int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]),
                   num_experts_per_tok=int(hf["num_experts_per_tok"]),
                   moe_intermediate_size=int(hf["moe_intermediate_size"]),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                   decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
                   mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()))


Config = Qwen3MoeConfig
cache_entries = llama.cache_entries


hf_tensors = moe_names.hf_tensors


def hf_param(cfg: Qwen3MoeConfig, name: str, t: np.ndarray):
    """The router and experts here, the rest as llama.py names them."""
    return moe_names.layer_moe_param(cfg, name, t, "mlp") or llama.hf_param(cfg, name, t)


class Model(llama.Model):
    @staticmethod
    def make_mlp(cfg: Qwen3MoeConfig, i: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        if cfg.is_moe_layer(i):
            return MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.routing(), dtype=dtype, rngs=rngs)
        return llama.MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
