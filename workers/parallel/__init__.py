"""Tensor- and pipeline-parallel shard groups on Ray placement groups.

RayExecutor is imported on first use, so that workers.parallel.plan (arithmetic only) imports neither Ray nor
torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["RayExecutor"]


def __getattr__(name: str) -> Any:
    if name != "RayExecutor":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .ray_executor import RayExecutor
    globals()[name] = RayExecutor
    return RayExecutor


if TYPE_CHECKING:
    from .ray_executor import RayExecutor
