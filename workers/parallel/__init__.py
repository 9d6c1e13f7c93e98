"""Tensor- and pipeline-parallel shard groups on Ray placement groups."""
from .ray_executor import RayExecutor

__all__ = ["RayExecutor"]
