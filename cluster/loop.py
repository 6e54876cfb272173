"""The run, top to bottom: iterations of generate -> score -> learn -> sync [-> evaluate], each phase timed,
checkpointed when due; a lost learner or critic rank rolls the run back to its newest checkpoint and it goes on.

Read top to bottom to see the whole algorithm. The fleets and groups hide Ray; this file holds the order.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import ObjectLostError, RayTaskError

from actors.generator.sampling import Sampling
from actors.learner.config import AlgoConfig
from actors.learner.ppo import AdaptiveKL
from actors.protocol import ScoredRollout
from actors.reward.aggregation import Aggregation, score_rollouts
from cluster.accounting import Ledger
from cluster.config import EvalConfig, FaultsConfig, MonitorConfig
from cluster.data.prompts import ArithmeticCursor, DatasetCursor, PromptSet
from cluster.durable import RunCheckpoints, Stopped, driver_state
from cluster.evaluation import batch_stats, evaluate
from cluster.faults import RankLost, RetriesExhausted, RetryBudget
from cluster.fleet import Pool
from cluster.learn import learn_dpo, learn_policy_gradient
from cluster.learner_group import LearnerGroup
from cluster.reward_fleet import RewardFleet
from cluster.sync import push_weights

log = logging.getLogger("troupe.loop")


@dataclass
class RunState:
    """Everything one run's iterations share: the actor pools and groups, and the state carried between them."""

    generators: Pool
    rewards: RewardFleet
    learners: LearnerGroup
    aggregation: Aggregation
    prompts: ArithmeticCursor | DatasetCursor  # the data cursor: next_batch(), state_dict()
    sampling: Sampling
    iterations: int = 1
    eval_set: PromptSet | None = None  # None: no evaluation
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    pad_id: int = 0
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    critic: LearnerGroup | None = None  # PPO only
    kl: AdaptiveKL = field(default_factory=lambda: AdaptiveKL(0.0))
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    version: int = 0
    last_bundle: ray.ObjectRef | None = None
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    budget: RetryBudget = field(default_factory=lambda: RetryBudget({}))
    ledger: Ledger = field(default_factory=Ledger)
    seed: int | None = None  # run.deterministic: the seed of every request's sampling stream; None: unseeded

    def shutdown(self) -> None:
        self.learners.shutdown()
        if self.critic is not None:
            self.critic.shutdown()
        self.generators.shutdown()
        self.rewards.shutdown()


@contextmanager
def timed(timings: dict, phase: str):
    start = time.perf_counter()
    yield
    timings[f"time/{phase}"] = time.perf_counter() - start


def train(run: RunState, job, checkpoints: RunCheckpoints, start: int = 0) -> None:
    """Iterations `start`..run.iterations-1: each one's row is recorded, then a checkpoint written when due."""
    iteration = start
    while iteration < run.iterations:
        before = driver_state(run, iteration - 1)
        try:
            record = run_iteration(run, iteration)
            record.update(run.budget.metrics())
            job.record(record)
            if checkpoints.due(iteration):
                checkpoints.save(run, iteration)
        except RankLost as lost:  # the group is rebuilt and the run rolled back to the newest checkpoint
            iteration = checkpoints.recover(run, lost, job)
            continue
        except RetriesExhausted as exhausted:  # a role lost too many members: stop, with a checkpoint
            checkpoints.save_before_stopping(run, exhausted.role, before)
            raise
        if checkpoints.stop_signal is not None:
            raise Stopped(checkpoints.stop_signal, checkpoints.last)
        iteration += 1


def run_iteration(run: RunState, iteration: int) -> dict:
    timings: dict[str, float] = {}

    # 1. Generate: each generator samples n completions for its contiguous share of the prompts.
    with timed(timings, "generate"):
        batch = run.prompts.next_batch()
        run.ledger.enter(len(batch))
        sampling = (
            run.sampling if run.seed is None else replace(run.sampling, seed=run.seed + batch.iteration)
        )
        chunks = run.generators.map_chunks(
            "generate", batch.prompts, sampling, on_replace=catch_up(run), deadline_s=run.faults.generate_s
        )
        rollouts = [r for chunk in chunks for r in chunk]
    _check_groups(rollouts, len(batch), run.sampling.n)

    # 2. Score: reward shards return per-objective values; the aggregation makes the scalar.
    with timed(timings, "score"):
        values = run.rewards.score(rollouts, deadline_s=run.faults.score_s)
        scored = score_rollouts(rollouts, values, run.aggregation)

    # 3. Learn: policy gradient (advantages, [critic values], clipped update, [critic update]) or DPO on pairs.
    with timed(timings, "learn"):
        learn = learn_dpo if run.algo.update == "dpo" else learn_policy_gradient
        learn_stats = learn(run, scored)

    # 4. Sync: the new weights go to every generator, tagged with the next version (skipped if nothing trained).
    sync_stats: dict = {}
    with timed(timings, "sync"):
        if learn_stats.get("pairs/built", 1):
            run.version += 1
            run.last_bundle = run.learners.export_weights(run.version)
            sync_stats = push_weights(
                run.generators, run.last_bundle, run.version, deadline_s=run.faults.sync_s
            )

    # 5. Evaluate the new weights on held-out prompts every eval.every iterations and after the last one.
    eval_stats: dict = {}
    if run.eval_set is not None and eval_due(iteration, run.iterations, run.eval.every):
        with timed(timings, "eval"):
            eval_stats = evaluate(run, run.eval_set.prompts, run.eval)

    record = _metrics(iteration, run.version, scored, learn_stats, sync_stats, timings)
    record.update(run.prompts.metrics())
    # DPO: a prompt whose samples all tie builds no pair, so nothing of it is trained
    record.update(run.ledger.settle({"tie": learn_stats.get("pairs/skipped_ties", 0)}))
    record.update(eval_stats)
    record["algo"] = run.algo.name
    _length_alarm(record, run.monitor)
    return record


def initial_eval(run: RunState) -> dict:
    """Evaluation of the initial weights, as the row of iteration -1 (shown as "init" in the table)."""
    timings: dict[str, float] = {}
    with timed(timings, "eval"):
        stats = evaluate(run, run.eval_set.prompts, run.eval)
    return {
        "iteration": -1,
        "weight_version": run.version,
        **stats,
        **run.eval_set.metrics("eval/data"),
        **timings,
    }


def eval_due(iteration: int, iterations: int, every: int) -> bool:
    return iteration == iterations - 1 or (every > 0 and (iteration + 1) % every == 0)


def _length_alarm(record: dict, monitor: MonitorConfig) -> None:
    """Verbosity alarm: reward that tracks length is the classic reward-hacking signal (ArmoRM debiases it)."""
    corr = record.get("reward/length_corr", float("nan"))
    record["monitor/length_alarm"] = int(corr == corr and corr > monitor.length_corr_max)
    if record["monitor/length_alarm"]:
        log.warning(
            "iteration %d: reward-length correlation %.2f is over monitor.length_corr_max=%.2f: "
            "the policy may be learning to be verbose",
            record["iteration"],
            corr,
            monitor.length_corr_max,
        )


def catch_up(run: RunState):
    """A replacement generator starts from the initial weights: give it the latest bundle before it works."""

    def load_latest(member) -> None:
        if run.last_bundle is not None:
            # rollback=True: after a rollback to the initial state the latest bundle is version 0, like a new member
            ref = member.handle.update_weights.remote(run.last_bundle, True)
            try:
                ray.get(ref, timeout=run.faults.sync_s)
            except (ObjectLostError, RayTaskError) as e:
                if not isinstance(e, ObjectLostError) and not isinstance(e.cause, ObjectLostError):
                    raise
                # the bundle lived with learner rank 0, which is gone: a rank loss (rebuild, then re-export)
                raise RankLost("learner", "the latest weights were lost with learner rank 0") from e

    return load_latest


def _check_groups(rollouts, num_prompts: int, n: int) -> None:
    if len(rollouts) != num_prompts * n:
        raise RuntimeError(f"expected {num_prompts} x {n} rollouts, got {len(rollouts)}")
    for i in range(0, len(rollouts), n):
        uids = {r.prompt.uid for r in rollouts[i : i + n]}
        if len(uids) != 1:
            raise RuntimeError(
                f"rollouts {i}..{i + n - 1} mix prompts {sorted(uids)}: groups must be contiguous"
            )


def _metrics(iteration, version, scored: list[ScoredRollout], learn_stats, sync_stats, timings) -> dict:
    record = {
        "iteration": iteration,
        "weight_version": version,
        "samples": len(scored),
        "behaviour_version/min": min(s.rollout.weight_version for s in scored),
        **batch_stats(scored),
    }
    record.update(learn_stats)
    record.update({f"sync/{k}": v for k, v in sync_stats.items()})
    record.update(timings)
    record["time/iteration"] = sum(timings.values())
    record["example"] = {
        "prompt": scored[0].rollout.prompt.text,
        "response": scored[0].rollout.response_text[:400],
        "reward": scored[0].reward.scalar,
    }
    return record
