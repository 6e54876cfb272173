"""The multi-turn loop (actors/envs/runner.py) against a scripted engine: turns and observations alternate, every
limit ends a trajectory with its reason, and a failing environment ends only its own trajectory."""

import pytest
import torch
from transformers import AutoTokenizer

from troupe.actors.envs.calls import EnvCalls
from troupe.actors.envs.protocol import StepResult
from troupe.actors.envs.runner import Limits, TurnOutput, run_trajectories
from troupe.actors.envs.trajectory import OBSERVATION, TurnEncoder, to_rollout
from troupe.actors.learner.batch import from_scored
from troupe.actors.models import resolve_model
from troupe.actors.protocol import Prompt, RewardBreakdown, ScoredRollout


@pytest.fixture(scope="module")
def encoder():
    return TurnEncoder(AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama")))


class ScriptedEngine:
    """Each turn writes `turn_tokens` tokens (ending with EOS unless the budget cuts it), two per step. A turn
    stopped by abort() and submitted again continues where it stopped, as a model would."""

    def __init__(self, eos, turn_tokens=5):
        self.eos, self.turn_tokens, self.live, self.seen = eos, turn_tokens, {}, []
        self.delivered = {}  # tokens of each trajectory's current turn delivered so far

    def submit(self, key, ids, max_tokens, seed):
        self.seen.append((key, list(ids), max_tokens))
        left = self.turn_tokens - self.delivered.get(key, 0)
        n = min(left, max_tokens)
        tokens = [100 + key] * (n - 1) + ([self.eos] if n == left else [101 + key])
        self.live[key] = (tokens, "stop" if n == left else "length")

    def step(self):
        out = []
        for key, (tokens, reason) in list(self.live.items()):
            head, rest = tokens[:2], tokens[2:]
            finished = not rest
            self.delivered[key] = 0 if finished else self.delivered.get(key, 0) + len(head)
            out.append(TurnOutput(key, head, [-1.0] * len(head), "ab", finished, reason))
            if finished:
                del self.live[key]
            else:
                self.live[key] = (rest, reason)
        return out

    def busy(self):
        return bool(self.live)

    def abort(self):  # what vLLM does: tokens not yet delivered are gone
        stopped = list(self.live)
        self.live.clear()
        return stopped


class Chat:
    """Answers every turn with a user message; done after `turns` turns; reward 0.5 per turn."""

    def __init__(self, turns=2, fail_at=None):
        self.turns, self.fail_at, self.n = turns, fail_at, 0

    def reset(self, prompt):
        return prompt.chat()

    def step(self, message):
        self.n += 1
        if self.n == self.fail_at:
            raise RuntimeError("tool backend down")
        if self.n >= self.turns:
            return StepResult(reward=0.5, done=True, counts={"tool_calls": 1})
        return StepResult([{"role": "user", "content": "More."}], reward=0.5, counts={"tool_calls": 1})


def _run(encoder, make_env, limits, prompts=2, samples=2, turn_tokens=5):
    engine = ScriptedEngine(encoder.eos, turn_tokens)
    calls = EnvCalls(4, 5.0)
    try:
        prompts = [Prompt(f"p{i}", (), f"Question {i}") for i in range(prompts)]
        trajectories, counts = run_trajectories(engine, encoder, make_env, prompts, samples, 3, limits, calls)
    finally:
        calls.close()
    return trajectories, counts, engine


def test_turns_and_observations_alternate_until_done(encoder):
    trajectories, counts, engine = _run(encoder, lambda: Chat(turns=3), Limits(max_turns=5, max_tokens=400))
    assert [(t.prompt.uid, t.sample_index) for t in trajectories] == [
        ("p0", 0),
        ("p0", 1),
        ("p1", 0),
        ("p1", 1),
    ]
    assert counts["ended/done"] == 4 and counts["tool_calls"] == 12
    for t in trajectories:
        assert t.end == "done" and t.turns == 3 and t.turn_rewards == [0.5, 0.5, 0.5]
        assert sum(t.loss_mask) == 15 and t.counts["tool_calls"] == 3
        assert {v for v, m in zip(t.versions, t.loss_mask, strict=True) if m} == {3}
    # each turn was sampled from the whole conversation before it: a prefix of the final ids that ends where
    # the turn's first token (a trained one, after an observation) begins
    for key, context, _ in engine.seen:
        t = trajectories[key]
        full = t.prompt_ids + t.ids
        at = len(context) - len(t.prompt_ids)
        assert (
            context == full[: len(context)] and t.loss_mask[at] == 1 and (at == 0 or t.loss_mask[at - 1] == 0)
        )
    assert len(engine.seen) == 12


@pytest.mark.parametrize(
    "limits, end, turns",
    [
        (Limits(max_turns=2, max_tokens=400), "max_turns", 2),
        (Limits(max_turns=9, max_tokens=30), "max_tokens", None),
        (Limits(max_turns=9, max_tokens=400, max_context=90), "max_tokens", None),
    ],
)
def test_each_limit_ends_a_trajectory_with_its_reason(encoder, limits, end, turns):
    trajectories, counts, _ = _run(encoder, lambda: Chat(turns=100), limits, prompts=1, samples=1)
    (t,) = trajectories
    assert t.end == end and counts[f"ended/{end}"] == 1
    assert turns is None or t.turns == turns
    assert len(t.ids) <= limits.max_tokens and len(t.prompt_ids) + len(t.ids) <= limits.max_context
    assert t.loss_mask[-1] == 1  # a trajectory always ends on a token the policy wrote


def test_a_turn_cut_at_max_turn_tokens_goes_to_the_environment(encoder):
    limits = Limits(max_turns=3, max_tokens=400, max_turn_tokens=3)
    trajectories, counts, _ = _run(encoder, lambda: Chat(turns=2), limits, prompts=1, samples=1)
    (t,) = trajectories
    assert t.end == "done" and t.turns == 2 and counts["turns_cut"] == 2
    first_obs = t.turn_ends[0] + 1
    assert t.ids[first_obs] == encoder.eos and t.loss_mask[first_obs] == 0  # the end token it did not write


def test_an_environment_error_ends_only_its_trajectory_and_becomes_a_dropped_rollout(encoder):
    made = iter([Chat(turns=2, fail_at=1), Chat(turns=2), Chat(turns=2), Chat(turns=2)])
    trajectories, counts, _ = _run(encoder, lambda: next(made), Limits(max_turns=4, max_tokens=400))
    assert [t.end for t in trajectories] == ["error", "done", "done", "done"]
    assert counts["errors"] == 1 and "tool backend down" in trajectories[0].error
    rollouts = [to_rollout(t, 0.7, "drop") for t in trajectories]
    assert rollouts[0].failed == "env_error" and not rollouts[1].failed
    assert to_rollout(trajectories[0], 0.7, "score").failed == ""
    r = rollouts[1]
    assert r.response_ids == tuple(trajectories[1].ids) and r.trained_tokens == 10 and r.weight_version == 3
    assert dict(r.env_counts)["turns"] == 2 and dict(r.env_counts)["ended/done"] == 1
    assert r.conversation[0][0] == "assistant" and r.conversation[1] == ("user", "More.")
    assert r.prompt.token_ids == tuple(trajectories[1].prompt_ids) and r.temperature == 0.7


def test_the_learner_batch_trains_only_what_the_policy_wrote(encoder):
    trajectories, _, _ = _run(encoder, lambda: Chat(turns=3), Limits(max_turns=5, max_tokens=400), samples=2)
    rollouts = [to_rollout(t, 1.0, "drop") for t in trajectories]
    scored = [ScoredRollout(r, RewardBreakdown(1.0, {})) for r in rollouts]
    batch = from_scored(scored, pad_id=0, group_size=2)
    for i, r in enumerate(rollouts):
        p = len(r.prompt.token_ids)
        n = len(r.response_ids)
        assert batch.input_ids[i, : p + n].tolist() == list(r.prompt.token_ids) + list(r.response_ids)
        assert batch.action_mask[i, p - 1 : p - 1 + n].tolist() == [float(m) for m in r.loss_mask]
        assert int(batch.action_mask[i].sum()) == r.trained_tokens
        trained = batch.action_mask[i].bool()
        assert torch.equal(batch.behaviour_logprobs[i][trained], r.logprobs[torch.tensor(r.loss_mask).bool()])
        assert batch.token_rewards[i, p - 1 + n - 1] == 1.0  # the reward on the last token, which it wrote
    assert all(
        v == OBSERVATION for r in rollouts for v, m in zip(r.versions, r.loss_mask, strict=True) if not m
    )


def test_a_failed_trajectory_drops_its_group_and_is_accounted():
    from dataclasses import replace

    from troupe.actors.protocol import Rollout
    from troupe.actors.reward.aggregation import WeightedSum
    from troupe.cluster.durability.accounting import Ledger
    from troupe.cluster.run.scoring import ErrorPolicy, dropped_groups, score_batch

    rollouts = []
    for p in range(3):
        for k in range(2):
            ids = (5, 6, 7)
            rollouts.append(
                Rollout(Prompt(f"p{p}", (1, 2), "q"), k, ids, "a", torch.zeros(3), 0, "stop", 1.0)
            )
    rollouts[3] = replace(rollouts[3], failed="env_timeout")
    values = {"mine": torch.arange(6, dtype=torch.float32)}
    agg = WeightedSum({"mine": 1.0})
    result = score_batch(rollouts, values, agg, ErrorPolicy("drop"), 2)
    assert [s.reward.dropped for s in result.scored] == ["", "", "env_timeout", "env_timeout", "", ""]
    ledger = Ledger()
    ledger.enter(3)
    assert ledger.settle(dropped_groups(result.scored, 2))["accounting/lost"] == 0
    assert ledger.dropped == {"env_timeout": 1}


def test_a_rollout_refuses_a_mask_or_turns_that_do_not_fit():
    from troupe.actors.protocol import Rollout

    prompt = Prompt("p", (1,), "q")
    args = (prompt, 0, (5, 6, 7), "a", torch.zeros(3), 0, "stop", 1.0)
    with pytest.raises(ValueError, match="loss_mask of 2 for 3 response tokens"):
        Rollout(*args, loss_mask=(1, 0))
    with pytest.raises(ValueError, match="versions of 4 for 3 response tokens"):
        Rollout(*args, versions=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="turn_ends"):
        Rollout(*args, turn_ends=(3,), turn_rewards=(1.0,))
    with pytest.raises(ValueError, match="turn_ends"):
        Rollout(*args, turn_ends=(2,))
    assert Rollout(*args, loss_mask=(1, 0, 1)).trained_tokens == 2 and Rollout(*args).trained_tokens == 3


class SyncAfter:
    """New weights (version 9) become due after `steps` engine steps."""

    def __init__(self, engine, steps):
        self.engine, self.steps, self.applied = engine, steps, 0
        real_step = engine.step

        def counted():
            self.steps -= 1
            return real_step()

        engine.step = counted

    def due(self):
        return self.steps <= 0 and not self.applied

    def apply(self):
        self.applied += 1
        return 9


def test_weights_that_arrive_mid_turn_continue_the_turn_with_per_token_versions(encoder):
    engine = ScriptedEngine(encoder.eos, turn_tokens=6)
    sync = SyncAfter(engine, steps=1)  # after the first step: 2 of the first turn's 6 tokens sampled
    calls = EnvCalls(4, 5.0)
    try:
        prompts = [Prompt("p0", (), "Question 0")]
        trajectories, counts = run_trajectories(
            engine, encoder, lambda: Chat(turns=2), prompts, 1, 3, Limits(max_turns=3, max_tokens=400), calls,
            sync=sync,
        )  # fmt: skip
    finally:
        calls.close()
    assert sync.applied == 1 and counts["weight_syncs"] == 1 and counts["partial_turns"] == 1
    for t in trajectories:
        assert t.end == "done" and t.turns == 2
        first_turn = t.versions[: t.turn_ends[0] + 1]
        assert first_turn == [3, 3, 9, 9, 9, 9]  # the span before the sync keeps its version
        assert t.messages[1]["content"] == encoder.tokenizer.decode(t.ids[:6], skip_special_tokens=True)
        assert t.ids[t.turn_ends[0]] == encoder.eos and t.turn_ends[0] == 5  # the turn still has its 6 tokens
        after = slice(t.turn_ends[0] + 1, None)
        second = [v for v, m in zip(t.versions[after], t.loss_mask[after], strict=True) if m]
        assert set(second) == {9}
        rollout = to_rollout(t, 1.0, "drop")
        assert rollout.weight_version == 3  # the oldest span: staleness is measured by it
    # the continuation was sampled from the whole context, partial tokens included, with what was left of the turn
    continued = [(key, ids, room) for key, ids, room in engine.seen if room == 126]
    assert len(continued) == 1
    for key, ids, _ in continued:
        t = trajectories[key]
        assert ids == t.prompt_ids + t.ids[:2]
