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

from troupe.actors.learner.actor import Learner
from troupe.actors.learner.batch import RolloutBatch
from troupe.actors.learner.config import RankSetup
from troupe.actors.learner.critic import Critic
from troupe.actors.learner.dpo import PreferencePair
from troupe.actors.weight_buckets import BucketedWeights
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.durability.faults import gather
from troupe.cluster.fleet.placement import RankPlacement
from troupe.cluster.fleet.pool import split_evenly

log = logging.getLogger("troupe.learner_group")


class LearnerGroup:
    """`timeout_s` bounds start-up; `deadline_s` every later group call (faults.learn_s). A dead rank or a call
    past its deadline raises RankLost; `rebuild()` then starts new ranks on a fresh port."""

    def __init__(
        self,
        spec: RankSetup,
        env: dict[str, str],
        timeout_s: float,
        role: type = Learner,
        placement: RankPlacement | None = None,
        deadline_s: float | None = None,
        name: str = "learner",
        owns_placement: bool | None = None,  # None: it owns the placement it made itself
    ) -> None:
        t = spec.train
        self.spec, self.env, self.role, self.name = spec, env, role, name
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s or timeout_s
        self.owns_placement = placement is None if owns_placement is None else owns_placement
        self.placement = placement or RankPlacement(t.world_size, t.num_cpus, t.num_gpus, timeout_s)
        self.rebuilds = 0
        self.info: list[dict] = []
        self._start()

    def _start(self) -> None:
        t = self.spec.train
        remote = ray.remote(self.role)
        self.ranks = [
            remote.options(
                num_cpus=t.num_cpus,
                num_gpus=t.num_gpus,
                runtime_env={"env_vars": self.env},
                max_restarts=0,
                **self.placement.options_for(rank),
            ).remote(self.spec, rank)
            for rank in range(t.world_size)
        ]
        addr, port = gather([self.ranks[0].rendezvous.remote()], self.timeout_s, self.name)[0]
        # Not awaited here: the DeepSpeed setup runs while the caller starts other actors (see wait_ready).
        self._setup_refs = [r.setup.remote(addr, port) for r in self.ranks]

    def rebuild(self) -> None:
        """New ranks in the same placement, a new process group on a fresh port; the caller restores state."""
        self._kill_ranks()
        self.rebuilds += 1
        self._start()
        self.wait_ready()

    def wait_ready(self) -> list[dict]:
        if self._setup_refs:
            self.info = gather(self._setup_refs, self.timeout_s, self.name)
            self._setup_refs = []
            log.info("%s group ready: %s", self.name, self.info)
        return self.info

    def _all(self, method: str, shares: Sequence, *args) -> list:
        refs = [getattr(r, method).remote(s, *args) for r, s in zip(self.ranks, shares, strict=True)]
        return gather(refs, self.deadline_s, self.name)

    def _each(self, method: str, *args) -> list:
        """The same call on every rank (collective: ZeRO gathers, checkpoints)."""
        return gather([getattr(r, method).remote(*args) for r in self.ranks], self.deadline_s, self.name)

    def train(self, batch: RolloutBatch, kl_coef: float) -> tuple[dict, dict]:
        """Each rank updates on its whole prompt groups; returns merged metrics and per-row outputs in row order:
        "advantage" (floats), "nonfinite" (bools: rows left out for an inf/NaN advantage) and "returns" (PPO:
        tensors; else None)."""
        shares = batch.shares(len(self.ranks))
        out = self._all("train", shares, kl_coef)
        with_returns = out[0][1]["returns"] is not None
        rows = {
            "advantage": [a for _, r in out for a in r["advantage"]],
            "nonfinite": [bad for _, r in out for bad in r["nonfinite"]],
            "returns": [row for _, r in out for row in r["returns"]] if with_returns else None,
        }
        return _merge([m for m, _ in out]), rows

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
        return self._each("save", folder, tokenizer_path)[0]

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

    def export_weights(self, version: int, bucket_mb: float = 256) -> BucketedWeights:
        """The policy's weights as checksummed buckets in the object store, owned by rank 0 (gathered
        collectively); the driver passes the small manifest-and-refs object on to the generators."""
        return self._each("export_buckets", version, int(bucket_mb * 2**20))[0]

    # GPU weight sync (cluster/sync/nccl.py): rank 0 is rank 0 of the weight-update group.
    def weight_layout(self) -> dict:
        return self._each("weight_layout")[0]

    def open_weight_transfer(self) -> str:
        return self._each("open_weight_transfer")[0]

    def join_weight_transfer(self, unique_id: str, world_size: int) -> None:
        self._each("join_weight_transfer", unique_id, world_size)

    def send_weights(self, version: int, info: dict) -> str:
        return self._each("send_weights", version, info)[0]

    def leave_weight_transfer(self) -> None:
        self._each("leave_weight_transfer")

    def ipc_begin(self) -> None:
        """Colocated GPUs (cluster/sync/ipc.py): every rank starts a chunked export of its weights."""
        self._each("ipc_begin")

    def ipc_next(self) -> list[dict | None]:
        """Each rank's next chunk (None after the last), in rank order."""
        return self._each("ipc_next")

    def ipc_end(self) -> None:
        self._each("ipc_end")

    def save_hf(self, path: str, tokenizer_path: str) -> str:
        return self._each("save_hf", path, tokenizer_path)[0]

    def save_state(self, folder: str) -> None:
        """Every rank's DeepSpeed state and RNG streams under `folder` (a run checkpoint's <role>-ds/)."""
        self._each("save_state", folder)

    def load_state(self, folder: str) -> list[dict]:
        return self._each("load_state", folder)

    def _kill_ranks(self) -> None:
        for r in self.ranks:
            try:
                ray.kill(r)
            except Exception:  # already gone
                pass

    def shutdown(self) -> None:
        self._kill_ranks()
        if self.owns_placement:
            self.placement.release()


def critic_group(spec: RankSetup, env, timeout_s, placement=None, deadline_s=None, owns=None) -> LearnerGroup:
    """`owns`: the group releases `placement` at shutdown (a placement of its own, not the learners')."""
    return LearnerGroup(
        spec,
        env,
        timeout_s,
        role=Critic,
        placement=placement,
        deadline_s=deadline_s,
        name="critic",
        owns_placement=owns,
    )


def _merge(per_rank: list[dict]) -> dict:
    """Means over equally sized shares; counters from rank 0; time and memory of the slowest and largest rank."""
    merged: dict = {}
    for key in per_rank[0]:
        merged[key] = sum(m[key] for m in per_rank) / len(per_rank)
    for key in ("optimizer_steps", "lr"):
        if key in per_rank[0]:
            merged[key] = per_rank[0][key]
    for key in ("train_s", "rss_gib", "peak_rss_gib"):  # the slowest rank, the largest one
        if key in per_rank[0]:
            merged[key] = max(m[key] for m in per_rank)
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
        deterministic=cfg.run.deterministic,
        collective_timeout_s=cfg.faults.learn_s,
    )


def critic_setup(cfg: TroupeConfig, policy: RankSetup) -> RankSetup:
    return replace(policy, train=cfg.critic.train_config(cfg.learner), value_clip=cfg.critic.value_clip)
