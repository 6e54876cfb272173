"""Non-finite rewards, advantages and losses (cluster/durability/nonfinite.py): left out and accounted, never
applied, never a silent null; `faults.on_nonfinite=stop` checkpoints the iteration, then stops."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from troupe.actors.learner.config import LearnerConfig, RankSetup
from troupe.actors.learner.pg_update import nonfinite_groups
from troupe.actors.learner.ppo import AdaptiveKL
from troupe.actors.learner.rank import DeepSpeedRank
from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import WeightedSum, token_key
from troupe.actors.reward.alarm import HierarchyAggregation, Normalizer
from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.config.schema import FaultsConfig, TroupeConfig
from troupe.cluster.durability.accounting import Ledger
from troupe.cluster.durability.nonfinite import ADVANTAGE_REASON, NonFiniteStop, learn_counts, stop_reason
from troupe.cluster.observe.metrics import MetricsWriter, with_nonfinite_count
from troupe.cluster.run import loop
from troupe.cluster.run.learn import learn_policy_gradient
from troupe.cluster.run.scoring import DROP_REASON, NONFINITE_REASON, ErrorPolicy, dropped_groups, score_batch


def _rollouts(n_prompts=3, n=2):
    out = []
    for p in range(n_prompts):
        prompt = Prompt(f"p{p}", (1, 2), "q", "7")
        for k in range(n):
            ids = tuple(range(3 + k))
            out.append(Rollout(prompt, k, ids, f"{p}.{k}", torch.zeros(len(ids)), 0, "stop", 1.0))
    return out


def _values(rollouts, **at):
    mine = torch.arange(len(rollouts), dtype=torch.float32)
    for i, value in at.items():
        mine[int(i.removeprefix("row"))] = value
    return {"mine": mine}


def test_an_inf_objective_value_drops_its_group_before_the_aggregation_sees_it():
    rollouts = _rollouts()
    agg = HierarchyAggregation("mine", {}, normalizer=Normalizer(warmup_samples=100))
    result = score_batch(
        rollouts, _values(rollouts, row2=math.inf, row5=math.nan), agg, ErrorPolicy("drop"), 2
    )
    reasons = [s.reward.dropped for s in result.scored]
    assert reasons == ["", "", NONFINITE_REASON, NONFINITE_REASON, DROP_REASON, DROP_REASON]
    assert agg.normalizer.count == 2  # the kept group only: an inf would have spoilt every later reward
    assert result.nonfinite == 1 and result.errors["mine"] == 1  # NaN stays a failure (reward.on_error)
    assert result.metrics()["reward/nonfinite"] == 1
    assert dropped_groups(result.scored, 2) == {NONFINITE_REASON: 1, DROP_REASON: 1}
    ledger = Ledger()
    ledger.enter(3)
    assert ledger.settle(dropped_groups(result.scored, 2))["accounting/lost"] == 0
    assert ledger.dropped == {NONFINITE_REASON: 1, DROP_REASON: 1}


def test_inf_nan_token_rewards_and_rewards_the_aggregation_made_are_dropped():
    rollouts = _rollouts()
    values = _values(rollouts, row4=3e38)  # finite, but x10 overflows float32 in the weighted sum
    tokens = torch.zeros(sum(len(r.response_ids) for r in rollouts))
    tokens[0] = math.nan  # row 0's first token
    values[token_key("mine")] = tokens
    result = score_batch(rollouts, values, WeightedSum({"mine": 10.0}), ErrorPolicy("zero"), 2)
    assert [s.reward.dropped for s in result.scored] == [NONFINITE_REASON, NONFINITE_REASON, "", ""] + 2 * [
        NONFINITE_REASON
    ]
    assert result.nonfinite == 2
    assert all(math.isfinite(s.reward.scalar) for s in result.scored)
    assert [s.reward.scalar for s in result.kept] == [20.0, 30.0]


def test_nonfinite_advantages_flag_whole_groups_on_response_tokens_only():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    adv = torch.zeros(4, 2)
    adv[1, 1] = math.nan  # padding: not a response token
    assert nonfinite_groups(mask, 2, adv).tolist() == [False] * 4
    adv[2, 0] = math.inf
    assert nonfinite_groups(mask, 2, adv, None).tolist() == [False, False, True, True]
    returns = torch.zeros(4, 2)
    returns[0, 0] = math.nan
    assert nonfinite_groups(mask, 2, adv, returns).tolist() == [True] * 4
    assert nonfinite_groups(mask, 3, adv).tolist() == [False, False, True, False]  # 4 rows: no groups of 3


class _Learners:
    """The learner group's answer to a batch: row 2 and 3 (one prompt group) had an inf/NaN advantage."""

    def train(self, batch, kl_coef):
        mask = batch.action_mask.clone()
        mask[2:4] = 0
        rows = {"advantage": [0.5] * len(batch), "nonfinite": [False, False, True, True, False, False]}
        rows["returns"] = [torch.ones(int(m.sum())) for m in mask]  # response tokens the learner kept
        return {"loss": 0.1, "nonfinite_steps": 0.0}, rows


class _Critic:
    def __init__(self):
        self.masks = []

    def values(self, batch):
        return [torch.zeros(int(m.sum())) for m in batch.action_mask]

    def train_critic(self, batch):
        self.masks.append(batch.action_mask)
        return {"value_loss": 0.0, "nonfinite_steps": 1.0}


def test_groups_with_nonfinite_advantages_are_dropped_and_accounted():
    rollouts = _rollouts()
    scored = score_batch(rollouts, _values(rollouts), WeightedSum({"mine": 1.0}), group_size=2).scored
    critic = _Critic()
    run = SimpleNamespace(pad_id=0, sampling=SimpleNamespace(n=2), critic=critic, learners=_Learners())
    run.kl = AdaptiveKL(0.0)
    stats, _, scored = learn_policy_gradient(run, scored)
    assert [s.reward.dropped for s in scored] == ["", "", ADVANTAGE_REASON, ADVANTAGE_REASON, "", ""]
    assert critic.masks[0][2:4].sum() == 0 and critic.masks[0][[0, 1, 4, 5]].sum() > 0  # nor in the critic
    assert learn_counts(scored, stats) == {"faults/nonfinite_advantages": 2, "faults/nonfinite_updates": 1}
    ledger = Ledger()
    ledger.enter(3)
    row = ledger.settle(dropped_groups(scored, 2))
    assert row["prompts/dropped/nonfinite_advantage"] == 1 and row["accounting/lost"] == 0


class _Engine:
    """What `optimize` calls on a DeepSpeed engine, over one real parameter. `zero`: like ZeRO's optimizers, a
    step whose gradients are inf/NaN is dropped (skipped_steps); `broken`: one that applies it anyway."""

    def __init__(self, zero: bool, broken: bool = False):
        self.zero, self.broken = zero, broken
        self.w = torch.nn.Parameter(torch.ones(2))
        self.module = torch.nn.ParameterList([self.w])
        self.skipped_steps, self.calls, self.norm = 0, [], None

    def train(self):
        pass

    def zero_optimization(self):
        return self.zero

    def bfloat16_enabled(self):
        return False

    def backward(self, loss, scale_wrt_gas):
        loss.backward()

    def step(self):
        self.calls.append("step")
        self.norm = float(self.w.grad.norm())
        if self.zero and not math.isfinite(self.norm) and not self.broken:
            self.skipped_steps += 1
        else:
            with torch.no_grad():
                self.w -= 0.1 * self.w.grad
        self.w.grad = None

    def zero_grad(self):
        self.calls.append("zero_grad")
        self.w.grad = None

    def get_global_grad_norm(self):
        return self.norm


def _optimize(engine, finite_loss_inf_grad=False):
    rank = DeepSpeedRank(
        RankSetup("model", LearnerConfig(world_size=1, micro_batch_size=1, mini_batches=2)), 0
    )
    rank.engine = engine

    def micro_loss(rows, norm):
        if int(rows[0]) == 0 and finite_loss_inf_grad:  # sqrt at 0: the loss is 0, its gradient inf
            loss = torch.sqrt(engine.w - 1.0).sum()
            return loss, {"loss": loss.detach()}
        # row 0's loss is NaN while its gradient alone would be finite (1 per weight): it must not be applied
        loss = engine.w.sum() + (math.nan if int(rows[0]) == 0 else 0.0)
        return loss, {"loss": loss.detach()}

    metrics = rank.optimize(torch.tensor([3, 3]), torch.tensor([2, 2]), micro_loss, shuffle=False)
    return rank, metrics


@pytest.mark.parametrize("zero", [False, True])
def test_a_nonfinite_loss_is_never_applied(zero):
    engine = _Engine(zero)
    rank, metrics = _optimize(engine)
    # the step of row 0 is skipped (fp32 without ZeRO: here; ZeRO: by its overflow check), the step of row 1 taken
    assert engine.calls == (["step", "step"] if zero else ["zero_grad", "step"])
    assert engine.w.tolist() == pytest.approx([0.9, 0.9])
    assert metrics["nonfinite_steps"] == 1.0 and engine.skipped_steps == int(zero)
    assert metrics["grad_norm"] == pytest.approx(math.sqrt(2))  # the applied step's norm only
    assert rank.version == 1 and rank.steps == 2
    assert metrics["loss"] == pytest.approx(2.0)  # the applied step's loss: the skipped one's NaN is left out
    with pytest.raises(RuntimeError, match="non-finite loss"):
        _optimize(_Engine(zero=True, broken=True))


def test_plain_fp32_skips_a_finite_loss_whose_gradient_is_inf():
    engine = _Engine(zero=False)  # DeepSpeed's plain fp32 path has no overflow check of its own
    rank, metrics = _optimize(engine, finite_loss_inf_grad=True)
    assert engine.calls == ["zero_grad", "step"] and metrics["nonfinite_steps"] == 1.0
    assert engine.w.tolist() == pytest.approx([0.9, 0.9])  # only the finite step moved the weights


def test_metrics_count_the_values_written_as_null(tmp_path):
    row = with_nonfinite_count(
        {"iteration": 0, "train/kl": math.nan, "train/loss": math.inf, "reward/mean": 0.5}
    )
    assert row["metrics/nonfinite"] == 2
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write(row)
    writer.close()

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict)
    assert line["train/kl"] is None and line["train/loss"] is None and line["metrics/nonfinite"] == 2


def _train(monkeypatch, policy, row):
    monkeypatch.setattr(loop, "driver_state", lambda run, i: {"iteration": i})
    monkeypatch.setattr(loop, "run_iteration", lambda run, i: {"iteration": i, **row})
    saved, rows = [], []
    run = SimpleNamespace(iterations=3, budget=loop.RetryBudget({}), last_samples=[])
    run.faults = FaultsConfig(on_nonfinite=policy)
    job = SimpleNamespace(record=rows.append, record_samples=lambda samples: None)
    checkpoints = SimpleNamespace(due=lambda i: False, stop_signal=None, last=None)

    def save(run, iteration):
        saved.append(iteration)
        checkpoints.last = f"checkpoints/iter-{iteration:06d}"

    checkpoints.save = save
    loop.train(run, job, checkpoints)
    return saved, rows


def test_stop_checkpoints_the_iteration_then_raises_and_skip_goes_on(monkeypatch):
    saved, rows = _train(monkeypatch, "skip", {"reward/nonfinite": 2, "faults/nonfinite_updates": 1})
    assert saved == [] and len(rows) == 3
    with pytest.raises(NonFiniteStop, match="iteration 0: 2 samples with an inf/NaN reward.*iter-000000"):
        _train(monkeypatch, "stop", {"reward/nonfinite": 2})
    saved, rows = _train(monkeypatch, "stop", {"reward/nonfinite": 0, "faults/nonfinite_updates": 0})
    assert saved == [] and len(rows) == 3
    assert (
        stop_reason({"faults/nonfinite_updates": 1}, "stop")
        == "1 optimizer steps with an inf/NaN loss or gradient"
    )


def test_on_nonfinite_is_checked():
    cfg = TroupeConfig()
    assert cfg.faults.on_nonfinite == "skip"
    cfg.faults.on_nonfinite = "halt"
    with pytest.raises(ConfigError, match="faults.on_nonfinite='halt': expected one of skip, stop"):
        validate(cfg)
