"""Where a shard group's workers run: one placement-group bundle per shard.

Inside a Serve replica that was given `placement_group_bundles` (bundle 0 = the replica itself), the shards
take bundles 1..T·P of that group, so Serve owns the group's life. Anywhere else the executor creates its
own group (and removes it on shutdown). The strategy decides how bundles land on nodes: PACK (the default)
fills as few nodes as it can, STRICT_PACK insists on one node, SPREAD / STRICT_SPREAD spread them out.

Whatever the strategy, shards are then assigned to bundles node by node (`assign_bundles`): the T ranks of
a pipeline stage take bundles on the same node whenever the node holds a multiple of T of them, so tensor
parallelism (an all-reduce per layer) stays inside a node and only pipeline hand-offs (one send per stage
per micro-batch) cross nodes. With SPREAD over two 4-GPU nodes, TP2×PP2 puts each stage on its own node.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray
import torch
from ray.util.placement_group import (PlacementGroup, get_current_placement_group, placement_group,
                                      placement_group_table, remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..errors import EngineUnavailableError

log = logging.getLogger(f"herd.{__name__}")
STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
PLACEMENT_TIMEOUT_S = 600.0   # an autoscaling cluster may need minutes to add GPU nodes


def default_shard_resources() -> dict[str, float]:
    return {"GPU": 1.0} if torch.cuda.is_available() else {"CPU": 1.0}


def assign_bundles(bundles: list[int], node_of: dict[int, str], tp_size: int) -> list[int]:
    """Bundle index for each shard (global rank order: stage-major, TP rank minor).

    Bundles are grouped by node (nodes in order of first appearance), so consecutive ranks — one stage's TP
    group — share a node whenever the node's bundle count allows it.
    """
    nodes: dict[str, list[int]] = {}
    for b in bundles:
        nodes.setdefault(node_of.get(b, ""), []).append(b)
    ordered = [b for group in nodes.values() for b in group]
    if any(len(g) % tp_size for g in nodes.values()):
        log.warning("placement: bundles per node %s are not multiples of TP %d; a TP group spans nodes",
                    {n[:8]: len(g) for n, g in nodes.items()}, tp_size)
    return ordered


@dataclass
class ShardPlacement:
    group: PlacementGroup
    bundles: list[int]             # bundle index of each shard, by global rank
    owned: bool                    # created here (and so removed here)
    resources: list[dict[str, float]] = field(default_factory=list)   # each shard's bundle

    def scheduling(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group,
                                                placement_group_bundle_index=self.bundles[rank],
                                                placement_group_capture_child_tasks=True)

    def actor_options(self, rank: int) -> dict:
        """Ray actor options that take the whole of the shard's bundle."""
        res = dict(self.resources[rank])
        opts = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0)}
        if "memory" in res:
            opts["memory"] = res.pop("memory")
        res = {k: v for k, v in res.items() if not k.startswith("bundle_group")}
        if res:
            opts["resources"] = res
        return opts

    def release(self) -> None:
        if self.owned:
            try:
                remove_placement_group(self.group)
            except Exception as e:  # noqa: BLE001 - Ray already gone at interpreter exit
                log.debug("removing placement group: %s", e)


def _bundle_nodes(pg: PlacementGroup) -> dict[int, str]:
    table = placement_group_table(pg) or {}
    return {int(k): v for k, v in (table.get("bundles_to_node_id") or {}).items()}


def place_shards(tp_size: int, pp_size: int, resources: dict[str, float] | None, strategy: str,
                 timeout_s: float = PLACEMENT_TIMEOUT_S) -> ShardPlacement:
    """Reserve one bundle per shard (or borrow them from the caller's placement group)."""
    n = tp_size * pp_size
    if strategy not in STRATEGIES:
        raise EngineUnavailableError(f"placement_strategy {strategy!r} is not one of {STRATEGIES}")
    current = get_current_placement_group()
    if current is not None:
        if len(current.bundle_specs) >= n + 1:
            if len(current.bundle_specs) > n + 1:
                log.warning("the replica's placement group has %d bundles; shards use bundles 1..%d",
                            len(current.bundle_specs), n)
            candidates = list(range(1, n + 1))
            bundles = assign_bundles(candidates, _bundle_nodes(current), tp_size)
            log.info("shards take bundles 1..%d of the caller's placement group", n)
            return ShardPlacement(current, bundles, owned=False,
                                  resources=[dict(current.bundle_specs[b]) for b in bundles])
        log.warning("the caller's placement group has %d bundles, %d needed (1 + TP·PP); creating a new group",
                    len(current.bundle_specs), n + 1)
    resources = dict(resources or default_shard_resources())
    pg = placement_group([dict(resources) for _ in range(n)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise EngineUnavailableError(
            f"the cluster could not place {n} shards of {resources} with {strategy} within {timeout_s:.0f}s "
            f"(cluster resources: {ray.cluster_resources()}, free: {ray.available_resources()})") from None
    bundles = assign_bundles(list(range(n)), _bundle_nodes(pg), tp_size)
    return ShardPlacement(pg, bundles, owned=True, resources=[dict(resources) for _ in range(n)])
