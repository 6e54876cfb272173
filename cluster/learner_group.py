"""Creates the ranks of one trained role (policy learner or PPO critic) as Ray actors forming one DeepSpeed
process group, and drives them in lock-step.

Every collective call goes to all ranks at once; per-rank metrics are averaged, per-sample outputs concatenated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ray
import torch

from actors.learner.actor import Learner
from actors.learner.batch import TrainSample
from actors.learner.critic import Critic
from actors.learner.dpo import PreferencePair
from actors.learner.engine import LearnerSpec
from actors.protocol import WeightBundle
from cluster.fleet import split_evenly
from cluster.placement import RankPlacement

log = logging.getLogger("troupe.learner_group")


class LearnerGroup:
    def __init__(
        self,
        spec: LearnerSpec,
        num_cpus: float,
        num_gpus: float,
        env: dict[str, str],
        timeout_s: float,
        role: type = Learner,
        placement: RankPlacement | None = None,
        **role_kwargs,
    ) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.owns_placement = placement is None
        self.placement = placement or RankPlacement(spec.world_size, num_cpus, num_gpus, timeout_s)
        remote = ray.remote(role)
        self.ranks = [
            remote.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                runtime_env={"env_vars": env},
                **self.placement.options_for(rank),
            ).remote(spec, rank, **role_kwargs)
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
            log.info("%s group ready: %s", type(self).__name__, self.info)
        return self.info

    def _all(self, method: str, shares: Sequence, *args) -> list:
        refs = [getattr(r, method).remote(s, *args) for r, s in zip(self.ranks, shares, strict=True)]
        return ray.get(refs, timeout=self.timeout_s)

    def train(self, samples: Sequence[TrainSample], kl_coef: float | None = None) -> dict:
        per_rank = self._all("train", split_evenly(samples, len(self.ranks)), kl_coef)
        return _merge(per_rank)

    def train_dpo(self, pairs: Sequence[PreferencePair]) -> dict:
        if len(pairs) % len(self.ranks):
            raise ValueError(f"{len(pairs)} pairs do not split evenly over {len(self.ranks)} learner ranks")
        merged = _merge(self._all("train_dpo", split_evenly(pairs, len(self.ranks))))
        merged["pairs"] = len(pairs)
        return merged

    def train_pairs(self, pairs: Sequence[PreferencePair]) -> dict:
        """Reward-model training step (RewardTrainer ranks)."""
        if len(pairs) % len(self.ranks):
            raise ValueError(f"{len(pairs)} pairs do not split evenly over {len(self.ranks)} ranks")
        return _merge(self._all("train", split_evenly(pairs, len(self.ranks))))

    def pair_rewards(self, pairs: Sequence[PreferencePair]) -> list[tuple[float, float]]:
        return [r for part in self._all("rewards", split_evenly(pairs, len(self.ranks))) for r in part]

    def save_reward_model(self, folder: str, tokenizer_path: str) -> str:
        return ray.get([r.save.remote(folder, tokenizer_path) for r in self.ranks], timeout=self.timeout_s)[0]

    def pair_margins(self, pairs: Sequence[PreferencePair]) -> list[float]:
        return [m for part in self._all("pair_margins", split_evenly(pairs, len(self.ranks))) for m in part]

    def values(self, samples: Sequence[TrainSample]) -> list[torch.Tensor]:
        """Critic values per sample, in order."""
        return [v for part in self._all("values", split_evenly(samples, len(self.ranks))) for v in part]

    def train_critic(self, samples: Sequence[TrainSample], returns: Sequence[torch.Tensor]) -> dict:
        shares = split_evenly(list(zip(samples, returns, strict=True)), len(self.ranks))
        refs = [
            r.train.remote([s for s, _ in share], [t for _, t in share])
            for r, share in zip(self.ranks, shares, strict=True)
        ]
        return _merge(ray.get(refs, timeout=self.timeout_s))

    def value_loss_on(self, samples: Sequence[TrainSample], returns: Sequence[torch.Tensor]) -> float:
        shares = split_evenly(list(zip(samples, returns, strict=True)), len(self.ranks))
        refs = [
            r.value_loss_on.remote([s for s, _ in share], [t for _, t in share])
            for r, share in zip(self.ranks, shares, strict=True)
        ]
        losses = ray.get(refs, timeout=self.timeout_s)
        return sum(losses) / len(losses)

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
        if self.owns_placement:
            self.placement.release()


def critic_group(spec: LearnerSpec, num_cpus, num_gpus, env, timeout_s, placement=None) -> LearnerGroup:
    return LearnerGroup(spec, num_cpus, num_gpus, env, timeout_s, role=Critic, placement=placement)


def _merge(per_rank: list[dict]) -> dict:
    """Means over equally sized shares; counters from rank 0; per-sample lists concatenated in rank order."""
    merged: dict = {}
    for key in per_rank[0]:
        if key.startswith("_"):
            merged[key] = [x for m in per_rank for x in m[key]]
        else:
            merged[key] = sum(m[key] for m in per_rank) / len(per_rank)
    for key in ("optimizer_steps", "lr"):
        if key in per_rank[0]:
            merged[key] = per_rank[0][key]
    if "train_s" in per_rank[0]:
        merged["train_s"] = max(m["train_s"] for m in per_rank)
    return merged


def fetch_bundle(ref: ray.ObjectRef, timeout_s: float) -> WeightBundle:
    return ray.get(ref, timeout=timeout_s)
