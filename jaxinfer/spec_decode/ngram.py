"""Prompt lookup (n-gram) proposals: match the end of a sequence against its own earlier tokens, prompt and
output, and propose what followed the match. Host-side numpy: the scheduler reads the tokens it already
holds, so proposing costs no device round trip.

For n from `max_n` down to `min_n`, the last n tokens are looked for earlier in the sequence; the latest
occurrence of the longest n that matches and is followed by k tokens wins (else the latest: fewer tokens,
where the sequence ends first), and the tokens that followed it are proposed. Nothing matches: no proposal,
and the sequence decodes one token.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jaxinfer.spec_decode.proposer import DraftQuery


class NgramProposer:
    def __init__(self, k: int, min_n: int, max_n: int, window: int = 4096):
        """k: most tokens proposed; min_n..max_n: the n-gram lengths tried, longest first; window: how many
        of the latest tokens are searched (bounds the host's work per step on long sequences)."""
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram lengths need 1 <= min ({min_n}) <= max ({max_n})")
        self.k, self.min_n, self.max_n, self.window = k, min_n, max_n, window

    writes_pages = False  # stateless: it reads the tokens the scheduler holds

    def propose(self, queries: list[DraftQuery]) -> list[np.ndarray]:
        return [self.lookup(q.tokens, q.k) for q in queries]

    def forget(self, row: int) -> None:
        pass

    def lookup(self, tokens: np.ndarray, k: int | None = None) -> np.ndarray:
        """Up to k (default self.k) proposed tokens after `tokens` (int array), possibly none."""
        k = self.k if k is None else k
        tokens = np.asarray(tokens)[-self.window:]
        n_tokens = len(tokens)
        if k <= 0 or n_tokens <= self.min_n:
            return tokens[:0]
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            # Windows starting at 0 .. n_tokens - n - 1: each is followed by at least one token.
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(hits):
                whole = hits[hits + n + k <= n_tokens]  # followed by k tokens (in repeating text the latest
                start = int(whole[-1] if len(whole) else hits[-1]) + n  # match is at the end, followed by one)
                return tokens[start:start + k].copy()
        return tokens[:0]
