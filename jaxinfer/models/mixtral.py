"""The Mixtral family (Mixtral 8x7B, 8x22B): Mistral's attention (GQA, a sliding window where the config sets
one) with a mixture of experts in every layer: softmax routing, top-k, always renormalized.

Everything but the feed-forward block is llama.py's; checkpoints name the block `block_sparse_moe` and its
experts' projections w1 (gate), w3 (up) and w2 (down).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from jaxinfer.layers.moe import MoE, Routing
from jaxinfer.models import llama, moe_names

ARCHITECTURES = ("mixtral",)
HF_ARCHITECTURES = {"MixtralForCausalLM": "mixtral"}
GGUF_ARCHITECTURES = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixtralConfig(llama.LlamaConfig):
    num_experts: int
    num_experts_per_tok: int

    def problems(self) -> list[str]:
        return super().problems() + self.routing().problems()

    def routing(self) -> Routing:
        return Routing(num_experts=self.num_experts, top_k=self.num_experts_per_tok, norm_topk=True)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], architecture: str) -> MixtralConfig:
        base = llama.LlamaConfig.from_hf(hf, "mistral")
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        return cls(**{**fields, "architecture": architecture}, num_experts=int(hf["num_local_experts"]),
                   num_experts_per_tok=int(hf["num_experts_per_tok"]))


Config = MixtralConfig
cache_entries = llama.cache_entries


hf_tensors = moe_names.hf_tensors


def hf_param(cfg: MixtralConfig, name: str, t: np.ndarray):
    """The router and experts here (under `block_sparse_moe`, or `mlp` as transformers 5 names it), the
    rest as llama.py names them."""
    return (moe_names.layer_moe_param(cfg, name, t, "block_sparse_moe")
            or moe_names.layer_moe_param(cfg, name, t, "mlp") or llama.hf_param(cfg, name, t))


class Model(llama.Model):
    @staticmethod
    def make_mlp(cfg: MixtralConfig, i: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        return MoE(cfg.hidden_size, cfg.intermediate_size, cfg.routing(), dtype=dtype, rngs=rngs)
