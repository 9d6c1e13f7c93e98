"""Paged KV-cache bookkeeping: block pool, block tables, hash-chained automatic prefix caching.

The tensors live with the model runner(s); this module only decides which physical block holds which
tokens. Full blocks are registered under their chain hash (workers.block_hash), so a later request whose
prompt starts with the same tokens reuses them. Blocks have reference counts; a block whose count drops
to zero goes to the free queue but keeps its hash, so it can still be hit until it is evicted (LRU:
least recently freed first, and a sequence's tail blocks before its head blocks, as vLLM does).

For the router's reports the pool also keeps (a) the cached hashes in order of use, least recent first: a
block moves to the end when it is registered, when a prefix-cache hit takes it (touch) and when its last
sequence lets go of it (release, tail blocks before head blocks, so a prompt's head counts as used last), and
(b) a counting Bloom filter of every cached hash (workers.block_hash.CountingBlockFilter), updated on register
and evict, so a report costs one copy of the filter's bytes however many blocks are cached.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice

from .block_hash import DEFAULT_FILTER_FPR, CountingBlockFilter, hash_block, root_hash


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int, filter_fpr: float | None = DEFAULT_FILTER_FPR):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # block hash -> block holding that prefix, oldest register / prefix hit / release first (a block that a
        # running sequence holds stays where its last such event put it, however often it is read since)
        self.cached: OrderedDict[int, Block] = OrderedDict()
        # every cached hash, for the router (None: no filter); sized for a pool full of cached blocks
        self.filter = CountingBlockFilter.for_capacity(num_blocks, filter_fpr) if filter_fpr else None

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self) -> Block:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached content
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                if self.filter is not None:
                    self.filter.remove(block.block_hash)
            block.block_hash = None
        block.ref_count = 1
        return block

    def touch(self, block: Block) -> None:
        """A prefix-cache hit takes the block: one more user, and it becomes the most recently used."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1
        self._used(block)

    def release(self, block: Block) -> None:
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block.block_id] = None
            self._used(block)

    def register(self, block: Block, block_hash: int) -> None:
        if block_hash not in self.cached:
            self.cached[block_hash] = block
            block.block_hash = block_hash
            if self.filter is not None:
                self.filter.add(block_hash)

    def _used(self, block: Block) -> None:
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            self.cached.move_to_end(block.block_hash)

    def hashes_by_recency(self, limit: int | None = None) -> list[int]:
        """Cached block hashes, latest register / prefix hit / release first; `limit` bounds the cost (O(limit),
        not O(cache))."""
        newest_first = reversed(self.cached)
        return list(newest_first if limit is None else islice(newest_first, max(0, int(limit))))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 filter_fpr: float = DEFAULT_FILTER_FPR):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, filter_fpr if enable_prefix_caching else None)
        self._blocks: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[int]] = {}   # chain hashes of the sequence's registered full blocks
        self._roots: dict[str, int] = {}           # the root of the sequence's chain (its cache salt's)

    # ---- prefix cache ------------------------------------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int], salt: int = 0) -> list[Block]:
        """Blocks already holding the leading full blocks of `token_ids`, cached under the same `salt`. At
        least the last token is always left to compute, because the model must produce logits for it."""
        if not self.enable_prefix_caching:
            return []
        bs, found, parent = self.block_size, [], root_hash(salt)
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            block = self.pool.cached.get(parent)
            if block is None:
                break
            found.append(block)
        return found

    def cached_block_hashes(self, limit: int | None = None) -> list[int]:
        """The prefix cache's block hashes, most recently used first (a hit refreshes a block), at most
        `limit` of them. O(limit): the engine thread can afford a bounded list every report period."""
        return self.pool.hashes_by_recency(limit)

    def block_filter(self) -> dict | None:
        """A Bloom filter of every cached block hash: {"bits": bytes, "k": int, "n": cached blocks}, or None
        with prefix caching off. One copy of the filter's bytes, whatever the number of cached blocks."""
        f = self.pool.filter
        if f is None:
            return None
        return {"bits": f.snapshot(), "k": f.k, "n": len(self.pool.cached)}

    # ---- allocation ----------------------------------------------------------------------------------
    def can_allocate(self, num_tokens: int, cached: list[Block] = ()) -> bool:
        needed = -(-num_tokens // self.block_size) - len(cached)
        reclaimed_from_free = sum(1 for b in cached if b.ref_count == 0)
        return needed <= self.pool.num_free - reclaimed_from_free

    def allocate(self, seq_id: str, token_ids: list[int], num_tokens: int, cached: list[Block] = (),
                 salt: int = 0) -> bool:
        """Make the sequence's block table cover its first `num_tokens` tokens (`token_ids` holds at least
        those). `cached` prefix blocks (found under the same `salt`) are adopted on the first call, which
        also fixes the salt its full blocks are registered under. Returns False (changing nothing) if the
        pool has too few free blocks."""
        blocks = self._blocks.get(seq_id)
        if blocks is None:
            if not self.can_allocate(num_tokens, cached):
                return False
            blocks = self._blocks[seq_id] = []
            self._hashes[seq_id] = []
            self._roots[seq_id] = root_hash(salt)
            for b in cached:
                self.pool.touch(b)
                blocks.append(b)
                self._hashes[seq_id].append(b.block_hash)
        needed = -(-num_tokens // self.block_size) - len(blocks)
        if needed > self.pool.num_free:
            return False
        for _ in range(needed):
            blocks.append(self.pool.allocate())
        self._register_full_blocks(seq_id, token_ids, num_tokens)
        return True

    def _register_full_blocks(self, seq_id: str, token_ids: list[int], num_tokens: int) -> None:
        # Tokens whose k/v this step writes count as present: every layer writes the whole batch's k/v
        # before any attention reads it, so a block is usable by others from the step that fills it.
        if not self.enable_prefix_caching:
            return
        hashes, blocks, bs = self._hashes[seq_id], self._blocks[seq_id], self.block_size
        parent = hashes[-1] if hashes else self._roots[seq_id]
        for i in range(len(hashes), num_tokens // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            hashes.append(parent)
            self.pool.register(blocks[i], parent)

    def free(self, seq_id: str) -> None:
        blocks = self._blocks.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        self._roots.pop(seq_id, None)
        for b in reversed(blocks or ()):
            self.pool.release(b)

    def block_table(self, seq_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(seq_id, ())]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free
