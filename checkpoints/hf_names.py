"""HF transformers tensor names and layouts -> our parameter paths and layouts.

Every reader (safetensors, GGUF) yields tensors under their HF names in HF
layout (Linear weights [out, in]); this one table turns them into the model's
parameters ([in, ...out] einsum layouts, heads split out).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError

Path = tuple  # a parameter path as in nnx.to_flat_state, e.g. ("layers", 0, "attn", "q_proj")

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def convert(cfg: ModelConfig, name: str, t: np.ndarray) -> tuple[Path, np.ndarray] | None:
    """One HF tensor -> (our path, array in our layout); None for tensors we drop."""
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if _IGNORED.match(name):
        return None
    if name == "model.embed_tokens.weight":
        return ("embed",), t
    if name == "lm_head.weight":
        return None if cfg.tie_word_embeddings else (("lm_head",), t.T)
    if name == "model.norm.weight":
        return ("final_norm", "scale"), t
    m = _LAYER.fullmatch(name)
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
        "self_attn.o_proj.weight": (("attn", "o_proj"), lambda: t.reshape(E, H, D).transpose(1, 2, 0)),
        "self_attn.q_norm.weight": (("attn", "q_norm", "scale"), lambda: t),
        "self_attn.k_norm.weight": (("attn", "k_norm", "scale"), lambda: t),
        "mlp.gate_proj.weight": (("mlp", "gate_proj"), lambda: t.T),
        "mlp.up_proj.weight": (("mlp", "up_proj"), lambda: t.T),
        "mlp.down_proj.weight": (("mlp", "down_proj"), lambda: t.T),
    }
    for p in "qkv":
        table[f"self_attn.{p}_proj.weight"] = (
            ("attn", f"{p}_proj"), lambda n=heads[p]: t.reshape(n, D, E).transpose(2, 0, 1))
        table[f"self_attn.{p}_proj.bias"] = (("attn", f"{p}_bias"), lambda n=heads[p]: t.reshape(n, D))
    if rest not in table:
        raise CheckpointError(f"unexpected tensor {name!r} for a {cfg.architecture} model")
    path, fn = table[rest]
    try:
        return ("layers", i, *path), fn()
    except ValueError:
        raise CheckpointError(f"tensor {name!r} has shape {t.shape}, which does not fit the "
                              "config (hidden size, heads, head_dim)") from None


def convert_all(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]]
                ) -> Iterator[tuple[Path, np.ndarray]]:
    for name, t in tensors:
        converted = convert(cfg, name, np.asarray(t))
        if converted is not None:
            yield converted
