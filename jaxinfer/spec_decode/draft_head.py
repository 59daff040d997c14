"""A trained draft head, EAGLE-3 style: one decoder layer over the target's own hidden states proposes.

The target keeps, at every token's K/V slot, its hidden states after a few layers (low, middle, high:
`feature_layers`; ModelRunner's feature pool). The head reads them one position behind:

    row at position q:  x = mix([embed(token q), g])   g = fuse(target features at q - 1)  (catch-up)
                                                        g = the head's own output at q - 1   (extend)
                        h = decoder layer(x)            its K/V in a one-layer page pool of its own
                        next token = argmax(target's head(h))

so its first draft (for position n, after the last known token at n - 1) needs the target's features up
to n - 2, all written by earlier steps, and each further draft feeds the head its own output. The
embedding, final norm and output head are the target's own modules (the same arrays, nothing copied).
Everything else runs as the draft model's proposer does (draft_model.py): catch-up over what the head has
not seen, k - 1 more one-row steps in one executable, one read-back.

A head is a directory: `head.json` (the feature layers and the target shape it was trained for) and
`head.npz` (its own parameters by path). scripts/train_draft_head.py makes one for a model from text the
model generates itself.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import params
from jaxinfer.core.shapes import BatchShape
from jaxinfer.errors import ConfigError
from jaxinfer.layers.linear import Linear
from jaxinfer.models.llama import MLP, Attention, DecoderLayer, LlamaConfig
from jaxinfer.runner.batch import Batch
from jaxinfer.runner.step_inputs import StepInputs, layout
from jaxinfer.spec_decode.draft_model import DraftModelProposer, one_row_batch

FORMAT = 1


class TargetOutput(nnx.Module):
    """The target's own embedding, final norm and output head (its modules: the same arrays)."""

    def __init__(self, model):
        self.embed, self.final_norm = model.embed, model.final_norm
        self.lm_head = getattr(model, "lm_head", None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Float32 logits of hidden states [N, E]."""
        x = self.final_norm(x)
        if self.lm_head is None:  # tied to the embedding
            return self.embed.attend(x, preferred_element_type=jnp.float32)
        return self.lm_head(x)


class DraftHead(nnx.Module):
    def __init__(self, cfg: LlamaConfig, feature_layers: tuple[int, ...], target: TargetOutput, *, dtype,
                 rngs: nnx.Rngs):
        """`cfg`: the target's config (the layer takes its sizes); `target`: the target's output modules."""
        E = cfg.hidden_size
        self.feature_layers = feature_layers = tuple(sorted(set(feature_layers)))  # as the model gives them
        self.fuse = Linear("tf,fe->te", (len(feature_layers) * E, E), (None, "embed"), dtype=dtype, rngs=rngs)
        self.mix = Linear("tf,fe->te", (2 * E, E), (None, "embed"), dtype=dtype, rngs=rngs)
        self.layer = DecoderLayer(cfg, Attention(cfg, dtype=dtype, rngs=rngs),
                                  MLP(E, cfg.intermediate_size, dtype=dtype, rngs=rngs), dtype=dtype, rngs=rngs)
        self.target = target

    def step(self, tokens: jax.Array, g: jax.Array, batch: Batch, cache: dict) -> tuple[jax.Array, dict]:
        """Hidden states [T, E] of rows feeding `tokens` with `g` (fused features or the head's own
        output), their K/V written into `cache` (one layer's entries)."""
        e = self.target.embed(tokens)
        return self.layer(self.mix(jnp.concatenate([e, g.astype(e.dtype)], axis=-1)), batch, cache)


def head_config(target: LlamaConfig) -> LlamaConfig:
    """The head's layer has the target's sizes; one layer (what its page pool holds)."""
    return dataclasses.replace(target, num_layers=1)


def new_head(target_graphdef, target_state, cfg: LlamaConfig, feature_layers, *, dtype, seed: int = 0) -> DraftHead:
    """An untrained head (random parameters) over a target."""
    target = TargetOutput(nnx.merge(target_graphdef, target_state))
    return DraftHead(head_config(cfg), tuple(feature_layers), target, dtype=dtype, rngs=nnx.Rngs(seed))


def own_params(head: DraftHead) -> dict[str, np.ndarray]:
    """The head's trained parameters (not the target's modules), by dotted path."""
    flat = params.flat_params(nnx.state(head, nnx.Param))
    return {".".join(map(str, k)): np.asarray(params.value_of(v)) for k, v in flat.items() if k[0] != "target"}


def set_own_params(head: DraftHead, values: dict[str, np.ndarray]) -> None:
    mine = own_params(head)
    if set(values) != set(mine) or any(np.shape(values[k]) != mine[k].shape for k in mine):
        raise ConfigError("the saved head's parameters are not this head's (head.npz)")
    state = nnx.state(head, nnx.Param)
    flat = params.flat_params(state)
    for k, v in flat.items():
        key = ".".join(map(str, k))
        if key in values:
            flat[k] = v.replace(jnp.asarray(values[key], params.value_of(v).dtype))
    nnx.update(head, nnx.from_flat_state(flat))


def save(head: DraftHead, cfg: LlamaConfig, path: str | pathlib.Path, **info) -> None:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "head.npz", **{k: v.astype(np.float32) for k, v in own_params(head).items()})  # no bf16 in npz
    meta = {"format": FORMAT, "feature_layers": list(head.feature_layers),
            **{k: getattr(cfg, k) for k in _SHAPE}, **info}
    (path / "head.json").write_text(json.dumps(meta, indent=1))


_SHAPE = ("hidden_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


def load(path: str | pathlib.Path, target_graphdef, target_state, cfg: LlamaConfig, dtype) -> DraftHead:
    """A saved head, attached to the target's modules; ConfigError where it does not fit the target."""
    path = pathlib.Path(path)
    if not (path / "head.json").is_file() or not (path / "head.npz").is_file():
        raise ConfigError(f"{path}: not a draft head (head.json and head.npz, as scripts/train_draft_head.py "
                          "saves them)")
    if not isinstance(cfg, LlamaConfig):
        raise ConfigError(f"a draft head runs over the Llama family's models, not {cfg.architecture}")
    meta = json.loads((path / "head.json").read_text())
    wrong = [f"{k} {meta.get(k)} (the target's: {getattr(cfg, k)})" for k in _SHAPE if meta.get(k) != getattr(cfg, k)]
    layers = tuple(meta.get("feature_layers", ()))
    if not layers or any(not 0 <= i < cfg.num_layers for i in layers):
        wrong.append(f"feature layers {list(layers)} (the target has {cfg.num_layers})")
    if wrong:
        raise ConfigError(f"{path}: the draft head was trained for another model: " + "; ".join(wrong))
    head = new_head(target_graphdef, target_state, cfg, layers, dtype=dtype)
    with np.load(path / "head.npz", allow_pickle=False) as saved:
        set_own_params(head, dict(saved))
    return head


class DraftHeadProposer(DraftModelProposer):
    """The draft model's proposer with a head for a model (module docstring). `runner` holds the head's
    graph and state and its one-layer page pool; `features` gives the target's feature pool now."""

    def __init__(self, runner, features, **kw):
        self.features = features  # () -> the target runner's feature pool (a new array after each step)
        self.hidden_size = runner.cfg.hidden_size
        super().__init__(runner, **kw)

    def _new_carry(self):
        return (np.zeros(self.max_queries, np.int32), np.zeros((self.max_queries, self.hidden_size), np.float32))

    def _inputs(self) -> tuple:
        return (self.features(),)

    def _head(self, state) -> DraftHead:
        return nnx.merge(self.runner.graphdef, state)

    def _catch_up_fn(self, state, cache, carry, buf, features, *, shape: BatchShape):
        first, hidden = carry
        n, Q = layout(shape, 1).size, self.max_queries
        batch, _ = StepInputs(buf[:n], shape, 1).unpack()
        last, ends = buf[n:n + Q], buf[n + Q:] != 0
        head = self._head(state)
        with self.runner.attention_context():
            h, layer = head.step(batch.tokens, head.fuse(_features_before(features, batch)), batch, cache[0])
        h_last = h[last]
        token = jnp.argmax(head.target(h_last), -1).astype(jnp.int32)
        return (jnp.where(ends, token, first), jnp.where(ends[:, None], h_last.astype(hidden.dtype), hidden)), [layer]

    def _extend_fn(self, state, cache, carry, buf, out):
        first, hidden = carry
        S, ps = out.shape[0], self.page_size
        positions, pages = buf[:S], buf[S:].reshape(S, self.pages_per_seq)
        head = self._head(state)
        token, g = first[:S], hidden[:S]
        drafts, layer = [token], cache[0]
        for i in range(self.k - 1):
            with self.runner.attention_context():
                g, layer = head.step(token, g, one_row_batch(token, positions + i, pages, ps, self.block_q), layer)
            token = jnp.argmax(head.target(g), -1).astype(jnp.int32)
            drafts.append(token)
        return jax.lax.dynamic_update_slice(out, jnp.stack(drafts, axis=1), (0, 0)), [layer]


def _features_before(features: jax.Array, batch: Batch) -> jax.Array:
    """The target's features at each token's previous position [T, F] (zeros at position 0), read from the
    pool at the slot the target wrote them to: the token's sequence's page there."""
    num_pages, ps, F = features.shape
    T, S = batch.tokens.shape[0], batch.kv_lens.shape[0]
    seq = jnp.clip(jnp.searchsorted(batch.cu_q_lens, jnp.arange(T), side="right") - 1, 0, S - 1)
    prev = batch.positions - 1
    p = jnp.maximum(prev, 0)
    slots = batch.page_table[seq, p // ps] * ps + p % ps
    return jnp.where((prev >= 0)[:, None], features.reshape(num_pages * ps, F)[slots], 0)
