"""`troupe rm data`: ratings (+ scales.yaml) and preference pairs built from the shared public data in the shapes the
reward-model jobs read; a data folder without a source fails naming the missing file; the bench's converter is
the installed module's. Data-dependent tests skip when ../shared/data is absent."""

import json

import pytest
import yaml

from tests.conftest import SHARED_DATA
from troupe.cluster.cli import main as troupe
from troupe.cluster.data.preferences import load_preferences
from troupe.cluster.data.ratings import load_ratings, resolve_scales
from troupe.cluster.data.rm_data import SCALES, main

needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (the shared public datasets)"
)

# The objectives the shared data rate, named as `troupe rm data ratings` writes them.
OBJECTIVES = {
    "chat_understandability",
    "chat_naturalness",
    "chat_coherence",
    "chat_engagingness",
    "chat_groundedness",
    "chat_overall",
    "d2t_informativeness",
    "d2t_naturalness",
    "d2t_overall",
    "consistency",
    "safety",
    "verbosity",
}


@needs_data
def test_ratings_and_scales_load_as_stage_one_reads_them(tmp_path, capsys):
    out = tmp_path / "ratings.jsonl"
    assert troupe(["rm", "data", "ratings", "--data-dir", str(SHARED_DATA), "--out", str(out)]) == 0
    assert "next: troupe rm train rm.stage=regression" in capsys.readouterr().out
    scales = yaml.safe_load((tmp_path / "scales.yaml").read_text())
    assert set(scales) == OBJECTIVES and scales["chat_overall"] == [1.0, 5.0]
    ratings = load_ratings(str(out), resolve_scales(None, str(tmp_path / "scales.yaml")))
    assert len(ratings.responses) == 360 + 300 + 235 + 239 + 2 * 450
    assert set(ratings.objectives) == OBJECTIVES
    # every rating lies on its documented scale (load_ratings fails otherwise); a small random subset too
    small = tmp_path / "small.jsonl"
    argv = ["ratings", "--data-dir", str(SHARED_DATA), "--out", str(small), "--max-rows", "40"]
    assert main(argv + ["--scales", str(tmp_path / "small.yaml")]) == 0
    rows = [json.loads(line) for line in small.read_text().splitlines()]
    assert len(rows) == 40
    load_ratings(str(small), resolve_scales(None, str(tmp_path / "small.yaml")))


@needs_data
def test_pairs_split_train_and_test_disjoint(tmp_path):
    common = ["pairs", "--source", "hh-rlhf,pandalm", "--data-dir", str(SHARED_DATA)]
    assert main(common + ["--split", "train", "--out", str(tmp_path / "train.jsonl")]) == 0
    assert main(common + ["--split", "test", "--out", str(tmp_path / "test.jsonl"), "--max-pairs", "50"]) == 0
    train, dropped = load_preferences(tmp_path / "train.jsonl", subset_key="subset")
    test, _ = load_preferences(tmp_path / "test.jsonl", subset_key="subset")
    assert not dropped and len(test) == 50
    assert {p.subset for p in train} == {"hh-harmless", "pandalm"}
    assert not {p.source for p in train} & {p.source for p in test}
    assert (
        main(
            [
                "pairs",
                "--source",
                "pandalm",
                "--data-dir",
                str(SHARED_DATA),
                "--out",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    assert {p.subset for p in load_preferences(tmp_path / "p.jsonl", subset_key="subset")[0]} == {"pandalm"}


def test_a_missing_source_is_named(tmp_path, capsys):
    (tmp_path / "hh-rlhf").mkdir()
    assert main(["pairs", "--data-dir", str(tmp_path), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "hh-rlhf/harmless-base/test.jsonl.gz" in err and "not found" in err
    assert main(["ratings", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "UniEval/reproduce/data/dialogue/topical_chat.json" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "p.jsonl").exists()


def test_bench_uses_the_installed_converter():
    import bench.rm_data
    import troupe.cluster.data.rm_data as installed

    assert (
        bench.rm_data.ratings_rows is installed.ratings_rows and bench.rm_data.hh_pairs is installed.hh_pairs
    )
    assert set(SCALES) == OBJECTIVES
