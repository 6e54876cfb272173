"""Creates the ranks of one trained role (policy learner or PPO critic) as Ray actors forming one DeepSpeed
process group, and drives them in lock-step.

Every collective call goes to all ranks at once; per-rank metrics are averaged, per-sample outputs concatenated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import ray
import torch

from actors.learner.actor import Learner
from actors.learner.batch import RolloutBatch
from actors.learner.config import RankSetup
from actors.learner.critic import Critic
from actors.learner.dpo import PreferencePair
from cluster.config import TroupeConfig
from cluster.fleet import split_evenly
from cluster.placement import RankPlacement

log = logging.getLogger("troupe.learner_group")


class LearnerGroup:
    def __init__(
        self,
        spec: RankSetup,
        env: dict[str, str],
        timeout_s: float,
        role: type = Learner,
        placement: RankPlacement | None = None,
    ) -> None:
        t = spec.train
        self.spec = spec
        self.timeout_s = timeout_s
        self.owns_placement = placement is None
        self.placement = placement or RankPlacement(t.world_size, t.num_cpus, t.num_gpus, timeout_s)
        remote = ray.remote(role)
        self.ranks = [
            remote.options(
                num_cpus=t.num_cpus,
                num_gpus=t.num_gpus,
                runtime_env={"env_vars": env},
                **self.placement.options_for(rank),
            ).remote(spec, rank)
            for rank in range(t.world_size)
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

    def train(self, batch: RolloutBatch, kl_coef: float) -> tuple[dict, list[torch.Tensor] | None]:
        """Each rank updates on its whole prompt groups; returns merged metrics and per-row returns (PPO)."""
        shares = batch.shares(len(self.ranks))
        out = ray.get(
            [r.train.remote(s, kl_coef) for r, s in zip(self.ranks, shares, strict=True)],
            timeout=self.timeout_s,
        )
        returns = [row for _, rows in out for row in rows] if out[0][1] is not None else None
        return _merge([m for m, _ in out]), returns

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

    def save_reward_model(self, folder: str, tokenizer_path: str) -> str:
        return ray.get([r.save.remote(folder, tokenizer_path) for r in self.ranks], timeout=self.timeout_s)[0]

    def pair_margins(self, pairs: Sequence[PreferencePair]) -> list[float]:
        return [m for part in self._all("pair_margins", split_evenly(pairs, len(self.ranks))) for m in part]

    def values(self, batch: RolloutBatch) -> list[torch.Tensor]:
        """Critic values at each row's response tokens, in row order."""
        shares = batch.shares(len(self.ranks), whole_groups=False)
        return [v for part in self._all("values", shares) for v in part]

    def train_critic(self, batch: RolloutBatch) -> dict:
        return _merge(self._all("train", batch.shares(len(self.ranks), whole_groups=False)))

    def value_loss_on(self, batch: RolloutBatch) -> float:
        losses = self._all("value_loss_on", batch.shares(len(self.ranks), whole_groups=False))
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


def critic_group(spec: RankSetup, env, timeout_s, placement=None) -> LearnerGroup:
    return LearnerGroup(spec, env, timeout_s, role=Critic, placement=placement)


def _merge(per_rank: list[dict]) -> dict:
    """Means over equally sized shares; counters from rank 0; per-sample lists concatenated in rank order."""
    merged: dict = {}
    for key in per_rank[0]:
        merged[key] = sum(m[key] for m in per_rank) / len(per_rank)
    for key in ("optimizer_steps", "lr"):
        if key in per_rank[0]:
            merged[key] = per_rank[0][key]
    if "train_s" in per_rank[0]:
        merged["train_s"] = max(m["train_s"] for m in per_rank)
    return merged


def policy_setup(cfg: TroupeConfig, model_path: str, total_steps: int | None = None) -> RankSetup:
    """The policy ranks' setup: the learner and algo configs as they are, plus what the driver resolved."""
    lc = cfg.learner
    return RankSetup(
        model_path,
        lc,
        cfg.algo,
        total_steps=cfg.run.iterations * lc.epochs * lc.mini_batches if total_steps is None else total_steps,
        response_budget=cfg.generator.max_new_tokens,
        export_dtype=cfg.generator.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.run.seed,
    )


def critic_setup(cfg: TroupeConfig, policy: RankSetup) -> RankSetup:
    return replace(policy, train=cfg.critic.train_config(cfg.learner), value_clip=cfg.critic.value_clip)
