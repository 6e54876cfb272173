"""HaF-RM and Bradley-Terry training on the DeepSpeed learner group (RewardTrainer ranks) in bfloat16 and float32
(learner.dtype set explicitly, whatever the host CPU has), the bundle they write, and `troupe job=rm_eval` on it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import TINY_OVERRIDES, killed_at_step, tiny_config
from troupe.actors.reward.bundle import BundleScorer
from troupe.cluster.data.preferences import load_preferences
from troupe.cluster.jobs.reward_model import train_bt_or_haf

pytestmark = pytest.mark.integration


def _pairs_file(path: Path) -> Path:
    rows = []
    for i in range(16):
        rows.append(
            {
                "prompt": f"What is {i} + 2?",
                "chosen": f"Answer: {i + 2}",
                "rejected": "no no no no no no no no",
                "subset": "math" if i % 2 else "format",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_haf(tmp, dtype: str):
    data = _pairs_file(tmp / "pairs.jsonl")
    cfg = tiny_config(
        "job=rm_train",
        "rm.stage=haf",
        "rm.backbone=builtin:tiny-llama",
        "rm.name=haf",
        f"rm.output={tmp / 'bundle'}",
        "rm.max_length=64",
        "rm.epochs=3",
        f"dataset.path={data}",
        "dataset.pairs_per_iteration=16",
        "learner.lr=1e-3",
        f"learner.dtype={dtype}",
    )
    prefs, _ = load_preferences(data)
    folder, stats = train_bt_or_haf(cfg, prefs)
    return folder, stats, data, prefs


@pytest.fixture(scope="module")
def haf_bundle_bf16(ray_session, tmp_path_factory):
    return _train_haf(tmp_path_factory.mktemp("haf-bf16"), "bfloat16")


@pytest.fixture(scope="module")
def haf_bundle_fp32(ray_session, tmp_path_factory):
    return _train_haf(tmp_path_factory.mktemp("haf-fp32"), "float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"], ids=["bf16", "fp32"])
def test_haf_trains_both_heads_on_the_learner_group(request, dtype):
    folder, stats, _, prefs = request.getfixturevalue(
        "haf_bundle_" + ("bf16" if dtype == "bfloat16" else "fp32")
    )
    assert stats["alpha"] == 0.2 and stats["pairs"] == 16
    assert stats["first"]["policy_loss"] > 0  # the DPO-style term is in the loss
    assert stats["last"]["reward_loss"] < stats["first"]["reward_loss"]
    assert stats["last"]["accuracy"] >= stats["first"]["accuracy"]
    # trained body + reward head, read at the end-of-turn token as in training; the backbone in the same dtype
    scorer = BundleScorer(folder, dtype=dtype)
    assert next(scorer.backbone.model.parameters()).dtype == getattr(torch, dtype)
    chosen = scorer.score([p.prompt for p in prefs], [p.chosen for p in prefs])["haf"]
    rejected = scorer.score([p.prompt for p in prefs], [p.rejected for p in prefs])["haf"]
    assert float((chosen > rejected).float().mean()) > 0.5
    assert torch.isfinite(chosen).all()


def test_rm_eval_job_reports_subsets_and_sections(haf_bundle_bf16, tmp_path):
    folder, stats, data, _ = haf_bundle_bf16
    cmd = [
        str(Path(sys.executable).with_name("troupe")),
        *TINY_OVERRIDES,
        "job=rm_eval",
        f"rm.bundle={folder}",
        f"dataset.path={data}",
        "rm.subset_key=subset",
        "rm.sections={arith: [math], style: [format]}",
        f"run.output_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / f"rm_eval-{Path(folder).name}-haf.json").read_text())
    assert report["pairs"] == 16 and set(report["subsets"]) == {"math", "format"}
    assert set(report["sections"]) == {"arith", "style"}
    assert report["max_length"] == 64 and report["max_length_from"] == "bundle"
    assert (
        report["dropped"] == {} and report["cut"] == stats["cut"]
    )  # one truncation rule: training = serving
    rows = Path(report["scores_path"]).read_text().splitlines()
    assert len(rows) == 16 and json.loads(rows[0])["subset"] == "format"
    assert "pairwise accuracy (haf)" in proc.stdout


def test_bt_killed_and_resumed_ends_like_an_uninterrupted_run(ray_session, tmp_path, monkeypatch):
    """rm.stage=bt with run.checkpoint_every=2 over 4 steps, killed after step 2's row: resume=latest redoes
    step 2 and writes the bundle of the uninterrupted run."""
    from safetensors.torch import load_file

    from troupe.cluster.jobs.reward_model import run_rm_job

    data = _pairs_file(tmp_path / "pairs.jsonl")
    base = ["job=rm_train", "rm.stage=bt", "rm.backbone=builtin:tiny-llama", "rm.max_length=64", "rm.epochs=2",
            f"dataset.path={data}", "dataset.pairs_per_iteration=8", "learner.lr=1e-3", "learner.dtype=float32",
            "run.deterministic=true", "run.progress_bar=false"]  # fmt: skip

    def cfg(name, *extra):
        return tiny_config(
            *base, f"run.output_dir={tmp_path / name}", f"rm.output={tmp_path / name / 'rm'}", *extra
        )

    run_rm_job(cfg("whole"))
    with killed_at_step(monkeypatch, 2):
        run_rm_job(cfg("split", "run.checkpoint_every=2"))
    result = run_rm_job(cfg("split", "run.checkpoint_every=2", "resume=latest"))
    assert result["stats"]["redone_steps"] == 1
    metrics = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in metrics] == [0, 1, 2, 3]
    whole = {p.name: load_file(str(p)) for p in (tmp_path / "whole" / "rm").glob("*.safetensors")}
    resumed = {p.name: load_file(str(p)) for p in (tmp_path / "split" / "rm").glob("*.safetensors")}
    assert whole.keys() == resumed.keys() and whole
    for name, tensors in whole.items():
        for k, v in tensors.items():
            torch.testing.assert_close(resumed[name][k], v, rtol=0, atol=1e-6, msg=f"{name}:{k}")
