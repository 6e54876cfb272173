"""The reward-model jobs as a user runs them (`troupe rm train|eval` in-process, tiny local backbone, no Ray):
stage 1 prints the exact stage-2 command and it runs as printed; a Bradley-Terry loss at chance fails the job and
marks the bundle failed, which serving refuses, unless rm.allow_chance=true; the frozen linear probe stage writes
a servable bundle that `rm eval` scores; `rm eval` subsamples pairs per subset at random (seeded) and reports it;
every training stage warns about cut rows; feature extraction announces its tokens and counts them on the bar."""

import json
import random
import shlex
from pathlib import Path

import pytest
import torch

from troupe.actors.models import resolve_model
from troupe.actors.reward.backbone import RewardBackbone
from troupe.actors.reward.bundle import BundleScorer, FailedBundle, load_bundle, read_info
from troupe.actors.reward.feature_cache import cached_features
from troupe.cluster.cli import main as troupe
from troupe.cluster.data.preferences import Preference, load_preferences
from troupe.cluster.data.ratings import load_ratings
from troupe.cluster.jobs.rm_training import (
    CHANCE,
    ChanceLevel,
    at_chance,
    bt_probe,
    train_gating_stage,
    train_probe_stage,
    train_regression,
)

WORDS = ["please", "thanks", "the", "answer", "is", "seven", "maybe", "numbers", "kindly", "sure"]
TINY = "rm.backbone=builtin:tiny-llama"


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("builtin:tiny-llama")


def _text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    ratings = []
    for i in range(16):
        text = _text(rng, rng.randint(1, 12))
        ratings.append(
            {
                "prompt": f"Q{i}?",
                "response": text,
                "polite": int("please" in text),
                "verbosity": len(text.split()),
            }
        )
    _write(tmp_path / "ratings.jsonl", ratings)
    (tmp_path / "scales.yaml").write_text("polite: [0, 1]\nverbosity: [0, 12]\n")
    pairs = [
        {"prompt": f"P{i}?", "chosen": "please " + _text(rng, 2), "rejected": _text(rng, 9), "subset": s}
        for i, s in enumerate(["a"] * 10 + ["b"] * 6)
    ]
    _write(tmp_path / "pairs-train.jsonl", pairs)
    _write(tmp_path / "pairs-test.jsonl", pairs)
    return tmp_path


def _next(out: str) -> list[str]:
    return [line.removeprefix("next: ") for line in out.splitlines() if line.startswith("next: ")]


def test_stage_one_prints_the_stage_two_command_that_runs(files, capsys):
    rc = troupe(["rm", "train", TINY, "rm.ratings_path=ratings.jsonl", "rm.scales_path=scales.yaml",
                 "dataset.path=pairs-train.jsonl", "rm.max_length=64"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    commands = _next(out.out)
    gating = next(c for c in commands if "rm.stage=gating" in c)
    assert "rm.stage1=outputs/troupe/rm-armo" in gating and "dataset.path=pairs-train.jsonl" in gating
    assert "rm.verbosity=verbosity" in gating
    evaluate = next(c for c in commands if c.startswith("troupe rm eval"))
    assert "rm.bundle=outputs/troupe/rm-armo" in evaluate and "dataset.path=pairs-test.jsonl" in evaluate
    assert "rm.eval_key=armo/polite" in evaluate
    # the printed stage-2 command, exactly as printed (small settings appended: tiny data)
    args = shlex.split(gating)[1:] + ["rm.gating_steps=60", "rm.gating_hidden=16", "rm.gating_layers=1",
                                      "rm.gating_batch=16", "rm.gating_dropout=0", "rm.allow_chance=true"]  # fmt: skip
    assert troupe(args) == 0
    stage2 = _next(capsys.readouterr().out)
    assert any(c.startswith("troupe rm eval rm.bundle=outputs/troupe/rm-armo-gating") for c in stage2)
    assert any("--config-name demo_hierarchical" in c for c in stage2)
    assert read_info(files / "outputs/troupe/rm-armo-gating").gating is not None
    # and the printed evaluation of stage 1 runs too
    assert troupe(shlex.split(evaluate)[1:]) == 0


def test_gating_at_chance_fails_and_the_bundle_is_refused(files, capsys):
    assert troupe(["rm", "train", TINY, "rm.ratings_path=ratings.jsonl", "rm.scales_path=scales.yaml",
                   "rm.max_length=64"]) == 0  # fmt: skip
    capsys.readouterr()
    # every pair also appears mirrored (same prompt): no gate ranks both ways, the loss stays at log 2
    rows = []
    for i in range(8):
        a, b = "please sure", "please sure ."
        rows += [
            {"prompt": f"P{i}?", "chosen": a, "rejected": b},
            {"prompt": f"P{i}?", "chosen": b, "rejected": a},
        ]
    _write(files / "mirror.jsonl", rows)
    gating = ["rm", "train", "rm.stage=gating", "rm.stage1=outputs/troupe/rm-armo", "rm.output=outputs/armo2",
              "dataset.path=mirror.jsonl", "rm.gating_steps=60", "rm.gating_hidden=8", "rm.gating_layers=1"]  # fmt: skip
    assert troupe(gating) == 2
    err = capsys.readouterr().err
    assert "stayed at chance" in err and "0.69" in err and "rm.allow_chance=true" in err and "Try" in err
    info = read_info(files / "outputs/armo2", allow_failed=True)
    assert info.failed and "chance" in info.failed
    with pytest.raises(FailedBundle, match="marked failed"):
        read_info(files / "outputs/armo2")
    with pytest.raises(FailedBundle):
        BundleScorer(files / "outputs/armo2")  # what a reward shard loads: serving refuses it
    evaluate = ["rm", "eval", "rm.bundle=outputs/armo2", "dataset.path=pairs-test.jsonl"]
    assert troupe(evaluate) == 2 and "marked failed" in capsys.readouterr().err
    # opting in keeps a usable bundle
    assert troupe(gating + ["rm.allow_chance=true"]) == 0
    assert read_info(files / "outputs/armo2").failed is None


def test_at_chance():
    assert at_chance([0.698] * 10 + [0.692] * 10)
    assert not at_chance([0.69] * 10 + [0.5] * 10)
    assert CHANCE == pytest.approx(0.6931, abs=1e-4)


def test_probe_stage_writes_a_servable_evaluable_bundle(files, capsys, model_path):
    rc = troupe(["rm", "train", "rm.stage=probe", "rm.name=probe", TINY, "dataset.path=pairs-train.jsonl",
                 "rm.max_length=64", "rm.subset_key=subset"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    folder = files / "outputs/troupe/rm-probe"
    info, tensors = load_bundle(folder)
    assert info.reward_head and info.backbone == model_path and info.stats["probe"]["pairs"] == 16
    stats = info.stats["probe"]
    assert stats["bt_loss_first_last"][1] < CHANCE and stats["train_accuracy"] > 0.5
    # the probe is bt_probe (the bench's "BT, linear probe on the frozen backbone") on the cached features
    prefs, _ = load_preferences(files / "pairs-train.jsonl")
    backbone = RewardBackbone(model_path, max_length=64)
    feats = cached_features(backbone, [p.prompt for p in prefs] * 2,
                            [p.chosen for p in prefs] + [p.rejected for p in prefs], files / "outputs/troupe/feature-cache")  # fmt: skip
    assert feats.stats["computed"] == 0  # the probe's features are the shared cache's
    w = bt_probe(feats.response[:16], feats.response[16:])
    torch.testing.assert_close(tensors["reward_head.weight"][0], w)
    # servable: a BundleScorer (what reward shards load) scores chosen over rejected as on the features
    scorer = BundleScorer(folder)
    chosen = scorer.score([p.prompt for p in prefs], [p.chosen for p in prefs])["probe"]
    torch.testing.assert_close(chosen, feats.response[:16] @ w, rtol=1e-4, atol=1e-4)
    evaluate = next(c for c in _next(out.out) if c.startswith("troupe rm eval"))
    assert "rm.bundle=outputs/troupe/rm-probe" in evaluate
    assert troupe(shlex.split(evaluate)[1:]) == 0
    report = json.loads((files / "outputs/troupe/rm_eval-rm-probe-probe.json").read_text())
    assert report["pairs"] == 16 and report["accuracy"] > 0.5 and set(report["subsets"]) == {"a", "b"}


def test_probe_at_chance_fails(model_path, tmp_path):
    same = [
        Preference([{"role": "user", "content": f"Q{i}"}], f"a {i}", f"a {i}", f"p:{i}") for i in range(4)
    ]
    with pytest.raises(ChanceLevel, match="probe: the Bradley-Terry loss stayed at chance"):
        train_probe_stage(model_path, same, "probe", tmp_path / "b", tmp_path / "c", max_length=64)
    assert read_info(tmp_path / "b", allow_failed=True).failed
    folder, stats = train_probe_stage(
        model_path, same, "probe", tmp_path / "b", tmp_path / "c", max_length=64, allow_chance=True
    )
    assert stats["at_chance"] and read_info(folder).failed is None


def test_eval_samples_per_subset_at_random_and_reports_it(files, capsys):
    assert troupe(["rm", "train", "rm.stage=probe", "rm.name=probe", TINY, "dataset.path=pairs-train.jsonl",
                   "rm.max_length=64"]) == 0  # fmt: skip
    capsys.readouterr()
    base = ["rm", "eval", "rm.bundle=outputs/troupe/rm-probe", "dataset.path=pairs-test.jsonl",
            "rm.subset_key=subset", "dataset.max_pairs_per_subset=4", "dataset.sample=random"]  # fmt: skip
    chosen = {}
    for seed in (1, 2):
        assert troupe(base + [f"run.seed={seed}"]) == 0
        out = capsys.readouterr().out
        assert "tokens" in out  # the cost, before extraction
        report = json.loads((files / "outputs/troupe/rm_eval-rm-probe-probe.json").read_text())
        assert report["pairs"] == 8 and {k: v["n"] for k, v in report["subsets"].items()} == {"a": 4, "b": 4}
        assert report["sample"] == {"sample": "random", "seed": seed, "max_pairs": None,
                                    "max_pairs_per_subset": 4, "subset_key": "subset"}  # fmt: skip
        assert report["dropped"] == {"over_max_pairs_per_subset": 8}
        rows = Path(report["scores_path"]).read_text().splitlines()
        chosen[seed] = [json.loads(r)["source"] for r in rows]
    assert chosen[1] != chosen[2]  # another seed, another sample
    assert troupe([a for a in base if not a.startswith("rm.subset_key")]) == 2  # needs rm.subset_key
    assert "rm.subset_key" in capsys.readouterr().err


def test_sampling_in_the_loader(tmp_path):
    rows = [
        {"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "g": "x" if i < 8 else "y"} for i in range(12)
    ]
    path = _write(tmp_path / "p.jsonl", rows)
    first, skipped = load_preferences(path, max_pairs=5)
    assert [p.prompt[0]["content"] for p in first] == [f"q{i}" for i in range(5)] and skipped == {
        "over_max_pairs": 7
    }
    a, _ = load_preferences(path, max_pairs=5, sample="random", seed=0)
    b, _ = load_preferences(path, max_pairs=5, sample="random", seed=0)
    c, _ = load_preferences(path, max_pairs=5, sample="random", seed=3)
    assert a == b and a != c and len(a) == 5
    per, skipped = load_preferences(path, subset_key="g", max_pairs_per_subset=3)
    assert [p.subset for p in per] == ["x"] * 3 + ["y"] * 3
    assert skipped == {"over_max_pairs_per_subset": 6}


def test_every_training_stage_warns_about_cut_rows(model_path, tmp_path, capsys):
    rng = random.Random(1)
    rows = [{"prompt": "Q?", "response": ("long " * 80 if i % 2 else "short"), "v": i % 3} for i in range(6)]
    ratings = load_ratings(str(_write(tmp_path / "r.jsonl", rows)), {"v": (0, 2)})
    stage1, _ = train_regression(model_path, ratings, "armo", tmp_path / "s1", tmp_path / "c", max_length=64)
    err = capsys.readouterr().err
    assert "warning: the truncation rule cut 3 of 6 rated responses" in err and "rm.max_length" in err
    prefs = [
        Preference([{"role": "user", "content": f"Q{i}"}], "yes " + _text(rng, 2), "long " * 80, f"p:{i}")
        for i in range(4)
    ]
    train_gating_stage(stage1, prefs, tmp_path / "s2", tmp_path / "c", steps=5, batch_size=4, hidden=8,
                       n_hidden=1, allow_chance=True)  # fmt: skip
    assert "warning: the truncation rule cut 4 of 4 pairs" in capsys.readouterr().err
    train_probe_stage(
        model_path, prefs, "probe", tmp_path / "p", tmp_path / "c", max_length=64, allow_chance=True
    )
    assert "warning: the truncation rule cut 4 of 4 pairs" in capsys.readouterr().err


def test_feature_bar_counts_tokens_and_the_cost_is_announced(model_path, tmp_path, capsys):
    backbone = RewardBackbone(model_path, max_length=96)
    prompts = [[{"role": "user", "content": f"Q{i}"}] for i in range(6)]
    responses = ["word " * (1 + 10 * (i % 3)) for i in range(6)]
    feats = cached_features(backbone, prompts, responses, tmp_path, shard_size=4, progress=True, report=True)
    tokens = sum(len(e.input_ids) for e in backbone.encode_rows(prompts, responses))
    assert feats.stats["tokens_computed"] == tokens and feats.stats["tokens_per_s"] > 0
    captured = capsys.readouterr()
    assert f"{tokens:,} tokens" in captured.out  # before extracting
    assert "tokens/s" in captured.out  # measured, after
    assert f"{tokens}/{tokens}" in captured.err and "tok/s" in captured.err  # the bar's unit is tokens
    again = cached_features(backbone, prompts, responses, tmp_path, shard_size=4, report=True)
    assert again.stats["tokens_computed"] == 0 and capsys.readouterr().out == ""


def test_probe_is_judged_on_held_out_pairs(model_path, tmp_path):
    # 60 pairs of unrelated random words: a linear head on the backbone's features fits the training pairs, but
    # ranks pairs it did not see no better than a coin
    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]

    def text(n: int = 6) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    noise = [Preference([{"role": "user", "content": text()}], text(), text(), f"n:{i}") for i in range(60)]
    with pytest.raises(
        ChanceLevel, match=r"probe \(5-fold held-out: \d+% of 60 pairs ranked right, a coin reaches"
    ):
        train_probe_stage(model_path, noise, "probe", tmp_path / "b", tmp_path / "c", max_length=64)
    stats = read_info(tmp_path / "b", allow_failed=True).stats["probe"]
    assert stats["bt_loss_first_last"][1] < 0.5 * CHANCE  # the training loss alone would have passed it
    held_out = stats["held_out"]
    assert held_out["pairs"] == 60 and held_out["accuracy"] <= held_out["coin_max"] < 0.62
    # the same number of pairs with a signal (one fixed reply preferred over another) passes on the held-out pairs
    signal = [
        Preference([{"role": "user", "content": text()}], "Sure, here it is.", "no", f"s:{i}")
        for i in range(60)
    ]
    folder, stats = train_probe_stage(
        model_path, signal, "probe", tmp_path / "s", tmp_path / "c", max_length=64
    )
    assert not stats["at_chance"] and stats["held_out"]["accuracy"] > 0.9
    assert read_info(folder).failed is None
