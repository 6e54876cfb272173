"""Placement of learner ranks: a PACK placement group of one bundle per rank when GPUs are used.

On CPU-only runs, fractional num_cpus is enough (Ray does not pin threads) and no group is reserved,
because reserved bundles would starve later actors of CPU.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class RankPlacement:
    def __init__(self, world_size: int, num_cpus: float, num_gpus: float, timeout_s: float) -> None:
        self.group = None
        if num_gpus > 0:
            bundles = [{"CPU": num_cpus, "GPU": num_gpus} for _ in range(world_size)]
            self.group = placement_group(bundles, strategy="PACK")
            ray.get(self.group.ready(), timeout=timeout_s)

    def options_for(self, rank: int) -> dict:
        if self.group is None:
            return {}
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=rank
            )
        }

    def release(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
