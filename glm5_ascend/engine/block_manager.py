"""Paged KV block allocation with automatic prefix caching (CPU bookkeeping only).

A full block is identified by a hash chained over its parent's hash and its token ids, so equal
prefixes map to equal hashes. Freed blocks keep their hash and stay findable until they are
evicted, least recently freed first.
"""
from __future__ import annotations

from collections import OrderedDict

from glm5_ascend.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] | None = None


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, seq: Sequence, upto_tokens: int) -> list[int]:
        """Hashes of seq's full blocks within its first `upto_tokens` tokens (memoised on seq)."""
        bs = self.block_size
        while len(seq.block_hashes) < upto_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(chain_hash(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return seq.block_hashes[: upto_tokens // bs]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids for seq's longest cached prefix. At least the last token is left to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        hits = []
        bs = self.block_size
        for i, h in enumerate(self._block_hashes(seq, seq.num_tokens - 1)):
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].tokens != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(bid)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(hits) * bs
        return hits

    def admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Take the prefix hits plus blocks for num_new_tokens after them; False (no change) if short."""
        n_hit_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        need = self.blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        if need + n_hit_free > len(self.free):
            return False
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self._grow(seq, need)
        return True

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make seq's block table cover num_computed_tokens + num_new_tokens; False if out of blocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self.free):
            return False
        self._grow(seq, need)
        return True

    def _grow(self, seq: Sequence, count: int) -> None:
        for _ in range(max(0, count)):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None:  # evict the least recently freed cached block
                if self.cached.get(block.hash) == bid:
                    del self.cached[block.hash]
                block.hash = block.tokens = None
            block.ref_count = 1
            seq.block_table.append(bid)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter blocks that just filled with computed tokens into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, seq.uncacheable_from_block)
        if full <= seq.num_registered_blocks:
            return
        hashes = self._block_hashes(seq, full * self.block_size)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.tokens = hashes[i], tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached.setdefault(hashes[i], block.block_id)
        seq.num_registered_blocks = full

    def free_seq(self, seq: Sequence) -> None:
        # Free tail blocks first so the prompt's head blocks, the likeliest to be shared, are evicted last.
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        for bid in self.free:
            self.blocks[bid].hash = self.blocks[bid].tokens = None
        self.cached = {k: v for k, v in self.cached.items() if self.blocks[v].ref_count > 0}
