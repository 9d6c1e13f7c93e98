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
