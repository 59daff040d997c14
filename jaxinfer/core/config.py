"""The engine's configuration: one dataclass, read by the scheduler and by the engine that
runs its steps. Fields left None (`max_model_len`, `num_pages`) are resolved by the
engine from the model and the memory it finds; the scheduler gets the resolved copy."""

from __future__ import annotations

import dataclasses

from jaxinfer.core.shapes import BatchShape, next_bucket, pages_needed
from jaxinfer.errors import ConfigError

ATTENTION_IMPLEMENTATIONS = ("auto", "kernels", "reference", "xla")  # the attention layer checks it has these
SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle3")
DEFAULT_SPEC_BATCH_LIMIT = 8  # running sequences above which nothing speculates (disable_by_batch_size)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, with vLLM's keys (`speculative_config={...}`). A proposer guesses up to
    `num_speculative_tokens` tokens per running sequence and step; the target verifies them in the same
    step and keeps what it would have produced itself (jaxinfer/runner/rejection_sampler.py).

    method: "ngram" (prompt lookup: jaxinfer/spec_decode/ngram.py) or "draft_model" (a smaller, quantized
    or the same model with the target's vocabulary: jaxinfer/spec_decode/draft_model.py; given `model`
    alone, this). prompt_lookup_min / _max: the n-gram lengths it matches (one given: both that; neither:
    2 and 4). model: the draft model's path (GGUF file, HF directory or jaxinfer checkpoint), and
    quantization: its quantization as for LLM(quantization=...), e.g. "int8" or "gguf". "eagle3": a
    trained draft head over the target's hidden states (jaxinfer/spec_decode/draft_head.py); model: its
    directory (scripts/train_draft_head.py).
    disable_by_batch_size: no speculation while more sequences than this run (vLLM's name); None: the
    engine's default, up to 8."""

    method: str | None = None  # None: "draft_model" where a model is given, else "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    quantization: str | None = None
    disable_by_batch_size: int | None = None

    @classmethod
    def of(cls, value) -> SpeculativeConfig | None:
        """From a SpeculativeConfig, a dict of its keys (vLLM's), or None; an unknown key is named."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config must be a dict of settings, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"invalid speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**value)

    def __post_init__(self):
        if self.method is None:
            object.__setattr__(self, "method", "draft_model" if self.model is not None else "ngram")
        problems = []
        if self.method not in SPECULATIVE_METHODS:
            problems.append(f"method must be one of {list(SPECULATIVE_METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if not problems and self.num_speculative_tokens > 16:
            problems.append(f"num_speculative_tokens must be <= 16, got {self.num_speculative_tokens}")
        if not problems and self.lookup[0] > self.lookup[1]:
            problems.append(f"prompt_lookup_min ({self.lookup[0]}) must be <= prompt_lookup_max ({self.lookup[1]})")
        if self.method in ("draft_model", "eagle3") and not (isinstance(self.model, str) and self.model):
            problems.append(f"method {self.method!r} needs model (the draft's path), got {self.model!r}")
        for name in ("model", "quantization"):
            if getattr(self, name) is not None and (self.method == "ngram" or
                                                    (name == "quantization" and self.method == "eagle3")):
                problems.append(f"{name} is a draft model's setting; method {self.method!r} takes none")
        if problems:
            raise ConfigError("invalid speculative_config: " + "; ".join(problems))

    @property
    def batch_limit(self) -> int:
        """Most running sequences with which anything speculates."""
        return self.disable_by_batch_size or DEFAULT_SPEC_BATCH_LIMIT

    @property
    def lookup(self) -> tuple[int, int]:
        """(min, max) n-gram lengths."""
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            return 2, 4
        return (lo or hi), (hi or lo)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once (decode rows of a step)
    max_num_batched_tokens: int = 512  # tokens per step, decode and prefill together
    max_model_len: int | None = None  # longest prompt + output; None: the model's context
    page_size: int = 16
    num_pages: int | None = None  # KV pages, page 0 (scratch) included; None: sized from kv_cache_bytes
    # Partitions of the page pool, set by the engine: the devices an MLA model's latent pages are split over
    # (data-parallel attention: every page of a sequence on one device), else 1.
    kv_partitions: int = 1
    kv_cache_bytes: int | None = None  # None: 90% of free accelerator memory, or 1 GiB on CPU
    block_q: int = 64  # prefill query block
    enable_prefix_caching: bool = True
    prompt_logprob_rows: int = 32  # logits rows per step for prompt logprobs
    # Step sizes; empty: powers of two (decode rows) and block_q * 4^k (prefill tokens).
    decode_sizes: tuple[int, ...] = ()
    prefill_sizes: tuple[int, ...] = ()
    attention: str | None = None  # one of ATTENTION_IMPLEMENTATIONS; None: the process default
    # A streamed request gets an output every this many new tokens, besides its first token
    # and its end (vLLM's stream_interval): fewer outputs cost less host time per step.
    stream_interval: int = 1
    # The fewest rows of a decode step; None: the engine's choice for its platform. On a GPU a lone sequence
    # runs in a two-row step: XLA compiles a one-row matmul as a slower matrix-vector product (measured for
    # issue 11, docs/benchmarks.md). On the CPU the native kernels take one row as it is, and a padding row
    # would only double their arithmetic.
    min_decode_rows: int | None = None
    speculative_config: SpeculativeConfig | None = None  # or a dict of its keys (vLLM's)

    def __post_init__(self):
        object.__setattr__(self, "speculative_config", SpeculativeConfig.of(self.speculative_config))
        self.validate()

    @property
    def num_speculative_tokens(self) -> int:
        """Most drafted tokens a sequence carries in a step (0: no speculation)."""
        return self.speculative_config.num_speculative_tokens if self.speculative_config else 0

    def validate(self) -> None:
        """Raise ConfigError naming every problem."""
        problems = []
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "block_q", "prompt_logprob_rows",
                     "stream_interval") + (("min_decode_rows",) if self.min_decode_rows is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("page_size", "block_q"):
            v = getattr(self, name)
            if isinstance(v, int) and v >= 1 and v & (v - 1):
                problems.append(f"{name} must be a power of two, got {v}")
        if (isinstance(self.max_num_seqs, int) and isinstance(self.max_num_batched_tokens, int)
                and self.max_num_batched_tokens < self.max_num_seqs):
            problems.append("max_num_batched_tokens must be >= max_num_seqs")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
            problems.append(f"num_pages must be an integer >= 2, got {self.num_pages!r}")
        elif self.num_pages is not None and (not isinstance(self.kv_partitions, int) or self.kv_partitions < 1
                                             or self.num_pages % self.kv_partitions):
            problems.append(f"kv_partitions ({self.kv_partitions!r}) must divide num_pages ({self.num_pages})")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int)
                                               or self.max_model_len < 2):
            problems.append(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.kv_cache_bytes is not None and (not isinstance(self.kv_cache_bytes, int) or self.kv_cache_bytes < 1):
            problems.append(f"kv_cache_bytes must be a positive integer, got {self.kv_cache_bytes!r}")
        if self.attention is not None and self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attention must be one of {sorted(ATTENTION_IMPLEMENTATIONS)}, got {self.attention!r}")
        d, p = tuple(self.decode_sizes), tuple(self.prefill_sizes)
        if d and (sorted(d) != list(d) or d[0] < 1
                  or (isinstance(self.max_num_seqs, int) and d[-1] < self.max_num_seqs)):
            problems.append("decode_sizes must be increasing and reach max_num_seqs")
        if p and (sorted(p) != list(p)
                  or any(t <= 0 or (isinstance(self.block_q, int) and t % self.block_q) for t in p)):
            problems.append("prefill_sizes must be increasing multiples of block_q")
        if problems:
            raise ConfigError("invalid engine configuration: " + "; ".join(problems))

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @property
    def pages_per_seq(self) -> int:
        return pages_needed(self.max_model_len, self.page_size)

    @property
    def max_prefill_tokens(self) -> int:
        if self.prefill_sizes:
            return self.prefill_sizes[-1]
        return -(-self.max_num_batched_tokens // self.block_q) * self.block_q

    @property
    def max_decode_rows(self) -> int:
        """Most decode rows a step needs: one per running sequence, and with speculation one more per draft
        of each sequence that may speculate."""
        rows = self.max_num_seqs
        spec = self.speculative_config
        if spec is not None:
            rows = max(rows, min(self.max_num_seqs, spec.batch_limit) * (1 + spec.num_speculative_tokens))
        return rows

    def decode_buckets(self) -> list[int]:
        """Decode step sizes, none below min_decode_rows (unresolved: 2)."""
        low = self.min_decode_rows or 2
        if self.decode_sizes:
            return sorted({max(low, d) for d in self.decode_sizes})
        out, d, top = [], low, next_bucket(self.max_decode_rows, low)
        while d < top:
            out.append(d)
            d *= 2
        return out + [top]

    def prefill_buckets(self) -> list[int]:
        """0, then block_q * 4^k, then the largest (or the configured sizes)."""
        if self.prefill_sizes:
            return [0, *self.prefill_sizes]
        out, t = [0], self.block_q
        while t < self.max_prefill_tokens:
            out.append(t)
            t *= 4
        return out + [self.max_prefill_tokens]

    def mixed_decode_buckets(self) -> list[int]:
        """Decode rows of a step that also prefills: the fewest or the most. Such a step is
        dominated by its prefill, so two sizes suffice, and the step shapes stay few."""
        buckets = self.decode_buckets()
        # With speculation, also the one that holds every sequence without drafts.
        plain = next((d for d in buckets if d >= self.max_num_seqs), buckets[-1])
        return sorted({buckets[0], plain, buckets[-1]})

    def shape(self, decode_rows: int, prefill_tokens: int) -> BatchShape:
        return BatchShape(decode_rows, prefill_tokens, self.block_q, self.pages_per_seq,
                          self.prompt_logprob_rows, self.num_speculative_tokens)

    def all_shapes(self) -> list[BatchShape]:
        """Every shape a step can take: decode-only at every decode size, then with prefill."""
        return ([self.shape(d, 0) for d in self.decode_buckets()]
                + [self.shape(d, t) for d in self.mixed_decode_buckets() for t in self.prefill_buckets()[1:]])


