"""Prompt-lookup proposals (jaxinfer/spec_decode/ngram.py) against a plain-Python search."""

import numpy as np
import pytest

from jaxinfer.spec_decode.ngram import NgramProposer


def slow(tokens, k, min_n, max_n):
    """The definition, written out: longest n first, the latest earlier occurrence followed by k tokens (else
    the latest), what followed it."""
    tokens = list(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        tail = tokens[-n:]
        hits = [start for start in range(len(tokens) - n - 1, -1, -1) if tokens[start:start + n] == tail]
        if hits:
            start = next((h for h in hits if h + n + k <= len(tokens)), hits[0])
            return tokens[start + n:start + n + k]
    return []


def test_it_proposes_what_followed_the_latest_longest_match():
    p = NgramProposer(k=3, min_n=1, max_n=3)
    #        0  1  2  3  4  5  6  7  8  9
    seq = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]
    # "6 7" occurs at 1 and 6 (then 9): the latest earlier one (6) is followed by 2 6 7.
    assert p.lookup(np.array(seq)).tolist() == [2, 6, 7]
    # A longer match wins over a later, shorter one: "5 6 7" at 0 -> 8 9 1.
    assert p.lookup(np.array(seq + [8, 3, 5, 6, 7])).tolist() == [8, 9, 1]
    # The proposal stops where the sequence does.
    assert p.lookup(np.array([4, 4])).tolist() == [4]
    # Repeating text: the latest match is at the end, followed by one token; an earlier one gives all three.
    assert p.lookup(np.array([1, 2, 1, 2, 1, 2, 1, 2])).tolist() == [1, 2, 1]
    assert p.lookup(np.array([1, 2, 3])).tolist() == []
    assert p.lookup(np.array(seq), k=0).tolist() == []


@pytest.mark.parametrize("seed", range(20))
def test_it_agrees_with_the_definition_on_random_sequences(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 4 + seed % 5, rng.integers(1, 60))
    k, min_n = 1 + seed % 4, 1 + seed % 2
    max_n = min_n + seed % 3
    got = NgramProposer(k, min_n, max_n).lookup(tokens).tolist()
    assert got == slow(tokens, k, min_n, max_n)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="min"):
        NgramProposer(2, 3, 2)


def test_a_batch_of_queries_gets_each_sequences_own_lookup():
    from jaxinfer.spec_decode.proposer import DraftQuery

    p = NgramProposer(k=4, min_n=1, max_n=3)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 5, int(rng.integers(2, 40))) for _ in range(6)]
    queries = [DraftQuery(row, s, 1 + row % 4, np.zeros(0, np.int32)) for row, s in enumerate(seqs)]
    got = [d.tolist() for d in p.propose(queries)]
    assert got == [p.lookup(q.tokens, q.k).tolist() for q in queries]
    assert all(len(d) <= q.k for d, q in zip(got, queries))
