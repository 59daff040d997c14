"""KV-cache page manager: reference counts, prefix caching, LRU eviction, copy-on-write forks.

Host-side policy only (plain Python and numpy); the device pages themselves live
in `kv_cache`. Every page 1..num_pages-1 is in exactly one of three states:

    free         ref 0, no hash      on `_free`, handed out first
    evictable    ref 0, hashed       in `_evictable` (LRU order); still holds a
                                     cached full page that a later request may reuse
    referenced   ref >= 1            owned by one or more sequences; may be hashed

Page 0 (NULL_PAGE) is the scratch page for padding writes and is in none of them.

Prefix caching: once a page is full, the scheduler `register`s it under the
chained hash of its tokens (`chain_hashes`). A new request `lookup`s its prompt's
hashes, `acquire`s the hit pages and only computes the rest. A released hashed
page keeps its contents until `allocate` needs the memory and evicts it.

Running out of pages is not an error: `allocate` and `fork` return None and
change nothing, and the scheduler preempts. Misuse (releasing a page nobody
holds, acquiring a free page) raises ValueError before changing anything.
Every operation costs O(pages touched), never O(pool), except `check` and
`reset_prefix_cache`.

Partitions: with `partitions` = n the pages split into n equal runs of ids
(partition r: pages r * num_pages / n up to the next run), as a pool sharded
n ways over its pages axis lies on n devices. A sequence whose pages all come
from one partition has its whole cache on one device: MLA's data-parallel
attention (jaxinfer/layers/attention.py) gives each device the sequences of
its own partition. `allocate`, `lookup` and `fork` take the partition; free
and evictable pages are kept per partition. One partition is the plain pool.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from jaxinfer.core.shapes import NULL_PAGE

HASH_BYTES = 16


def chain_hashes(token_ids: Sequence[int], page_size: int, known: list[bytes]) -> list[bytes]:
    """Extend `known` to the hash of every FULL page of `token_ids`; return it (mutated).

    `known` holds the hashes of the first len(known) full pages (computed on an
    earlier call, so a growing sequence only hashes its new pages). The trailing
    partial page gets no hash. Hash of page i = blake2b(digest_size=16) over
    (hash of page i-1, or b'' for page 0) + the page's tokens as little-endian
    int32. Chaining makes a page's hash depend on every earlier token, as its
    K/V do; a cryptographic hash means one user's prompt cannot be crafted to
    collide with another's cached pages. The input is unambiguous: the previous
    hash has a fixed length (0 bytes only for page 0) and so do the tokens.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    num_full = len(token_ids) // page_size
    start = len(known)
    if start >= num_full:
        return known
    # One conversion for all new pages; raises OverflowError on ids outside int32.
    data = np.asarray(token_ids[start * page_size:num_full * page_size], dtype="<i4").tobytes()
    page_bytes = 4 * page_size
    prev = known[-1] if known else b""
    for i in range(num_full - start):
        h = hashlib.blake2b(prev, digest_size=HASH_BYTES)
        h.update(data[i * page_bytes:(i + 1) * page_bytes])
        prev = h.digest()
        known.append(prev)
    return known


class PagePool:
    """The page pool of one KV cache: who holds which page, and which pages are cached."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True, partitions: int = 1):
        if num_pages < 2:
            raise ValueError("a KV cache needs at least 2 pages (page 0 is reserved)")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if partitions < 1 or num_pages % partitions or num_pages // partitions < 2:
            raise ValueError(f"{num_pages} pages do not split into {partitions} partitions of 2 or more")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.partitions = partitions
        self.pages_per_partition = num_pages // partitions

        self._ref = [0] * num_pages  # references per page
        self._num_used = 0  # pages with ref >= 1
        # Never-cached (or no-longer-cached) free pages, per partition. Ascending ids at first, so
        # a fresh pool hands out 1, 2, 3, ... (easy to read in logs and tests).
        per = self.pages_per_partition
        self._free: list[collections.deque[int]] = [
            collections.deque(range(max(r * per, NULL_PAGE + 1), (r + 1) * per)) for r in range(partitions)]
        # Unreferenced hashed pages, least recently released first (popped first), per partition.
        self._evictable: list[collections.OrderedDict[int, None]] = [
            collections.OrderedDict() for _ in range(partitions)]
        self._page_to_hash: dict[int, bytes] = {}
        self._hash_to_page: dict[bytes, int] = {}

        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # -- sizes ---------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages `allocate` can hand out now: free ones plus evictable cached ones (all partitions)."""
        return sum(map(len, self._free)) + sum(map(len, self._evictable))

    def free_pages(self, part: int) -> int:
        """`num_free_pages` of one partition."""
        return len(self._free[part]) + len(self._evictable[part])

    def partition_of(self, page: int) -> int:
        return page // self.pages_per_partition

    @property
    def num_used_pages(self) -> int:
        """Pages held by at least one sequence."""
        return self._num_used

    @property
    def num_cached_pages(self) -> int:
        """Pages that hold a registered hash (referenced or evictable)."""
        return len(self._page_to_hash)

    @property
    def usage(self) -> float:
        """Fraction of the allocatable pool (page 0 excluded) held by sequences."""
        return self._num_used / (self.num_pages - 1)

    def ref_count(self, page: int) -> int:
        self._check_page(page)
        return self._ref[page]

    def page_hash(self, page: int) -> bytes | None:
        """The hash `page` is registered under, or None."""
        self._check_page(page)
        return self._page_to_hash.get(page)

    # -- prefix cache --------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes], part: int | None = None) -> list[int]:
        """Pages of the longest cached prefix of `hashes`; stops at the first miss (or, given `part`, at the
        first page of another partition).

        Takes no references, so the caller must `acquire` the pages before its
        next `allocate` (which could otherwise evict them). [] when caching is off.
        """
        if not self.enable_prefix_caching:
            return []
        pages = []
        for h in hashes:
            page = self._hash_to_page.get(h)
            if page is None or (part is not None and self.partition_of(page) != part):
                # A later page may still be cached (its parent was evicted first),
                # but its K/V are useless without the parent's.
                break
            pages.append(page)
        return pages

    def register(self, page: int, page_hash: bytes) -> bool:
        """Record that `page` (ref >= 1) holds the full page hashed `page_hash`.

        False (no change) when caching is off, when the page already has a hash,
        or when another page already holds this hash: then this page stays
        private and is freed, not cached, on release (one copy per hash is enough).
        """
        self._check_page(page)
        if self._ref[page] < 1:
            raise ValueError(f"page {page} is registered but nobody holds it")
        if not self.enable_prefix_caching:
            return False
        if page in self._page_to_hash or page_hash in self._hash_to_page:
            return False
        self._page_to_hash[page] = page_hash
        self._hash_to_page[page_hash] = page
        return True

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one prefix lookup: `hit_tokens` of `queried_tokens` came from the cache."""
        if not 0 <= hit_tokens <= queried_tokens:
            raise ValueError(f"need 0 <= hit_tokens <= queried_tokens, got {hit_tokens}, {queried_tokens}")
        self.prefix_queried_tokens += queried_tokens
        self.prefix_hit_tokens += hit_tokens

    @property
    def prefix_hit_rate(self) -> float:
        if self.prefix_queried_tokens == 0:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_queried_tokens

    def reset_prefix_cache(self) -> bool:
        """Forget every cached page (e.g. after new weights make cached K/V stale).

        All hashes are dropped, so no later lookup hits anything cached before
        the reset. Evictable pages become free. Referenced hashed pages stay
        with their sequences but become private: freed, not cached, on release.
        Returns True when no cached page was referenced (the whole cache went
        back to the free list), False when some still were. O(cached pages).
        """
        all_unreferenced = sum(map(len, self._evictable)) == len(self._page_to_hash)
        for free, evictable in zip(self._free, self._evictable):
            free.extend(evictable)
            evictable.clear()
        self._page_to_hash.clear()
        self._hash_to_page.clear()
        return all_unreferenced

    # -- references ----------------------------------------------------------

    def acquire(self, pages: Sequence[int]) -> None:
        """One more reference on each page: hits from `lookup` or pages to share.

        An evictable page (ref 0, cached) leaves the LRU, so it cannot be evicted
        while held. Acquiring a free page is an error: those come from `allocate`.
        """
        for page in pages:  # validate first, so an error changes nothing
            self._check_page(page)
            if self._ref[page] == 0 and page not in self._evictable[self.partition_of(page)]:
                raise ValueError(f"page {page} is free; get fresh pages from allocate()")
        for page in pages:
            if self._ref[page] == 0:
                del self._evictable[self.partition_of(page)][page]
                self._num_used += 1
            self._ref[page] += 1

    def allocate(self, n: int, part: int = 0) -> list[int] | None:
        """n fresh pages of partition `part` with ref 1, or None (and no change) if fewer than n are available.

        Never-cached free pages go first; then the least recently released cached
        pages are evicted and their hashes dropped.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.free_pages(part):
            return None
        pages = []
        free, evictable = self._free[part], self._evictable[part]
        for _ in range(n):
            if free:
                page = free.popleft()
            else:
                page, _ = evictable.popitem(last=False)
                del self._hash_to_page[self._page_to_hash.pop(page)]
            self._ref[page] = 1
            pages.append(page)
        self._num_used += n
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference on each page; a page reaching ref 0 becomes evictable or free.

        A sequence passes its pages head first. They are processed in reverse,
        so the tail reaches the LRU first and is evicted before the head: a later
        request is more likely to share a prompt's head than its tail (and the
        tail's K/V are useless once the head is gone).
        """
        counts = collections.Counter(pages)  # validate first, so an error changes nothing
        for page, count in counts.items():
            self._check_page(page)
            if self._ref[page] < count:
                raise ValueError(f"releasing page {page} {count} time(s) but it has {self._ref[page]} reference(s)")
        for page in reversed(pages):
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._num_used -= 1
                if page in self._page_to_hash:
                    self._evictable[self.partition_of(page)][page] = None  # most recently released: evicted last
                else:
                    self._free[self.partition_of(page)].append(page)

    def fork(self, pages: Sequence[int], num_tokens: int) -> tuple[list[int], tuple[int, int] | None] | None:
        """Copy-on-write fork of a sequence holding `num_tokens` tokens in `pages`.

        The child shares every full page (one more reference each). A partial
        last page would be written by both sequences, so the child gets a fresh
        page instead and the returned (src, dst) tells the caller to copy the
        device page (of the parent's partition). Returns (child_pages, copy or None), or None (no change)
        when no page is free for the copy. Pages of `pages` past the ones
        `num_tokens` fills (reserved ahead by the scheduler) are not shared; the
        child allocates its own as it grows.
        """
        num_full, partial = divmod(max(num_tokens, 0), self.page_size)
        needed = num_full + (partial > 0)
        if num_tokens < 0 or len(pages) < needed:
            raise ValueError(f"{len(pages)} pages cannot hold {num_tokens} tokens of page size {self.page_size}")
        for page in pages[:needed]:
            self._check_page(page)
            if self._ref[page] < 1:
                raise ValueError(f"forking page {page}, which nobody holds")
        copy = None
        child = list(pages[:num_full])
        if partial:
            # Allocate before sharing: a failed allocation must leave no trace.
            # It cannot evict the shared pages: they are referenced.
            fresh = self.allocate(1, self.partition_of(pages[num_full]))
            if fresh is None:
                return None
            copy = (pages[num_full], fresh[0])
        self.acquire(child)
        if copy is not None:
            child.append(copy[1])
        return child, copy

    # -- invariants ----------------------------------------------------------

    def _check_page(self, page: int) -> None:
        if not NULL_PAGE < page < self.num_pages:
            raise ValueError(f"page {page} is not an allocatable page of this pool (1..{self.num_pages - 1})")

    def check(self) -> None:
        """Raise AssertionError unless every invariant holds. O(pool): for tests and debugging."""

        def expect(cond: bool, msg: str) -> None:
            if not cond:  # not `assert`: must also run under python -O
                raise AssertionError(msg)

        for r, (free_r, evictable_r) in enumerate(zip(self._free, self._evictable)):
            expect(all(self.partition_of(p) == r for p in free_r), f"partition {r}'s free list holds another's page")
            expect(all(self.partition_of(p) == r for p in evictable_r), f"partition {r}'s LRU holds another's page")
        free = {p for f in self._free for p in f}
        evictable = {p for e in self._evictable for p in e}
        expect(len(free) == sum(map(len, self._free)), "a page is on the free list twice")
        expect(NULL_PAGE not in free and NULL_PAGE not in evictable, "the null page is free or evictable")
        expect(NULL_PAGE not in self._page_to_hash, "the null page is cached")
        expect(self._ref[NULL_PAGE] == 0, "the null page is referenced")
        expect(len(self._ref) == self.num_pages, "refcount table has the wrong size")
        expect(all(r >= 0 for r in self._ref), "negative refcount")
        used = 0
        for page in range(NULL_PAGE + 1, self.num_pages):
            states = (page in free) + (page in evictable) + (self._ref[page] >= 1)
            expect(states == 1, f"page {page} is in {states} of free/evictable/referenced")
            used += self._ref[page] >= 1
        pool = range(NULL_PAGE + 1, self.num_pages)
        expect(all(p in pool for p in free), "the free list holds a page outside the pool")
        expect(all(p in pool for p in evictable), "the LRU holds a page outside the pool")
        expect(all(p in pool for p in self._page_to_hash), "a page outside the pool is cached")
        expect(used == self._num_used, f"used-page counter {self._num_used} != {used}")
        for page in free:
            expect(page not in self._page_to_hash, f"free page {page} has a hash")
        for page in evictable:
            expect(page in self._page_to_hash, f"evictable page {page} has no hash")
        expect(len(self._page_to_hash) == len(self._hash_to_page), "hash maps differ in size")
        for page, h in self._page_to_hash.items():
            expect(self._hash_to_page.get(h) == page, f"hash maps disagree on page {page}")
        expect(self.enable_prefix_caching or not self._page_to_hash, "pages cached with caching off")
