"""Which data-parallel replica takes a request: the one that holds its prefix, unless that one is
far busier than the least busy.

Each replica has its own KV pool and prefix cache, so a request whose prompt shares pages with
an earlier one computes them again unless it lands where that one did. The router remembers,
for the page hashes of every prompt it routed (the prefix cache's own chained hashes,
jaxinfer/core/page_pool.py), the replica it chose: a new request goes to the replica of its
longest remembered prefix. It remembers what it routed, not what the pools hold, so a burst of
requests sharing a new prefix lands together before the first one is computed. Load (running
plus waiting sequences) wins when the affine replica has `max_imbalance` more than the least
busy one: affinity must not pile a popular prefix's traffic onto one replica.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from jaxinfer.core.page_pool import chain_hashes

MAX_REMEMBERED = 1 << 18  # page hashes remembered (least recently routed forgotten first): 4 MiB or so


class PrefixAffinityRouter:
    def __init__(self, num_replicas: int, page_size: int, max_imbalance: int,
                 max_remembered: int = MAX_REMEMBERED):
        self.num_replicas = num_replicas
        self.page_size = page_size
        self.max_imbalance = max_imbalance
        self.max_remembered = max_remembered
        self._owner: OrderedDict[bytes, int] = OrderedDict()  # page hash -> replica last routed there
        self.routed = [0] * num_replicas  # requests per replica
        self.affine = 0  # requests that went where their longest remembered prefix lives
        self.overruled = 0  # requests with such a prefix sent elsewhere, for load

    def route(self, token_ids: Sequence[int], loads: Sequence[int]) -> int:
        """The replica for a prompt, given each replica's load now."""
        hashes = chain_hashes(token_ids, self.page_size, [])
        home = None
        for h in hashes:  # the longest prefix routed before
            owner = self._owner.get(h)
            if owner is None:
                break
            home = owner
        least = min(range(self.num_replicas), key=lambda r: (loads[r], r))
        if home is not None and loads[home] - loads[least] <= self.max_imbalance:
            pick = home
            self.affine += 1
        else:
            pick = least
            self.overruled += home is not None
        for h in hashes:
            self._owner[h] = pick
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_remembered:
            self._owner.popitem(last=False)
        self.routed[pick] += 1
        return pick
