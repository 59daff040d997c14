"""One request's sampling settings (vLLM's field names and defaults), checked on creation,
and the per-sample seeds derived from them. Plain data: a step carries them as columns
of its inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import secrets
from collections.abc import Mapping, Sequence

from jaxinfer.errors import InputError, summarize

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
# Temperatures below this sample greedily (as in vLLM): dividing logits by them
# overflows float32.
GREEDY_TEMPERATURE = 1e-5
# Sampling works in single precision: logits / temperature and logits * or / the repetition
# penalty must stay finite, and the values themselves must fit single precision (1e308 does
# not). Past these bounds sampling is uniform (temperature) or the penalty is total
# anyway, so nothing a user could want is refused.
MAX_TEMPERATURE = 1e4
REPETITION_PENALTY_RANGE = (1e-4, 1e4)
MAX_TOP_K = 2**31 - 1  # the largest signed 32-bit integer, what a step's columns hold
_U64 = 2**64 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; vLLM's field names and defaults.

    temperature 0 is greedy; top_k 0 (or -1, stored as 0) and top_p 1 disable
    those cuts; max_tokens None means as many as the context allows. `stop` and
    `stop_token_ids` are stored as tuples. Invalid values raise `InputError`
    naming every problem at once.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs of each sampled token
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # False: this request never carries drafts, even where the engine speculates (speculative_config).
    speculate: bool = True

    def __post_init__(self):
        problems: list[str] = []

        def set_(name, value):  # normalize a field of this frozen instance
            object.__setattr__(self, name, value)

        def real(name, ok, requirement):
            value = getattr(self, name)
            if _real(value) and math.isfinite(value) and ok(value):
                set_(name, float(value))
            else:
                problems.append(f"{name} must be {requirement}, got {value!r}")

        def integer(name, ok, requirement, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return True
            if _int(value) and ok(value):
                set_(name, int(value))
                return True
            problems.append(f"{name} must be {requirement}, got {value!r}")
            return False

        integer("n", lambda v: 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]")
        real("temperature", lambda v: 0 <= v <= MAX_TEMPERATURE, f"a number in [0, {MAX_TEMPERATURE:g}]")
        real("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
        if integer("top_k", lambda v: -1 <= v <= MAX_TOP_K,
                   f"an integer in [1, {MAX_TOP_K}], or -1 or 0 to disable it"):
            set_("top_k", max(self.top_k, 0))
        real("min_p", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        integer("seed", lambda v: -2**63 <= v < 2**64, "None or an integer in [-2**63, 2**64)",
                optional=True)
        max_ok = integer("max_tokens", lambda v: v >= 1, "None or an integer >= 1", optional=True)
        if (integer("min_tokens", lambda v: v >= 0, "an integer >= 0") and max_ok
                and self.max_tokens is not None and self.min_tokens > self.max_tokens):
            problems.append(f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                            f"({self.max_tokens})")
        self._check_stop(problems)
        self._check_stop_token_ids(problems)
        for name in ("logprobs", "prompt_logprobs"):
            integer(name, lambda v: 0 <= v <= MAX_LOGPROBS,
                    f"None or an integer in [0, {MAX_LOGPROBS}]", optional=True)
        for name in ("presence_penalty", "frequency_penalty"):
            real(name, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
        lo, hi = REPETITION_PENALTY_RANGE
        real("repetition_penalty", lambda v: lo <= v <= hi, f"a number in [{lo:g}, {hi:g}]")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "speculate"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if problems:
            raise InputError("invalid sampling parameters: " + summarize(problems))

    def _check_stop(self, problems: list[str]) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            problems.append(f"stop must be a string or a list of strings, got {stop!r}")
            return
        if len(stop) > MAX_STOP_STRINGS:
            problems.append(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} allowed")
        for s in stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                problems.append(f"each stop string must be a non-empty string of at most "
                                f"{MAX_STOP_STRING_CHARS} characters, got {_short(s)}")
                continue
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no tokenizer can ever emit it
                problems.append(f"stop string {_short(s)} is not valid Unicode (lone surrogate)")
        object.__setattr__(self, "stop", stop)

    def _check_stop_token_ids(self, problems: list[str]) -> None:
        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        if not isinstance(ids, (list, tuple)):
            problems.append(f"stop_token_ids must be a list of integers, got {ids!r}")
            return
        if len(ids) > MAX_STOP_TOKEN_IDS:
            problems.append(f"stop_token_ids holds {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} "
                            f"allowed")
        bad = [i for i in ids if not _int(i) or i < 0]
        if bad:
            problems.append(f"stop_token_ids must be integers >= 0, got {_short(bad)}")
        else:
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

    @classmethod
    def from_dict(cls, d: Mapping) -> "SamplingParams":
        """Build from a mapping (a JSON object); unknown keys are an `InputError`."""
        if not isinstance(d, Mapping):
            raise InputError(f"invalid sampling parameters: expected an object, got {_short(d)}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise InputError(f"invalid sampling parameters: unknown field(s) "
                             f"{', '.join(map(repr, unknown))}; known fields: {', '.join(known)}")
        return cls(**d)


def _int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def request_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, or for an unseeded request a random one
    drawn once, on arrival (so that one value describes the request, e.g. to other
    processes of a multi-host run)."""
    return params.seed if params.seed is not None else secrets.randbits(64)


def seed_for(seed: int, index: int) -> int:
    """The 64-bit seed of sample `index` of a request with `seed`.

    Sample 0 keeps the request's seed (negative seeds wrap to two's complement),
    so n=1 requests sample as their seed says; the others get a hash of
    (seed, index), so siblings draw independent streams.
    """
    if index == 0:
        return seed & _U64
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
