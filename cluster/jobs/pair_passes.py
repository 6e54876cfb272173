"""The data position of a job that makes passes over preference pairs (offline DPO, reward-model bt / haf): each
pass shuffles the pairs with one seeded `random.Random`, and each step takes the next `per_call` of them, padded
with random repeats to a multiple of the learner world size. `state_dict()` (epoch, position, steps, the pass's
order and the RNG's state) is what a run checkpoint records, so a resumed job takes exactly the chunks the
uninterrupted one would have taken."""

from __future__ import annotations

import random
from collections.abc import Iterator

from troupe.cluster.run.learn import pad_to_multiple


class PairPasses:
    """`epochs` passes over `items` pairs; iterating yields (epoch, step, [pair index]) from the current position."""

    def __init__(self, items: int, epochs: int, per_call: int, world: int, seed: int) -> None:
        self.items, self.epochs, self.per_call, self.world = items, epochs, per_call, world
        self.rng = random.Random(seed)
        self.epoch, self.position, self.step = 0, 0, 0
        self.order: list[int] | None = None  # this pass's order; None until the pass starts

    @property
    def total(self) -> int:
        """Steps over all passes."""
        return self.epochs * -(-self.items // self.per_call)

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        while self.epoch < self.epochs:
            if self.order is None:
                self.order = list(range(self.items))
                self.rng.shuffle(self.order)  # the same draws as shuffling the pairs themselves
            chunk = pad_to_multiple(
                self.order[self.position : self.position + self.per_call], self.world, self.rng
            )
            epoch, step = self.epoch, self.step
            self.position += self.per_call
            self.step += 1
            if self.position >= self.items:  # the state after this step already points at the next pass
                self.epoch, self.position, self.order = self.epoch + 1, 0, None
            yield epoch, step, chunk

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "items": self.items,
            "per_call": self.per_call,
            "world": self.world,
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "order": self.order,
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refused (ValueError, naming what differs) when it was saved for another number of
        pairs, pairs per step or world size: its positions would point at other pairs."""
        for key, have in (("items", self.items), ("per_call", self.per_call), ("world", self.world)):
            if state[key] != have:
                raise ValueError(
                    f"the checkpoint's data position was saved for {key}={state[key]}, this run has {have}: "
                    "resume with the same pairs, dataset.pairs_per_iteration and learner.world_size"
                )
        self.epoch, self.position, self.step = state["epoch"], state["position"], state["step"]
        self.order = state["order"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
