"""Expert tensors as HF checkpoints store them, onto one stacked tensor per layer and projection.

Checkpoints hold routed experts either one tensor per expert
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, [out, in] each: DeepSeek, Qwen3-MoE;
Mixtral's `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`) or fused, as transformers 5 writes them
(`mlp.experts.gate_up_proj` [X, 2 I, E] and `mlp.experts.down_proj` [X, E, I]). `stack_experts` turns
either into `{prefix}.experts.{gate,up,down}_proj` [X, out, in] as the tensors stream by, holding a
layer's per-expert tensors only until its last expert has come.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np

from jaxinfer.errors import CheckpointError

_PER_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(\w+)\.weight")
_FUSED = re.compile(r"(.+\.experts)\.(gate_up_proj|down_proj)")
MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def stack_experts(tensors: Iterable[tuple[str, np.ndarray]], num_experts: int
                  ) -> Iterator[tuple[str, np.ndarray]]:
    pending: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, t in tensors:
        m = _PER_EXPERT.fullmatch(name)
        if m is not None:
            prefix, e, proj = m.group(1), int(m.group(2)), MIXTRAL_NAMES.get(m.group(3), m.group(3))
            if e >= num_experts:
                raise CheckpointError(f"tensor {name!r} is for expert {e}, but the config has {num_experts}")
            got = pending.setdefault((prefix, proj), {})
            got[e] = np.asarray(t)
            if len(got) == num_experts:
                del pending[(prefix, proj)]
                yield f"{prefix}.{proj}", np.stack([got[i] for i in range(num_experts)])
            continue
        m = _FUSED.fullmatch(name)
        if m is not None:
            t = np.asarray(t)
            if m.group(2) == "down_proj":
                yield f"{m.group(1)}.down_proj", t
            else:  # [X, 2 I, E]: gate's rows, then up's
                if t.ndim != 3 or t.shape[1] % 2:
                    raise CheckpointError(f"tensor {name!r} has shape {t.shape}: expected [experts, 2 x width, "
                                          "hidden]")
                half = t.shape[1] // 2
                yield f"{m.group(1)}.gate_proj", t[:, :half]
                yield f"{m.group(1)}.up_proj", t[:, half:]
            continue
        yield name, t
    if pending:
        (prefix, proj), got = next(iter(pending.items()))
        missing = sorted(set(range(num_experts)) - set(got))
        raise CheckpointError(f"checkpoint lacks {prefix}.{{{', '.join(map(str, missing[:5]))}}}.{proj} "
                              f"({len(missing)} of {num_experts} experts)")


def hf_tensors(cfg, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """A family's `hf_tensors` (jaxinfer/models/base.py): its expert tensors stacked, `cfg.num_experts` each."""
    return stack_experts(tensors, cfg.num_experts)


def moe_param(rest: str, t: np.ndarray, block: str) -> tuple[tuple, np.ndarray] | None:
    """A layer's router or stacked expert tensor (`rest`: its name after `model.layers.{i}.`; `block`: the
    MoE module's HF name, "mlp" or Mixtral's "block_sparse_moe") -> (path within the layer, our layout);
    None for other tensors."""
    if rest == f"{block}.gate.weight":
        return ("mlp", "router", "weight"), t.T
    if rest == f"{block}.gate.e_score_correction_bias":
        return ("mlp", "router", "bias"), t
    for p in ("gate_proj", "up_proj", "down_proj"):
        if rest == f"{block}.experts.{p}":
            return ("mlp", "experts", p), t.transpose(0, 2, 1)  # stacked [X, out, in] -> [X, in, out]
    return None


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def layer_moe_param(cfg, name: str, t: np.ndarray, block: str) -> tuple[tuple, np.ndarray] | None:
    """`moe_param` for a full HF name (`model.layers.{i}.{rest}`): the parameter path from the model's root."""
    m = _LAYER.fullmatch(name)
    got = None if m is None else moe_param(m.group(2), t, block)
    if got is None:
        return None
    i = int(m.group(1))
    if i >= cfg.num_layers:
        raise CheckpointError(f"tensor {name!r} is for layer {i}, but the config has {cfg.num_layers} layers")
    return ("layers", i, *got[0]), got[1]
