"""PagePool: refcounts, prefix caching, LRU eviction and copy-on-write forks.

The unit tests pin each policy on a tiny pool; the state machine at the end
drives random request lifecycles against a model that tracks, independently of
the manager, who holds which page and which tokens each page holds, so a cache
hit that would serve the wrong K/V fails.
"""

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxinfer.core.page_pool import PagePool, chain_hashes
from jaxinfer.core.shapes import NULL_PAGE

PS = 4  # page size for the unit tests


def reference_hashes(tokens, page_size):
    """Spec of chain_hashes, written out independently with struct."""
    out, prev = [], b""
    for i in range(len(tokens) // page_size):
        page = tokens[i * page_size:(i + 1) * page_size]
        prev = hashlib.blake2b(prev + struct.pack(f"<{page_size}i", *page), digest_size=16).digest()
        out.append(prev)
    return out


def cached_sequence(pool, tokens):
    """Allocate, register and release a sequence, leaving its full pages cached; return its pages."""
    hashes = chain_hashes(tokens, pool.page_size, [])
    pages = pool.allocate(-(-len(tokens) // pool.page_size))
    for page, h in zip(pages, hashes):
        assert pool.register(page, h)
    pool.release(pages)
    return pages


def state(pool):
    return (pool.num_free_pages, pool.num_used_pages, pool.num_cached_pages,
            [pool.ref_count(p) for p in range(1, pool.num_pages)])


# -- chain_hashes ------------------------------------------------------------

def test_chain_hashes_match_reference_blake2b():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 2**31 - 1, -1, 0, 7]
    assert chain_hashes(tokens, PS, []) == reference_hashes(tokens, PS)
    assert all(len(h) == 16 for h in chain_hashes(tokens, PS, []))


def test_chain_hashes_extend_known_in_place_and_skip_partial_page():
    tokens = list(range(11))  # two full pages, one partial
    known = chain_hashes(tokens[:5], PS, [])
    assert len(known) == 1
    out = chain_hashes(tokens, PS, known)
    assert out is known
    assert out == reference_hashes(tokens, PS) and len(out) == 2
    assert chain_hashes(tokens[:3], PS, []) == []


def test_chain_hash_of_a_page_depends_on_earlier_pages():
    a = chain_hashes([1, 1, 1, 1, 9, 9, 9, 9], PS, [])
    b = chain_hashes([2, 1, 1, 1, 9, 9, 9, 9], PS, [])
    assert a[0] != b[0]
    assert a[1] != b[1]  # same tokens in page 1, different prefix
    assert chain_hashes([9, 9, 9, 9], PS, [])[0] not in (a[1], b[1])  # and not the first-page hash either


# -- allocation and references -----------------------------------------------

def test_fresh_pool_is_all_free_and_never_hands_out_the_null_page():
    pool = PagePool(num_pages=6, page_size=PS)
    assert (pool.num_free_pages, pool.num_used_pages, pool.usage) == (5, 0, 0.0)
    pages = pool.allocate(5)
    assert sorted(pages) == [1, 2, 3, 4, 5] and NULL_PAGE not in pages
    assert (pool.num_free_pages, pool.num_used_pages, pool.usage) == (0, 5, 1.0)
    pool.check()


def test_allocate_beyond_free_returns_none_and_changes_nothing():
    pool = PagePool(num_pages=6, page_size=PS)
    cached = cached_sequence(pool, list(range(8)))  # two evictable pages
    held = pool.allocate(1)
    before = state(pool)
    assert pool.allocate(pool.num_free_pages + 1) is None
    assert state(pool) == before
    assert pool.lookup(chain_hashes(list(range(8)), PS, [])) == cached  # nothing evicted
    assert pool.allocate(0) == []
    with pytest.raises(ValueError):
        pool.allocate(-1)
    assert len(pool.allocate(pool.num_free_pages)) == 4 and pool.num_free_pages == 0
    assert pool.allocate(1) is None
    pool.release(held)
    pool.check()


def test_acquire_and_release_count_references():
    pool = PagePool(num_pages=4, page_size=PS, enable_prefix_caching=False)
    [p] = pool.allocate(1)
    pool.acquire([p, p])
    assert pool.ref_count(p) == 3 and pool.num_used_pages == 1
    pool.release([p])
    pool.release([p])
    assert pool.ref_count(p) == 1 and pool.num_free_pages == 2
    pool.release([p])
    assert pool.ref_count(p) == 0 and pool.num_free_pages == 3 and pool.num_used_pages == 0
    pool.check()


def test_misuse_raises_and_changes_nothing():
    pool = PagePool(num_pages=4, page_size=PS)
    a, b = pool.allocate(2)
    before = state(pool)
    with pytest.raises(ValueError):
        pool.release([a, a])  # only one reference
    with pytest.raises(ValueError):
        pool.acquire([a, 3])  # page 3 is free: fresh pages come from allocate
    for bad in (NULL_PAGE, 4, -1):
        with pytest.raises(ValueError):
            pool.release([bad])
        with pytest.raises(ValueError):
            pool.acquire([bad])
    assert state(pool) == before
    pool.release([a, b])
    with pytest.raises(ValueError):
        pool.release([a])
    with pytest.raises(ValueError):
        pool.register(a, b"x" * 16)  # nobody holds it
    pool.check()


# -- prefix cache ------------------------------------------------------------

def test_lookup_returns_longest_cached_prefix_and_stops_at_first_miss():
    pool = PagePool(num_pages=8, page_size=PS)
    tokens = list(range(12))
    hashes = chain_hashes(tokens, PS, [])
    p0, p1, p2 = pool.allocate(3)
    assert pool.register(p0, hashes[0]) and pool.register(p2, hashes[2])  # page 1 not cached
    assert pool.lookup(hashes) == [p0]  # page 2 is cached but useless without page 1
    assert pool.register(p1, hashes[1])
    assert pool.lookup(hashes) == [p0, p1, p2]
    assert pool.lookup(chain_hashes([99] + tokens[1:], PS, [])) == []
    assert pool.lookup([]) == []
    pool.check()


def test_lookup_takes_no_references():
    pool = PagePool(num_pages=4, page_size=PS)
    pages = cached_sequence(pool, list(range(8)))
    before = state(pool)
    assert pool.lookup(chain_hashes(list(range(8)), PS, [])) == pages
    assert state(pool) == before


def test_cache_hit_after_release_reuses_pages():
    pool = PagePool(num_pages=8, page_size=PS)
    tokens = list(range(10))
    pages = cached_sequence(pool, tokens)  # 2 full pages cached, the partial one freed
    assert pool.num_cached_pages == 2 and pool.num_free_pages == 7
    hits = pool.lookup(chain_hashes(tokens + [5, 5], PS, []))
    assert hits == pages[:2]
    pool.acquire(hits)
    assert [pool.ref_count(p) for p in hits] == [1, 1] and pool.num_free_pages == 5
    pool.release(hits)
    pool.check()


def test_register_dedups_second_page_with_same_hash_stays_private():
    pool = PagePool(num_pages=4, page_size=PS)
    [h] = chain_hashes([1, 2, 3, 4], PS, [])
    a, b = pool.allocate(2)  # two requests computed the same page concurrently
    assert pool.register(a, h)
    assert not pool.register(b, h)
    assert pool.page_hash(b) is None and pool.lookup([h]) == [a]
    pool.release([b])
    assert b not in pool._evictable[0] and pool.num_cached_pages == 1  # freed, not cached
    pool.release([a])
    assert pool.lookup([h]) == [a]
    pool.check()


def test_register_keeps_first_hash_of_a_page():
    pool = PagePool(num_pages=4, page_size=PS)
    h1, h2 = chain_hashes(list(range(8)), PS, [])
    [a] = pool.allocate(1)
    assert pool.register(a, h1)
    assert not pool.register(a, h1) and not pool.register(a, h2)
    assert pool.page_hash(a) == h1 and pool.lookup([h2]) == []
    pool.check()


def test_prefix_caching_off_never_caches():
    pool = PagePool(num_pages=4, page_size=PS, enable_prefix_caching=False)
    hashes = chain_hashes(list(range(8)), PS, [])
    pages = pool.allocate(2)
    assert not any(pool.register(p, h) for p, h in zip(pages, hashes))
    assert pool.lookup(hashes) == [] and pool.num_cached_pages == 0
    pool.release(pages)
    assert pool.num_free_pages == 3 and pool.lookup(hashes) == []
    pool.check()


def test_hit_statistics():
    pool = PagePool(num_pages=4, page_size=PS)
    assert pool.prefix_hit_rate == 0.0
    pool.record_lookup(queried_tokens=10, hit_tokens=8)
    pool.record_lookup(queried_tokens=6, hit_tokens=0)
    assert (pool.prefix_queried_tokens, pool.prefix_hit_tokens) == (16, 8)
    assert pool.prefix_hit_rate == 0.5
    with pytest.raises(ValueError):
        pool.record_lookup(queried_tokens=4, hit_tokens=5)


def test_reset_prefix_cache_forgets_everything_and_frees_unreferenced_pages():
    pool = PagePool(num_pages=8, page_size=PS)
    old = cached_sequence(pool, list(range(8)))
    held_tokens = [7] * 8
    held = pool.allocate(2)
    for p, h in zip(held, chain_hashes(held_tokens, PS, [])):
        pool.register(p, h)
    assert not pool.reset_prefix_cache()  # `held` were still referenced
    assert pool.lookup(chain_hashes(list(range(8)), PS, [])) == []
    assert pool.lookup(chain_hashes(held_tokens, PS, [])) == []
    assert pool.num_cached_pages == 0 and pool.num_free_pages == 5 and set(old) <= set(pool._free[0])
    pool.release(held)  # now private: freed, not cached
    assert pool.num_free_pages == 7 and pool.num_cached_pages == 0
    pool.check()
    cached_sequence(pool, list(range(8)))
    assert pool.reset_prefix_cache() and pool.num_cached_pages == 0
    pool.check()


# -- eviction ----------------------------------------------------------------

def test_allocate_takes_never_cached_pages_before_evicting():
    pool = PagePool(num_pages=6, page_size=PS)
    tokens = list(range(8))
    cached = cached_sequence(pool, tokens)
    fresh = pool.allocate(3)
    assert not set(fresh) & set(cached)
    assert pool.lookup(chain_hashes(tokens, PS, [])) == cached


def test_lru_evicts_least_recently_released_first_and_drops_its_hash():
    pool = PagePool(num_pages=4, page_size=PS)
    hashes = [chain_hashes([i] * PS, PS, [])[0] for i in range(3)]
    pages = pool.allocate(3)
    for p, h in zip(pages, hashes):
        pool.register(p, h)
    for i in (1, 0, 2):  # release order, oldest first
        pool.release([pages[i]])
    assert pool.allocate(1) == [pages[1]]
    assert pool.lookup(hashes[1:2]) == [] and pool.page_hash(pages[1]) is None
    assert pool.allocate(1) == [pages[0]]
    assert pool.allocate(1) == [pages[2]]
    pool.check()


def test_acquired_evictable_page_leaves_lru_and_is_not_evicted():
    pool = PagePool(num_pages=4, page_size=PS)
    hashes = [chain_hashes([i] * PS, PS, [])[0] for i in range(3)]
    pages = pool.allocate(3)
    for p, h in zip(pages, hashes):
        pool.register(p, h)
    for p in pages:
        pool.release([p])
    hit = pool.lookup(hashes[:1])  # the oldest: next in line for eviction
    assert hit == [pages[0]]
    pool.acquire(hit)
    assert pool.num_free_pages == 2
    assert pool.allocate(2) == pages[1:]
    assert pool.allocate(1) is None
    assert pool.lookup(hashes[:1]) == hit and pool.ref_count(hit[0]) == 1
    pool.check()


def test_released_sequence_tail_is_evicted_before_head():
    pool = PagePool(num_pages=4, page_size=PS)
    tokens = list(range(3 * PS))
    head, mid, tail = cached_sequence(pool, tokens)  # released head-first as one list
    assert pool.allocate(1) == [tail]
    assert pool.allocate(1) == [mid]
    assert pool.lookup(chain_hashes(tokens, PS, [])) == [head]  # the shared prefix survives longest
    pool.check()


# -- fork --------------------------------------------------------------------

def test_fork_shares_full_pages_and_copies_partial_last_page():
    pool = PagePool(num_pages=8, page_size=PS)
    parent = pool.allocate(3)
    child, copy = pool.fork(parent, num_tokens=2 * PS + 1)
    assert child[:2] == parent[:2]
    assert copy == (parent[2], child[2]) and child[2] not in parent
    assert [pool.ref_count(p) for p in parent] == [2, 2, 1] and pool.ref_count(child[2]) == 1
    pool.release(parent)
    pool.release(child)
    assert pool.num_free_pages == 7
    pool.check()


def test_fork_on_page_boundary_copies_nothing():
    pool = PagePool(num_pages=4, page_size=PS)
    parent = pool.allocate(2)
    assert pool.fork(parent, num_tokens=2 * PS) == (parent, None)
    assert pool.fork(parent, num_tokens=PS) == (parent[:1], None)  # a page reserved ahead is not shared
    assert [pool.ref_count(p) for p in parent] == [3, 2]
    assert pool.fork([], num_tokens=0) == ([], None)
    with pytest.raises(ValueError):
        pool.fork(parent, num_tokens=2 * PS + 1)  # more tokens than the pages hold
    pool.check()


def test_partitions_hand_out_their_own_runs_of_pages_and_lookups_stay_in_theirs():
    pool = PagePool(12, 4, partitions=3)  # pages 1-3 | 4-7 | 8-11 (page 0 reserved)
    assert [pool.free_pages(r) for r in range(3)] == [3, 4, 4] and pool.num_free_pages == 11
    a = pool.allocate(2, 1)
    assert a == [4, 5] and pool.allocate(5, 2) is None and pool.free_pages(2) == 4
    pool.register(a[0], b"h0")
    assert pool.lookup([b"h0"], 1) == [4] and pool.lookup([b"h0"], 0) == [] and pool.lookup([b"h0"]) == [4]
    child, copy = pool.fork(a, 6)  # a partial second page: the copy comes from partition 1 too
    assert child[0] == 4 and copy == (5, 6) and pool.partition_of(child[1]) == 1
    with pytest.raises(ValueError, match="partitions"):
        PagePool(10, 4, partitions=3)
    pool.check()


def test_fork_without_a_free_page_returns_none_and_changes_nothing():
    pool = PagePool(num_pages=3, page_size=PS)
    parent = pool.allocate(2)
    before = state(pool)
    assert pool.fork(parent, num_tokens=PS + 1) is None
    assert state(pool) == before
    assert pool.fork(parent, num_tokens=2 * PS) == (parent, None)  # no copy needed: still works
    pool.check()


# -- randomized lifecycles against a model -----------------------------------

SM_PAGE_SIZE = 2
SM_NUM_PAGES = 9
SM_MAX_LEN = 10
SM_MAX_SEQS = 3  # few enough live sequences that pages churn through the LRU
# Two token values and short prompts: prefixes collide often, so hits, dedup and
# eviction all happen within a few steps.
tokens_st = st.lists(st.integers(0, 1), min_size=0, max_size=9)


class PagePoolMachine(RuleBasedStateMachine):
    """Requests arrive (lookup, acquire hits, allocate the rest, register full
    pages), grow, fork and finish, in random order.

    The model is independent of the manager's bookkeeping: references are
    recounted from the live sequences, and `content` records which tokens were
    written into each page (the whole prefix, since K/V depend on it). A cache
    hit must point at a page whose content is exactly the requested prefix, and
    a page must be private (ref 1) whenever a sequence writes into it.
    """

    @initialize(caching=st.booleans(), partitions=st.sampled_from([1, 3]))
    def setup(self, caching, partitions):
        self.pool = PagePool(SM_NUM_PAGES, SM_PAGE_SIZE, enable_prefix_caching=caching, partitions=partitions)
        self.seqs: dict[int, tuple[list[int], list[int], list[bytes]]] = {}  # id -> tokens, pages, hashes
        self.part: dict[int, int] = {}  # id -> its partition (every page of it from there)
        self.content: dict[int, tuple[int, ...]] = {}
        self.next_id = 0

    def model_free(self, part=None):
        """Pages no sequence holds (of one partition: ids part * 9 / n up to the next run)."""
        per = SM_NUM_PAGES // self.pool.partitions
        pages = range(1, SM_NUM_PAGES) if part is None else range(max(1, part * per), (part + 1) * per)
        held = {p for _, pages_, _ in self.seqs.values() for p in pages_}
        return len(set(pages) - held)

    def write(self, tokens, pages, start):
        """Model the device writing tokens[start:] into their pages."""
        ps = SM_PAGE_SIZE
        for i in range(start // ps, len(pages)):
            assert self.pool.ref_count(pages[i]) == 1, "writing into a shared page"
            self.content[pages[i]] = tuple(tokens[:min(len(tokens), (i + 1) * ps)])

    def register_full(self, tokens, pages, hashes, start_page):
        for i in range(start_page, len(hashes)):
            registered = self.pool.register(pages[i], hashes[i])
            assert registered <= self.pool.enable_prefix_caching

    @precondition(lambda self: len(self.seqs) < SM_MAX_SEQS)
    @rule(tokens=tokens_st, part=st.integers(0, 2))
    def new_request(self, tokens, part):
        ps = SM_PAGE_SIZE
        part %= self.pool.partitions
        hashes = chain_hashes(tokens, ps, [])
        hits = self.pool.lookup(hashes, part)
        assert all(self.pool.partition_of(p) == part for p in hits)
        if not self.pool.enable_prefix_caching:
            assert hits == []
        for i, page in enumerate(hits):
            assert self.content[page] == tuple(tokens[:(i + 1) * ps]), "cache hit serves the wrong tokens"
        need = -(-len(tokens) // ps) - len(hits)
        self.pool.acquire(hits)  # before allocate, which could otherwise evict the hits
        fresh = self.pool.allocate(need, part)
        if fresh is None:
            held = {p for _, pages, _ in self.seqs.values() for p in pages}
            assert self.model_free(part) - len(set(hits) - held) < need
            self.pool.release(hits)  # the scheduler backs out and preempts
            return
        pages = hits + fresh
        self.pool.record_lookup(len(tokens), len(hits) * ps)
        self.write(tokens, pages, len(hits) * ps)
        self.register_full(tokens, pages, hashes, len(hits))
        assert all(self.pool.partition_of(p) == part for p in pages)
        self.seqs[self.next_id] = (list(tokens), pages, hashes)
        self.part[self.next_id] = part
        self.next_id += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), more=st.lists(st.integers(0, 1), min_size=1, max_size=3))
    def grow(self, data, more):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        if len(self.seqs[sid][0]) >= SM_MAX_LEN:  # keep sequences short so pages churn
            return
        tokens, pages, hashes = self.seqs[sid]
        ps = SM_PAGE_SIZE
        old_len, new_tokens = len(tokens), tokens + more
        need = -(-len(new_tokens) // ps) - len(pages)
        fresh = self.pool.allocate(need, self.part[sid])
        if fresh is None:
            assert self.model_free(self.part[sid]) < need
            return
        pages = pages + fresh
        old_full = len(hashes)
        chain_hashes(new_tokens, ps, hashes)
        self.write(new_tokens, pages, old_len)
        self.register_full(new_tokens, pages, hashes, old_full)
        self.seqs[sid] = (new_tokens, pages, hashes)

    @precondition(lambda self: 0 < len(self.seqs) < SM_MAX_SEQS)
    @rule(data=st.data())
    def fork(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens, pages, hashes = self.seqs[sid]
        free_before = self.model_free(self.part[sid])
        out = self.pool.fork(pages, len(tokens))
        partial = len(tokens) % SM_PAGE_SIZE != 0
        if out is None:
            assert partial and free_before == 0
            return
        child, copy = out
        full = len(tokens) // SM_PAGE_SIZE
        assert child[:full] == pages[:full]
        if partial:
            assert copy == (pages[-1], child[-1]) and child[-1] not in pages
            self.content[child[-1]] = self.content[pages[-1]]  # the caller's device copy
        else:
            assert copy is None and child == pages
        assert all(self.pool.partition_of(p) == self.part[sid] for p in child)
        self.seqs[self.next_id] = (list(tokens), child, list(hashes))
        self.part[self.next_id] = self.part[sid]
        self.next_id += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def finish(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.pool.release(self.seqs.pop(sid)[1])

    @rule(roll=st.integers(0, 7))
    def reset_cache(self, roll):
        if roll == 0:  # rarely, or the cache is empty too often to test hits
            self.pool.reset_prefix_cache()
            assert self.pool.num_cached_pages == 0

    @invariant()
    def consistent(self):
        if not hasattr(self, "pool"):
            return
        self.pool.check()
        refs = {}
        for _, pages, _ in self.seqs.values():
            for p in pages:
                refs[p] = refs.get(p, 0) + 1
        for p in range(1, SM_NUM_PAGES):
            assert self.pool.ref_count(p) == refs.get(p, 0)
        assert self.pool.num_used_pages == len(refs)
        assert self.pool.num_free_pages == self.model_free()
        for part in range(self.pool.partitions):
            assert self.pool.free_pages(part) == self.model_free(part)

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        for sid in list(self.seqs):
            self.pool.release(self.seqs.pop(sid)[1])
            self.pool.check()
        assert self.pool.num_used_pages == 0
        assert self.pool.num_free_pages == SM_NUM_PAGES - 1


PagePoolMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_page_pool_random_lifecycles = PagePoolMachine.TestCase
