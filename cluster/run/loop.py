"""The run, top to bottom: iterations of generate -> score -> learn -> sync [-> evaluate], each phase timed,
checkpointed when due; a lost learner or critic rank rolls the run back to its newest checkpoint and it goes on;
any other error stops the run after a checkpoint of its last whole state.
In run.mode=async the generators sample the next batches while the learners train (cluster/run/pipeline.py); fleets
may be resized between iterations (cluster/fleet/elastic.py).

Read top to bottom to see the whole algorithm. The fleets and groups hide Ray; this file holds the order.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from troupe.actors.generator.sampling import Sampling
from troupe.actors.learner.config import AlgoConfig
from troupe.actors.learner.ppo import AdaptiveKL
from troupe.actors.protocol import ScoredRollout
from troupe.actors.reward.aggregation import Aggregation
from troupe.actors.weight_buckets import BucketedWeights
from troupe.cluster.config.schema import EvalConfig, FaultsConfig, MonitorConfig
from troupe.cluster.data.prompts import ArithmeticCursor, DatasetCursor, PromptSet
from troupe.cluster.durability.accounting import Ledger
from troupe.cluster.durability.faults import RankLost, RetriesExhausted, RetryBudget
from troupe.cluster.durability.nonfinite import NonFiniteStop, learn_counts, stop_reason
from troupe.cluster.durability.run_checkpoints import RunCheckpoints, driver_state
from troupe.cluster.durability.stop_signal import Stopped
from troupe.cluster.fleet.elastic import FleetControl
from troupe.cluster.fleet.learners import LearnerGroup
from troupe.cluster.fleet.pool import Member, Pool
from troupe.cluster.fleet.reward_pools import RewardFleet
from troupe.cluster.observe.rollouts import sample_rows
from troupe.cluster.run.dynamic_sampling import fill_batch, needs_more
from troupe.cluster.run.evaluation import batch_stats, env_stats, evaluate
from troupe.cluster.run.learn import learn_dpo, learn_policy_gradient
from troupe.cluster.run.pipeline import RolloutPipeline
from troupe.cluster.run.scoring import ErrorPolicy, ObjectiveFailed, ScoredBatch, dropped_groups, score_batch
from troupe.cluster.run.shaping import OverlongShaping
from troupe.cluster.sync.ipc import IpcSync
from troupe.cluster.sync.nccl import NcclSync
from troupe.cluster.sync.object_store import push_weights, refit
from troupe.cluster.sync.sleep import sleep_all, wake_all

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
    last_bundle: BucketedWeights | None = None  # the latest exported weights (None: the initial ones)
    pipeline: RolloutPipeline = field(default_factory=RolloutPipeline)  # sync: depth 0
    sync_bucket_mb: float = 256
    gpu_sync: NcclSync | IpcSync | None = None  # GPU weight sync on vLLM's engines; None: the object store
    fleet: FleetControl | None = None  # resize requests and the autoscaler; None: fixed sizes
    last_record: dict | None = None  # the previous iteration's row (the autoscaler reads its timings)
    last_samples: list[dict] = field(default_factory=list)  # the previous iteration's rollouts.jsonl rows
    samples_logged: float = 1.0  # logging.rollouts: the share of prompt groups whose samples are kept
    empty_batches: int = 0  # batches in a row with every sample dropped
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    budget: RetryBudget = field(default_factory=lambda: RetryBudget({}))
    ledger: Ledger = field(default_factory=Ledger)
    seed: int | None = None  # run.deterministic: the seed of every request's sampling stream; None: unseeded
    on_error: ErrorPolicy = field(default_factory=ErrorPolicy)  # what a failed reward sample becomes
    # DAPO's soft overlong penalty on training rewards (off: no buffer)
    overlong: OverlongShaping = field(default_factory=lambda: OverlongShaping(0, 0, 0.0))
    max_batches_drawn: int = (
        1  # dynamic sampling: batches an iteration may draw (data.max_oversampling); 1: off
    )
    judge_shaped: bool = (
        False  # dynamic sampling's variance test sees the shaped reward (data.dynamic_sampling_on)
    )
    learning: bool = False  # the learners were called this iteration: they no longer hold the state before it
    sleep_level: int = 0  # generator.sleep_level: generators sleep through the learn phase (colocated GPUs)

    def __post_init__(self) -> None:
        # a new or replacement generator serves only with the current weights
        self.generators.on_join = self.refit

    def refit(self, member: Member, deadline_s: float | None = None) -> None:
        stale = self.last_bundle is None or self.last_bundle.version != self.version
        lost = member.info.pop("weights_lost", False)  # a level-2 sleep freed them: even version 0 is sent
        if (self.version > 0 or lost) and stale:
            # the latest version went over NCCL: a newcomer takes it through the object store
            self.last_bundle = self.learners.export_weights(self.version, self.sync_bucket_mb)
        refit(member, self.last_bundle, deadline_s or self.faults.sync_s)

    def refit_stale(self) -> dict:
        """Generators that missed a weight sync take the current weights before they generate (async: behind the
        batches queued on them)."""
        wait_s = self.faults.sync_s + self.faults.generate_s * len(self.pipeline.queue)
        done = self.generators.refit_stale(lambda member: self.refit(member, wait_s))
        return {"fleet/stale_refit": done["refit"], "fleet/stale_replaced": done["replaced"]}

    def sampling_for(self, batch) -> Sampling:
        """run.deterministic: a batch's requests draw from streams seeded by (run seed + batch number)."""
        return (
            self.sampling if self.seed is None else replace(self.sampling, seed=self.seed + batch.iteration)
        )

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
        run.budget.tick()  # losses older than faults.retry_window_iterations stop counting
        run.learning, recorded, saved = False, False, False
        try:
            record = run_iteration(run, iteration)
            record.update(run.budget.metrics())
            job.record(record)
            recorded = True
            job.record_samples(run.last_samples)
            nonfinite = stop_reason(record, run.faults.on_nonfinite)
            if checkpoints.due(iteration) or nonfinite:
                checkpoints.save(run, iteration)
                saved = True
            if nonfinite:  # inf/NaN values were left out, so this iteration's state is whole: stop after it
                raise NonFiniteStop(
                    f"iteration {iteration}: {nonfinite} (faults.on_nonfinite=stop); they were left out, and the "
                    f"checkpoint {checkpoints.last} holds the state after the iteration: resume=latest continues"
                )
        except RankLost as lost:  # the group is rebuilt and the run rolled back to the newest checkpoint
            iteration = checkpoints.recover(run, lost, job)
            continue
        except RetriesExhausted as exhausted:  # a role lost too many members: stop, with a checkpoint
            checkpoints.save_before_stopping(run, exhausted.role, before)
            raise
        except NonFiniteStop:  # its checkpoint is written
            raise
        # anything else (a shard's bug, a full disk, a lost node): stop, with the last whole state
        except Exception as error:
            checkpoints.save_after_error(run, error, before, recorded)
            raise
        # a stop signal: stop after this iteration with its checkpoint, unless it was the last (the run is done)
        if checkpoints.stop_signal is not None and iteration + 1 < run.iterations:
            if not saved:  # the signal came after the checkpoint decision
                checkpoints.save(run, iteration)
            raise Stopped(checkpoints.stop_signal, checkpoints.last)
        iteration += 1


def run_iteration(run: RunState, iteration: int) -> dict:
    timings: dict[str, float] = {}

    # 0. Resize the pools, if asked (`troupe fleet`) or if the autoscaler says so; new generators refit first, and
    #    so do those that missed the last weight sync.
    fleet_stats = run.fleet.step(run, iteration, run.last_record) if run.fleet is not None else {}
    stale = run.refit_stale()

    # 1. Generate: each generator samples n completions for its contiguous share of the prompts (async: the
    #    batch was submitted an iteration ahead; groups staler than run.max_staleness are sampled again).
    remaining = run.iterations - 1 - iteration
    with timed(timings, "generate"):
        batch, rollouts, staleness = run.pipeline.next_batch(
            run.prompts,
            run.generators,
            run.sampling_for,
            run.version,
            run.faults.generate_s,
            remaining=remaining,
            top_up=run.max_batches_drawn == 1,  # dynamic sampling draws its refills first
        )
        run.ledger.enter(len(batch))

    # 2. Score: reward shards return per-objective values; samples that user code failed on follow
    #    reward.on_error; the aggregation makes the scalar of the rest; training rewards are shaped.
    with timed(timings, "score"):
        result, scored = _score(run, rollouts)
        _nothing_kept_alarm(run, result)

    # 2b. Dynamic sampling: groups whose rewards do not vary are left out, and more batches are drawn, generated
    #     with the current weights and scored until the batch holds prompts_per_iteration informative groups.
    refill_stats: dict = {}
    left_out: dict[str, int] = {}
    if run.max_batches_drawn > 1:
        with timed(timings, "refill"):
            result, left_out, refill_stats = _refill(run, result, scored)
            scored = result.scored
            ahead = min(run.pipeline.depth, remaining)
            run.pipeline.top_up(run.prompts, run.generators, run.sampling_for, ahead)
            staleness["pipeline/in_flight"] = len(run.pipeline.queue)  # now that the next batch is drawn
    kept = any(not s.reward.dropped for s in scored)

    # 3. Learn: policy gradient (advantages, [critic values], clipped update, [critic update]) or DPO on pairs.
    #    Dropped prompt groups ride along with no loss; a batch with nothing kept trains nothing.
    learn_stats: dict = {}
    advantages = None
    sleep_stats: dict = {}
    with timed(timings, "learn"):
        learn = learn_dpo if run.algo.update == "dpo" else learn_policy_gradient
        if kept and run.sleep_level:  # colocated GPUs: the engines' memory goes to the learners meanwhile
            sleep_stats = sleep_all(run.generators, run.faults.sync_s)
        if kept:  # groups with an inf/NaN advantage come back dropped
            run.learning = True
            learn_stats, advantages, scored = learn(run, scored)

    # 4. Sync: the new weights go to every generator, tagged with the next version (skipped if nothing trained).
    sync_stats: dict = {}
    with timed(timings, "sync"):
        if kept and learn_stats.get("pairs/built", 1):
            run.version += 1
            # GPUs: NCCL broadcast or CUDA IPC on vLLM's engines; None (or CPU): the object store
            # async: the generators finish the batches in flight before loading, so the wait covers them too
            wait_s = run.faults.sync_s + run.faults.generate_s * len(run.pipeline.queue)
            sync_stats = (
                run.gpu_sync.push(run.generators, run.learners, run.version, wait_s) if run.gpu_sync else None
            )
            if sync_stats is None:
                run.last_bundle = run.learners.export_weights(run.version, run.sync_bucket_mb)
                sync_stats = push_weights(run.generators, run.last_bundle, deadline_s=wait_s)
        # generators the sync did not reach wake on their weights, or refit if sleep freed them
        if sleep_stats:
            sleep_stats.update(wake_all(run.generators, run.faults.sync_s))

    # 5. Evaluate the new weights on held-out prompts every eval.every iterations and after the last one.
    eval_stats: dict = {}
    if run.eval_set is not None and eval_due(iteration, run.iterations, run.eval.every):
        with timed(timings, "eval"):
            again = run.refit_stale()  # generators that missed this iteration's sync
            stale = {key: n + again[key] for key, n in stale.items()}
            eval_stats = evaluate(run, run.eval_set.prompts, run.eval)

    record = _metrics(iteration, run.version, scored, learn_stats, sync_stats, timings)
    record.update(result.metrics())
    record.update(run.overlong.metrics(scored))
    record.update(refill_stats)
    record.update(sleep_stats)
    record.update(getattr(run.aggregation, "metrics", dict)())  # e.g. ALaRM's aspect selection
    record.update(staleness)
    record.update(fleet_stats)
    record.update(stale)
    record.update(run.prompts.metrics())
    record.update(learn_counts(scored, learn_stats))
    # DPO: a prompt whose samples all tie builds no pair, so nothing of it is trained
    dropped = Counter(
        {"tie": learn_stats.get("pairs/skipped_ties", 0), **dropped_groups(scored, run.sampling.n)}
    )
    dropped.update(left_out)  # drawn by dynamic sampling, not in the batch
    record.update(run.ledger.settle(dropped))
    record.update(eval_stats)
    record["algo"] = run.algo.name
    _length_alarm(record, run.monitor)
    run.last_record = record
    run.last_samples = sample_rows(iteration, scored, advantages, run.samples_logged)
    return record


def _score(run: RunState, rollouts) -> tuple[ScoredBatch, list[ScoredRollout]]:
    values = run.rewards.score(rollouts, deadline_s=run.faults.score_s)
    result = score_batch(rollouts, values, run.aggregation, run.on_error, run.sampling.n)
    return result, run.overlong.apply(result.scored)  # shaped outside the hierarchy's gates


def _refill(run: RunState, first: ScoredBatch, scored: list[ScoredRollout]) -> tuple[ScoredBatch, dict, dict]:
    """Draw, generate and score more batches while too few groups are informative (cluster/run/dynamic_sampling.py).
    Returns the training batch (with the reward errors and inf/NaN counts of every batch drawn), the groups left out
    of it per reason, and the row's dynamic/* metrics."""
    n, groups = run.sampling.n, run.prompts.per_batch
    rounds, errors, nonfinite = [scored], Counter(first.errors), first.nonfinite
    judged = [scored if run.judge_shaped else first.scored]  # same rollouts, same drops; the scalars differ
    while needs_more(judged, groups, n, run.max_batches_drawn):
        more = run.prompts.next_batch()
        run.ledger.enter(len(more))
        chunks = run.generators.map_chunks(
            "generate", more.prompts, run.sampling_for(more), deadline_s=run.faults.generate_s
        )
        result, shaped = _score(run, [r for chunk in chunks for r in chunk])
        errors.update(result.errors)
        nonfinite += result.nonfinite
        rounds.append(shaped)
        judged.append(shaped if run.judge_shaped else result.scored)
    filled = fill_batch(rounds, groups, n, judged)
    return ScoredBatch(filled.scored, dict(errors), nonfinite=nonfinite), filled.left_out, filled.stats


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


EMPTY_BATCHES_MAX = 3


def _nothing_kept_alarm(run: RunState, result) -> None:
    """A run whose every sample is dropped trains nothing; after EMPTY_BATCHES_MAX such batches in a row it stops,
    naming the objectives that failed (a wrong url or token, data without references), instead of finishing as if
    it had trained."""
    run.empty_batches = 0 if result.kept else run.empty_batches + 1
    if run.empty_batches >= EMPTY_BATCHES_MAX:
        failing = sorted(name for name, n in result.errors.items() if n)
        inf = f"; {result.nonfinite} of the last batch's rewards were inf/NaN" if result.nonfinite else ""
        raise ObjectiveFailed(
            f"{run.empty_batches} batches in a row had every sample dropped (reward.on_error=drop): objectives "
            f"{failing} failed on them; their first tracebacks are in the log{inf}"
        )


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


def _metrics(iteration, version, scored: list[ScoredRollout], learn_stats, sync_stats, timings) -> dict:
    kept = [s for s in scored if not s.reward.dropped]
    record = {
        "iteration": iteration,
        "weight_version": version,
        "samples": len(scored),
        "behaviour_version/min": min(s.rollout.weight_version for s in scored),
        **(batch_stats(kept) if kept else {}),
        **env_stats([s.rollout for s in scored], version),
    }
    record.update(learn_stats)
    record.update({f"sync/{k}": v for k, v in sync_stats.items()})
    record.update(timings)
    record["time/iteration"] = sum(timings.values())
    shown = (kept or scored)[0]
    record["example"] = {
        "prompt": shown.rollout.prompt.text,
        "response": shown.rollout.response_text[:400],
        "reward": shown.reward.scalar,
    }
    return record
