"""ALaRM's aspect selection inside the hierarchy (actors/reward/selection.py), and the per-sample log with
`troupe inspect` (cluster/observe/rollouts.py)."""

import json

import pytest
import torch

from troupe.actors.protocol import Prompt, RewardBreakdown, Rollout, ScoredRollout
from troupe.actors.reward.alarm import HierarchyAggregation, Normalizer
from troupe.actors.reward.selection import AspectSelection
from troupe.cluster.cli import main as cli
from troupe.cluster.observe.rollouts import RolloutLog, inspect_run, kept_prompt, read_rows, sample_rows


def _batch(n_prompts=8, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rollouts, holistic = [], []
    for p in range(n_prompts):
        prompt = Prompt(f"p{p}", (1,), f"question {p}", "")
        for k in range(n):
            rollouts.append(Rollout(prompt, k, (1, 2), f"answer {p}.{k}", torch.zeros(2), 0, "stop", 1.0))
            holistic.append(float(torch.rand((), generator=g)))
    h = torch.tensor(holistic)
    noise = torch.rand(len(h), generator=g)
    values = {
        "holistic": h,
        "agrees": h + 0.1 * noise,  # orders pairs as the holistic reward does
        "disagrees": -h + 0.1 * noise,
        "noise": noise,
    }
    return rollouts, values


def _hierarchy(warmup=0, min_agreement=0.6):
    aspects = {"agrees": 0.3, "disagrees": 0.3, "noise": 0.1}
    selection = AspectSelection(aspects, min_agreement, warmup)
    return HierarchyAggregation(
        "holistic", dict(aspects), 0.0, 1.0, Normalizer(0.5, 0.3), selection=selection
    )


def test_selection_keeps_the_aspects_that_agree_with_the_holistic_reward():
    agg = _hierarchy()
    rollouts, values = _batch()
    out = agg.combine(values, rollouts)
    assert agg.aspect_weights == {"agrees": 0.3}
    assert set(out.weights) == {"holistic", "agrees"}
    m = agg.metrics()
    assert m["hierarchy/agreement/agrees"] > 0.9 and m["hierarchy/agreement/disagrees"] < 0.1
    assert m["hierarchy/selected/agrees"] == 1 and m["hierarchy/selected/noise"] == 0


def test_a_longer_warmup_uses_every_candidate_until_it_decides():
    agg = _hierarchy(warmup=64)
    rollouts, values = _batch()  # 32 samples: not yet
    agg.combine(values, rollouts)
    assert set(agg.aspect_weights) == {"agrees", "disagrees", "noise"} and agg.metrics() == {}
    rollouts, values = _batch(seed=1)
    agg.combine(values, rollouts)
    assert agg.aspect_weights == {"agrees": 0.3}


def test_the_decision_is_saved_and_restored_not_redone():
    agg = _hierarchy()
    agg.combine(*reversed(_batch()))
    state = json.loads(json.dumps(agg.state_dict()))
    fresh = _hierarchy(warmup=10_000)
    fresh.load_state_dict(state)
    assert fresh.aspect_weights == {"agrees": 0.3} and fresh.selection.done
    state["selection"]["chosen"] = ["grammar"]
    with pytest.raises(ValueError, match="grammar"):
        _hierarchy().load_state_dict(state)


def _scored():
    rollouts, values = _batch(3, 2)
    out = []
    for i, r in enumerate(rollouts):
        dropped = "reward_error" if r.prompt.uid == "p2" else ""
        reward = RewardBreakdown(
            float(values["holistic"][i]) if not dropped else 0.0,
            {"holistic": float(values["holistic"][i]), "mine": float("nan") if dropped else 1.0},
            {"holistic": 1.0},
            "dropped" if dropped else "holistic",
            dropped=dropped,
        )
        out.append(ScoredRollout(r, reward))
    return out


def test_rows_hold_the_breakdown_and_the_log_rewinds(tmp_path):
    scored = _scored()
    rows = sample_rows(0, scored, [0.5, -0.5, 1.0, -1.0, float("nan"), float("nan")], 1.0)
    assert len(rows) == 6
    first = rows[0]
    assert first["objectives"]["mine"] == 1.0 and first["weights"] == {"holistic": 1.0}
    assert first["advantage"] == 0.5 and first["length"] == 2 and first["behaviour_version"] == 0
    assert rows[4]["dropped"] == "reward_error" and rows[4]["objectives"]["mine"] is None
    log = RolloutLog(tmp_path, 1.0)
    log.write(rows)
    log.write(sample_rows(1, scored, None, 1.0))
    log.rewind(0)
    log.close()
    assert {r["iteration"] for r in read_rows(tmp_path)} == {0}


def test_a_fraction_keeps_whole_prompt_groups_stably():
    chosen = {f"p{i}" for i in range(1000) if kept_prompt(f"p{i}", 0.25)}
    assert 200 < len(chosen) < 300
    assert chosen == {f"p{i}" for i in range(1000) if kept_prompt(f"p{i}", 0.25)}
    rows = sample_rows(0, _scored(), None, 0.5)
    for uid in {r["uid"] for r in rows}:
        assert sum(r["uid"] == uid for r in rows) == 2


def test_inspect_prints_top_and_bottom_with_the_breakdown(tmp_path, capsys):
    log = RolloutLog(tmp_path, 1.0)
    log.write(sample_rows(3, _scored(), None, 1.0))
    log.close()
    text = inspect_run(str(tmp_path), top=1)
    rewards = sorted(r["reward"] for r in read_rows(tmp_path) if not r["dropped"])
    assert "6 samples over the whole run" in text and "2 dropped" in text
    top, bottom = text.split("== bottom")
    assert f"reward {rewards[-1]:.4g}" in top and f"reward {rewards[0]:.4g}" in bottom
    assert "objectives: holistic=" in text and "mine=failed" in text
    assert cli(["inspect", str(tmp_path), "--iteration", "3", "--top", "2"]) == 0
    assert "iteration 3" in capsys.readouterr().out
    assert cli(["inspect", str(tmp_path), "--iteration", "9"]) == 2
    assert "no samples logged for iteration 9" in capsys.readouterr().err
    assert cli(["inspect", str(tmp_path / "nowhere")]) == 2
