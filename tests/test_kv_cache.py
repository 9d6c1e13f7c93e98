"""Block pool, prefix cache hash chains, reference counts and LRU eviction."""
from workers.block_hash import hash_token_blocks
from workers.kv_cache import KVCacheManager


def test_hash_chain_is_prefix_sensitive_and_deterministic():
    a = hash_token_blocks(list(range(40)), 16)
    assert len(a) == 2  # the trailing partial block has no hash
    assert a == hash_token_blocks(list(range(40)), 16)
    b = hash_token_blocks([99] + list(range(1, 40)), 16)
    assert a[0] != b[0] and a[1] != b[1]  # a changed first block changes every later hash


def test_shared_prefix_is_reused_with_refcounts():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    assert kv.allocate("a", tokens, len(tokens))
    assert kv.num_free_blocks == 5
    cached = kv.find_cached_prefix(tokens[:8] + [50, 51])
    assert [b.block_id for b in cached] == kv.block_table("a")[:2]
    assert kv.allocate("b", tokens[:8] + [50, 51], 10, cached)
    assert kv.block_table("b")[:2] == kv.block_table("a")[:2]
    assert kv.num_free_blocks == 4  # only one new block for b's tail
    assert cached[0].ref_count == 2
    kv.free("a")
    assert cached[0].ref_count == 1


def test_last_token_is_never_served_from_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    kv.allocate("a", tokens, 8)
    assert len(kv.find_cached_prefix(tokens)) == 1  # block 2 would leave nothing to compute


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    first = list(range(100, 108))
    kv.allocate("a", first, 8)
    kv.free("a")
    assert kv.num_free_blocks == 4
    assert len(kv.find_cached_prefix(first + [1])) == 2  # still hit after free
    kv.allocate("b", list(range(200, 208)), 8)           # takes the two never-used blocks first
    assert len(kv.find_cached_prefix(first + [1])) == 2
    kv.allocate("c", list(range(300, 304)), 4)           # now one cached block must be evicted
    assert len(kv.find_cached_prefix(first + [1])) < 2


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert not kv.allocate("a", list(range(12)), 12)
    assert kv.num_free_blocks == 2 and kv.block_table("a") == []


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    kv.allocate("a", list(range(9)), 9)
    assert kv.find_cached_prefix(list(range(9))) == []
    assert kv.cached_block_hashes() == []


def test_salt_zero_is_the_plain_chain_and_other_salts_share_nothing():
    from workers.block_hash import ROOT_HASH, hash_block
    tokens = list(range(48))
    plain = hash_token_blocks(tokens, 16)
    assert hash_token_blocks(tokens, 16, salt=0) == plain
    # salt 0 is exactly the chain from ROOT_HASH (what routers and replicas computed before salts existed)
    parent, chain = ROOT_HASH, []
    for i in range(3):
        parent = hash_block(parent, tokens[i * 16:(i + 1) * 16])
        chain.append(parent)
    assert plain == chain
    salted = {s: hash_token_blocks(tokens, 16, salt=s) for s in (1, 2, -1, 2**64 + 5)}
    assert salted[1] == hash_token_blocks(tokens, 16, salt=1)  # deterministic
    every = [h for hs in [plain, *salted.values()] for h in hs]
    assert len(set(every)) == len(every)  # no block hash shared between salts
    assert hash_token_blocks(tokens, 16, limit=2, salt=1) == salted[1][:2]


def test_prefix_cache_hits_only_under_the_same_salt():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(10))
    assert kv.allocate("a", tokens, len(tokens), salt=7)
    assert kv.find_cached_prefix(tokens, salt=0) == []
    assert kv.find_cached_prefix(tokens, salt=8) == []
    cached = kv.find_cached_prefix(tokens, salt=7)
    assert [b.block_id for b in cached] == kv.block_table("a")[:2]
    assert set(kv.cached_block_hashes()) == set(hash_token_blocks(tokens, 4, salt=7))  # what the router sees
    kv.free("a")
    assert kv.allocate("b", tokens, len(tokens), salt=0)  # registers the unsalted chain beside the salted one
    assert len(kv.find_cached_prefix(tokens, salt=0)) == 2 and len(kv.find_cached_prefix(tokens, salt=7)) == 2


# ---- what the router's reports are built from -------------------------------------------------------------
def _blocks(start, n, bs=4):
    return [start * 1000 + i for i in range(n * bs)]


def test_cached_hashes_come_most_recently_used_first_and_a_hit_refreshes_a_block():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    hot = _blocks(1, 4)                           # a system prompt, registered first
    assert kv.allocate("hot", hot + [0], 17)
    kv.free("hot")
    for i in range(2, 8):                          # newer prompts registered after it
        assert kv.allocate(f"s{i}", _blocks(i, 2) + [0], 9)
        kv.free(f"s{i}")
    hot_hashes = hash_token_blocks(hot, 4)
    assert set(kv.cached_block_hashes()[-4:]) == set(hot_hashes)   # least recently used: last
    # A prefix-cache hit on the hot prompt makes it the most recently used.
    cached = kv.find_cached_prefix(hot + [5])
    assert len(cached) == 4
    assert kv.allocate("again", hot + [5], 17, cached)
    assert set(kv.cached_block_hashes(limit=4)) == set(hot_hashes)
    kv.free("again")
    # Released tail first: the prompt's head is the most recently used, its tail next.
    assert kv.cached_block_hashes(limit=4) == hot_hashes
    assert len(kv.cached_block_hashes()) == 4 + 6 * 2
    assert kv.cached_block_hashes(limit=0) == []


def test_the_block_filter_tracks_registration_and_eviction():
    from workers.block_hash import filter_contains
    kv = KVCacheManager(num_blocks=4, block_size=4)
    first = list(range(100, 108))
    kv.allocate("a", first, 8)
    kv.free("a")
    f = kv.block_filter()
    assert f["n"] == 2 and len(f["bits"]) * 8 >= 64
    assert all(filter_contains(f["bits"], f["k"], h) for h in hash_token_blocks(first, 4))
    kv.allocate("b", list(range(200, 216)), 16)       # needs all four blocks: both of a's are evicted
    f = kv.block_filter()
    assert f["n"] == 4
    assert not any(filter_contains(f["bits"], f["k"], h) for h in hash_token_blocks(first, 4))
    assert all(filter_contains(f["bits"], f["k"], h) for h in hash_token_blocks(list(range(200, 216)), 4))
    assert KVCacheManager(4, 4, enable_prefix_caching=False).block_filter() is None


def test_counting_filter_equals_a_filter_built_from_the_set_after_churn():
    import random

    from workers.block_hash import CountingBlockFilter, filter_from_hashes, filter_hits, filter_positions, filter_shape
    rng = random.Random(1)
    num_bits, k = filter_shape(2000, 0.01)
    f = CountingBlockFilter(num_bits, k)
    live: set[int] = set()
    for _ in range(5000):
        if live and rng.random() < 0.45:
            h = live.pop()
            f.remove(h)
        else:
            h = rng.getrandbits(64)
            live.add(h)
            f.add(h)
    assert f.snapshot() == filter_from_hashes(sorted(live), num_bits, k)
    assert filter_hits(f.snapshot(), filter_positions(sorted(live), num_bits, k)).all()   # no false negatives
    others = [rng.getrandbits(64) for _ in range(20000)]
    fpr = filter_hits(f.snapshot(), filter_positions(others, num_bits, k)).mean()
    assert fpr < 0.03, fpr                         # sized for 1% at 2000 entries; holds fewer
