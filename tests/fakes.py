"""Small shared test doubles."""
from workers.engine import EngineStats


def engine_stats(**overrides) -> EngineStats:
    """An idle engine's EngineStats (100 free KV blocks, zero counters) with `overrides` applied."""
    base = dict(num_running=0, num_waiting=0, kv_blocks_total=100, kv_blocks_free=100, prefix_cache_hit_tokens=0,
                prompt_tokens=0, generation_tokens=0, num_preemptions=0)
    return EngineStats(**{**base, **overrides})
