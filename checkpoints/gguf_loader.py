"""Read a Llama-family GGUF file: metadata -> ModelConfig, tensors -> HF-named float32 arrays.

`open_gguf` wraps `gguf.GGUFReader` (which mmaps the file) and turns every way a
file can be unreadable into a `CheckpointError` naming the file. `gguf_model_config`
maps the `{arch}.*` metadata onto `jaxinfer.config.ModelConfig`; `gguf_hf_tensors`
dequantizes each tensor and yields it under its transformers name and layout, with
llama.cpp's Q/K row permutation (architecture `llama` only) undone.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import re
from typing import Any, Iterator

import numpy as np
from gguf import GGUFReader, GGUFValueType

from checkpoints.gguf_quants import dequantize_tensor, qtype_name
from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.errors import CheckpointError, ConfigError

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor name -> HF name. `{i}` is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
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
# Present in llama.cpp files but not HF weights: llama3 rope factors (read into the config).
_SKIPPED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


class _FastReader(GGUFReader):
    """GGUFReader whose small reads slice a plain ndarray view of the mmap.

    Slicing the `np.memmap` itself runs memmap's Python `__array_finalize__` on each
    of the ~250k metadata reads of a 50k-token vocabulary; the plain view is ~4x faster.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


# Use the fast path only while gguf-py's private `_get` keeps the signature it overrides.
_Reader = _FastReader if list(inspect.signature(GGUFReader._get).parameters) == [
    "self", "offset", "dtype", "count", "override_order"] else GGUFReader


class GGUFFile:
    """An opened GGUF file.

    path: the file; architecture: `general.architecture`; metadata: key -> plain
    Python value (str, int, float, bool, list); tensors: name -> `gguf.ReaderTensor`.
    """

    def __init__(self, path: pathlib.Path, reader: GGUFReader):
        self.path = path
        self.reader = reader
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):  # version and counts, not metadata
                self.metadata[key] = _field_value(field)
        self.tensors = {t.name: t for t in reader.tensors}
        self.architecture: str | None = self.metadata.get("general.architecture")

    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    @property
    def tensor_types(self) -> dict[str, str]:
        """Tensor name -> GGML type name ("Q4_1", "F32", ...)."""
        return {name: qtype_name(t.tensor_type) for name, t in self.tensors.items()}

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Logical numpy shape of a tensor (GGUF `ne` reversed): [out, in] for a Linear."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, architecture={self.architecture!r}, tensors={len(self)})"

    def close(self) -> None:
        """Drop the mmap (arrays already yielded are copies and stay valid)."""
        self.tensors = {}
        self.reader = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _field_value(field) -> Any:
    """A GGUF metadata field as a plain Python value (strings decoded as UTF-8)."""
    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="surrogateescape")
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1] if len(field.types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape")
                    for i in field.data]
        if sub == GGUFValueType.ARRAY:  # nested arrays: rare; keep gguf-py's flattening
            return field.contents()
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    value = field.parts[-1].tolist()[0]
    if kind == GGUFValueType.FLOAT32:  # shortest decimal that round-trips: 1e-05, not 9.99e-06
        value = float(str(np.float32(value)))
    return value


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; any unreadable file raises CheckpointError."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if len(head) < len(GGUF_MAGIC):
        raise CheckpointError(f"{path} is not a GGUF file: it is only {size} bytes long")
    if head != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {head!r}, "
                              f"not the magic {GGUF_MAGIC!r}")
    try:
        reader = _Reader(path, "r")
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/... on bad bytes
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes): the GGUF "
                              f"reader failed with {type(e).__name__}: {e}") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                                  f"offset {end}, but the file has {size}")
    try:
        return GGUFFile(path, reader)
    except Exception as e:
        raise CheckpointError(f"{path} has corrupt metadata: {type(e).__name__}: {e}") from None


# --- config -----------------------------------------------------------------------------

def gguf_model_config(f: GGUFFile) -> ModelConfig:
    """ModelConfig from the file's `{arch}.*` and `tokenizer.ggml.*` metadata."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}: jaxinfer supports "
                          f"{', '.join(ARCHITECTURES)}")
    try:
        return _config_from_metadata(f, arch)
    except (TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"{f.path}: malformed GGUF metadata: {e}") from None


def _config_from_metadata(f: GGUFFile, arch: str) -> ModelConfig:
    md = f.metadata

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
    return ModelConfig(
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
        rope_scaling=_rope_scaling(f, arch, head_dim),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        qk_norm=arch == "qwen3",
        sliding_window=int(window) if window else None,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int) -> RopeScaling | None:
    """Rope scaling from metadata; llama3 scaling is recovered from `rope_freqs.weight`.

    llama.cpp stores Llama-3.1 scaling as per-frequency divisors (rope_freqs.weight,
    [head_dim/2]): 1 for high frequencies, `factor` for low ones, and
    1 / ((1 - s) / factor + s) between, where s = (old_ctx / wavelen - low) / (high - low)
    is linear in 1/wavelen. With old_ctx from metadata (default 8192), the two
    smoothing factors follow from that line; the result is checked against the tensor.
    """
    md = f.metadata
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    orig_ctx = md.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in f.tensors:
        freqs = dequantize_tensor(f.tensors["rope_freqs.weight"]).astype(np.float64).reshape(-1)
        if np.allclose(freqs, 1.0):
            return None
        theta = float(md.get(f"{arch}.rope.freq_base", 10000.0))
        dim = int(md.get(f"{arch}.rope.dimension_count", head_dim))
        return _llama3_from_factors(f.path, freqs, theta, dim, int(orig_ctx or 8192))
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(factor))
    raise ConfigError(f"{f.path}: unsupported rope scaling {kind!r}: jaxinfer supports "
                      "llama3 and linear")


def llama3_rope_factors(s: RopeScaling, theta: float, dim: int) -> np.ndarray:
    """The per-frequency divisors `[dim/2]` that llama3 scaling applies (as llama.cpp bakes them)."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, s.factor, mid))


def _llama3_from_factors(path, rf: np.ndarray, theta: float, dim: int,
                         orig_ctx: int) -> RopeScaling:
    factor = float(rf.max())
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    low, high = 1.0, 4.0
    if rf.shape[0] == freqs.shape[0] and factor > 1:
        mid = (rf > 1 + 1e-6) & (rf < factor * (1 - 1e-6))
        if mid.sum() >= 2:  # fit s = a / wavelen + b, a = old_ctx / (high - low), b = -low a / old_ctx
            s = (1 / rf[mid] - 1 / factor) / (1 - 1 / factor)
            a, b = np.polyfit(freqs[mid] / (2 * np.pi), s, 1)
            span = orig_ctx / a
            low = float(np.round(-b * span, 4))
            high = float(np.round(low + span, 4))
    scaling = RopeScaling(kind="llama3", factor=factor, low_freq_factor=low,
                          high_freq_factor=high, original_max_position_embeddings=orig_ctx)
    if rf.shape[0] != freqs.shape[0] or not np.allclose(
            llama3_rope_factors(scaling, theta, dim), rf, rtol=1e-3):
        raise ConfigError(f"{path}: rope_freqs.weight holds frequency factors that are not "
                          "llama3 scaling; jaxinfer cannot run them")
    return scaling


# --- tensors ----------------------------------------------------------------------------

def _hf_name(name: str) -> str | None:
    """HF name for a GGUF tensor name; None for tensors to skip; KeyError if unknown."""
    if name in _SKIPPED:
        return None
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    raise KeyError(name)


def _hf_names(f: GGUFFile) -> dict[str, str]:
    names, unknown = {}, []
    for name in f.tensors:
        try:
            hf = _hf_name(name)
        except KeyError:
            unknown.append(name)
            continue
        if hf is not None:
            names[name] = hf
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(f"{f.path}: tensors jaxinfer does not know for "
                              f"{f.architecture}: {shown}")
    return names


def gguf_tensor_count(f: GGUFFile) -> int:
    """How many tensors `gguf_hf_tensors` yields (for a progress bar)."""
    return len(_hf_names(f))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's LlamaModel.permute on q/k rows: `[n_heads * head_dim, ...]`.

    The converter regroups each head's rows from HF's rotate-half order
    (first half, second half) to interleaved pairs; this puts them back.
    """
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_hf_tensors(f: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array in HF layout) for every weight, in file order.

    Linear weights are `[out_features, in_features]`, embeddings `[vocab, hidden]`,
    norms and biases `[n]`. Unknown tensor names raise CheckpointError before any work.
    """
    names = _hf_names(f)
    cfg = gguf_model_config(f)
    permuted = f.architecture == "llama"
    for name, hf in names.items():
        t = f.tensors[name]
        try:
            w = dequantize_tensor(t)
        except CheckpointError as e:
            raise CheckpointError(f"{f.path}: {e}") from None
        if permuted and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
            if w.shape[0] != heads * cfg.head_dim or cfg.head_dim % 2:
                raise CheckpointError(
                    f"{f.path}: {name} has {w.shape[0]} rows, expected {heads} heads x "
                    f"{cfg.head_dim} (an even head_dim)")
            w = unpermute_qk(w, heads)
        yield hf, w
