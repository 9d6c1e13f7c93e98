"""Where a shard group's workers run: one placement-group bundle per shard.

Inside a Serve replica that was given `placement_group_bundles` (bundle 0 = the replica itself), the
shards take bundles 1..N of that group, so Serve owns the group's life. Anywhere else the executor creates
its own group (and removes it on shutdown). PACK (the default) keeps a TP group on one node where it can;
STRICT_PACK insists; SPREAD / STRICT_SPREAD spread shards over nodes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..errors import EngineUnavailableError

log = logging.getLogger(__name__)
STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def default_shard_resources() -> dict[str, float]:
    return {"GPU": 1.0} if torch.cuda.is_available() else {"CPU": 1.0}


@dataclass
class ShardPlacement:
    group: PlacementGroup
    first_bundle: int
    owned: bool            # created here (and so removed here)
    resources: dict[str, float]

    def scheduling(self, shard_index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group,
                                                placement_group_bundle_index=self.first_bundle + shard_index,
                                                placement_group_capture_child_tasks=True)

    def actor_options(self) -> dict:
        res = dict(self.resources)
        opts = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0)}
        if res:
            opts["resources"] = res
        return opts

    def release(self) -> None:
        if self.owned:
            remove_placement_group(self.group)


def place_shards(num_shards: int, resources: dict[str, float] | None, strategy: str,
                 timeout_s: float = 300.0) -> ShardPlacement:
    if strategy not in STRATEGIES:
        raise EngineUnavailableError(f"placement_strategy {strategy!r} is not one of {STRATEGIES}")
    resources = dict(resources or default_shard_resources())
    current = get_current_placement_group()
    if current is not None and len(current.bundle_specs) >= num_shards + 1:
        log.info("shards take bundles 1..%d of the replica's placement group", num_shards)
        return ShardPlacement(current, 1, owned=False, resources=dict(current.bundle_specs[1]))
    pg = placement_group([dict(resources) for _ in range(num_shards)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise EngineUnavailableError(
            f"the cluster cannot place {num_shards} shards of {resources} with {strategy} within {timeout_s:.0f}s "
            "(not enough free resources?)") from None
    return ShardPlacement(pg, 0, owned=True, resources=resources)
