"""Hashes of full KV-cache token blocks, shared by the engine's prefix cache and the cluster router.

A block's hash covers its own tokens *and* its parent's hash, so equal hashes mean equal whole prefixes
(a hash chain, as vLLM's automatic prefix caching does). The function is deterministic across processes
and machines (blake2b, not Python's randomised hash()), because the router compares hashes computed in
the ingress with hashes reported by replicas.

A non-zero `salt` (one per tenant, say) starts the chain from a different root, so none of its block hashes
equals another salt's: the same prompt under two salts shares no cached block (no cross-tenant cache hits,
hence no timing side channel). Salt 0 is the plain, shared chain.
"""
from __future__ import annotations

import hashlib
import math
from array import array
from typing import Sequence

# The hash of the (empty) prefix before the first block, unsalted.
ROOT_HASH = 0


def root_hash(salt: int = 0) -> int:
    """The chain's root for `salt` (any int): ROOT_HASH for 0, else a 64-bit hash of the salt."""
    if salt == 0:
        return ROOT_HASH
    h = hashlib.blake2b(digest_size=8, person=b"herd-cache-salt")
    h.update(salt.to_bytes((salt.bit_length() + 8) // 8, "little", signed=True))
    return int.from_bytes(h.digest(), "little", signed=False)


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little", signed=False))
    h.update(array("I", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little", signed=False)


def hash_token_blocks(token_ids: Sequence[int], block_size: int, limit: int | None = None,
                      salt: int = 0) -> list[int]:
    """Chain hashes of the leading *full* blocks of `token_ids` (a trailing partial block has no hash).

    `limit` caps how many blocks are hashed (the router never needs more than it will compare); `salt`
    selects the cache partition (0: the shared one).
    """
    n_full = len(token_ids) // block_size
    if limit is not None:
        n_full = min(n_full, limit)
    hashes: list[int] = []
    parent = root_hash(salt)
    for i in range(n_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


# ---- a compact summary of a set of block hashes, for the router's reports ---------------------------------------
# A Bloom filter over the block hashes themselves: they are already uniform 64-bit values, so a block's k bit
# positions come from its hash's two 32-bit halves by double hashing (Kirsch & Mitzenmacher), with no second
# hash function. Bit p lives in byte p >> 3, bit p & 7. The engine keeps it up to date block by block
# (CountingBlockFilter); the router tests membership (filter_contains / filter_hits); both use block_positions.
DEFAULT_FILTER_FPR = 0.01
DEFAULT_FILTER_MAX_BYTES = 2 << 20   # 2 MiB: 1% false positives up to ~1.7M cached blocks, more beyond
MAX_FILTER_K = 16


def filter_shape(capacity: int, fpr: float = DEFAULT_FILTER_FPR,
                 max_bytes: int = DEFAULT_FILTER_MAX_BYTES) -> tuple[int, int]:
    """(num_bits, k) of a Bloom filter for at most `capacity` hashes at false-positive rate `fpr`, its size
    capped at `max_bytes` (a full filter past the cap answers "maybe" more often, never "no" wrongly).
    num_bits is a multiple of 64 and at least 64."""
    if not 0 < fpr < 1:
        raise ValueError("fpr must be in (0, 1)")
    capacity = max(1, int(capacity))
    bits = capacity * -math.log(fpr) / (math.log(2) ** 2)
    num_bits = max(64, min(int(max_bytes) * 8, math.ceil(bits / 64) * 64) // 64 * 64)
    k = max(1, min(MAX_FILTER_K, round(num_bits / capacity * math.log(2))))
    return num_bits, k


def block_positions(block_hash: int, num_bits: int, k: int) -> list[int]:
    """The filter bits of one block hash (the same numbers filter_positions computes for many)."""
    h1, h2 = block_hash & 0xFFFFFFFF, (block_hash >> 32) | 1
    return [(h1 + i * h2) % num_bits for i in range(k)]


def filter_positions(block_hashes, num_bits: int, k: int):
    """Bit positions of many hashes at once: a (k, n) uint64 array (no overflow: h1 + i*h2 < 2^37)."""
    import numpy as np
    h = np.asarray(block_hashes, dtype=np.uint64)
    h1, h2 = h & np.uint64(0xFFFFFFFF), (h >> np.uint64(32)) | np.uint64(1)
    i = np.arange(k, dtype=np.uint64)[:, None]
    return (h1[None, :] + i * h2[None, :]) % np.uint64(num_bits)


def filter_probe(positions):
    """(byte index, bit shift) arrays of (k, n) `positions`: computed once, tested against many filters."""
    import numpy as np
    return (positions >> np.uint64(3)).astype(np.intp), (positions & np.uint64(7)).astype(np.uint8)


def filter_hits(bits: bytes, positions):
    """A bool array of n, True where the filter may hold the hash (all k bits set). `positions`: the (k, n)
    array of filter_positions, or its filter_probe."""
    import numpy as np
    byte_idx, shift = positions if isinstance(positions, tuple) else filter_probe(positions)
    got = (np.frombuffer(bits, dtype=np.uint8)[byte_idx] >> shift) & np.uint8(1)
    return got.all(axis=0)


def filter_contains(bits: bytes, k: int, block_hash: int) -> bool:
    return all(bits[p >> 3] >> (p & 7) & 1 for p in block_positions(block_hash, len(bits) * 8, k))


def filter_from_hashes(block_hashes, num_bits: int, k: int) -> bytes:
    """A filter's bytes built from a whole set at once (numpy; for engines that only list their hashes)."""
    import numpy as np
    arr = np.zeros(num_bits, dtype=bool)
    if len(block_hashes):
        arr[filter_positions(block_hashes, num_bits, k).ravel()] = True
    return np.packbits(arr, bitorder="little").tobytes()


class CountingBlockFilter:
    """A Bloom filter the engine updates as blocks are cached and evicted: a count per bit (saturating at
    255, so a bit that ever reached it stays set: a rare extra false positive, never a false negative) and
    the bit array itself, so a snapshot is one copy of num_bits / 8 bytes whatever the number of blocks."""

    def __init__(self, num_bits: int, k: int):
        if num_bits < 64 or num_bits % 64 or k < 1:
            raise ValueError("num_bits must be a positive multiple of 64 and k >= 1")
        self.num_bits, self.k = num_bits, k
        self.counts = bytearray(num_bits)
        self.bits = bytearray(num_bits // 8)
        self.num_hashes = 0

    @classmethod
    def for_capacity(cls, capacity: int, fpr: float = DEFAULT_FILTER_FPR,
                     max_bytes: int = DEFAULT_FILTER_MAX_BYTES) -> "CountingBlockFilter":
        return cls(*filter_shape(capacity, fpr, max_bytes))

    def add(self, block_hash: int) -> None:
        counts, bits = self.counts, self.bits
        for p in block_positions(block_hash, self.num_bits, self.k):
            c = counts[p]
            if c == 0:
                bits[p >> 3] |= 1 << (p & 7)
            if c < 255:
                counts[p] = c + 1
        self.num_hashes += 1

    def remove(self, block_hash: int) -> None:
        """Remove a hash that was added (removing one that was not would corrupt the counts)."""
        counts, bits = self.counts, self.bits
        for p in block_positions(block_hash, self.num_bits, self.k):
            c = counts[p]
            if c == 255:
                continue  # saturated: its true count is unknown, so the bit stays set
            counts[p] = c - 1
            if c == 1:
                bits[p >> 3] &= ~(1 << (p & 7)) & 0xFF
        self.num_hashes -= 1

    def __contains__(self, block_hash: int) -> bool:
        return filter_contains(self.bits, self.k, block_hash)

    def snapshot(self) -> bytes:
        return bytes(self.bits)
