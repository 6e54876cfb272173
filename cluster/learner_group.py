"""Creates the learner ranks as Ray actors, forms one DeepSpeed process group, and drives them in lock-step.

Every collective call (train, export, save) goes to all ranks at once; rank 0 returns the gathered results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ray

from actors.learner.actor import Learner, LearnerSpec
from actors.learner.batch import TrainSample
from actors.protocol import WeightBundle
from cluster.fleet import split_evenly
from cluster.placement import RankPlacement

log = logging.getLogger("troupe.learner_group")


class LearnerGroup:
    def __init__(
        self, spec: LearnerSpec, num_cpus: float, num_gpus: float, env: dict[str, str], timeout_s: float
    ) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.placement = RankPlacement(spec.world_size, num_cpus, num_gpus, timeout_s)
        remote = ray.remote(Learner)
        self.ranks = [
            remote.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                runtime_env={"env_vars": env},
                name=None,
                **self.placement.options_for(rank),
            ).remote(spec, rank)
            for rank in range(spec.world_size)
        ]
        addr, port = ray.get(self.ranks[0].address.remote(), timeout=timeout_s)
        # Not awaited here: the DeepSpeed setup runs while the caller starts other actors (see wait_ready).
        self._setup_refs = [r.setup.remote(addr, port) for r in self.ranks]
        self.info: list[dict] = []

    def wait_ready(self) -> list[dict]:
        if self._setup_refs:
            self.info = ray.get(self._setup_refs, timeout=self.timeout_s)
            self._setup_refs = []
            log.info("learner group ready: %s", self.info)
        return self.info

    def train(self, samples: Sequence[TrainSample]) -> dict:
        shares = split_evenly(samples, len(self.ranks))
        per_rank = ray.get(
            [r.train.remote(s) for r, s in zip(self.ranks, shares, strict=True)], timeout=self.timeout_s
        )
        # Metrics are means over equally sized shares; counters come from rank 0.
        merged = {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}
        merged["optimizer_steps"] = per_rank[0]["optimizer_steps"]
        merged["train_s"] = max(m["train_s"] for m in per_rank)
        return merged

    def export_weights(self, version: int) -> ray.ObjectRef:
        """Object ref of the rank-0 WeightBundle (gathered collectively); it stays in the object store."""
        refs = [r.export_weights.remote(version) for r in self.ranks]
        ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        return refs[0]

    def save_hf(self, path: str, tokenizer_path: str) -> str:
        out = ray.get([r.save_hf.remote(path, tokenizer_path) for r in self.ranks], timeout=self.timeout_s)
        return out[0]

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        self.placement.release()


def fetch_bundle(ref: ray.ObjectRef, timeout_s: float) -> WeightBundle:
    return ray.get(ref, timeout=timeout_s)
