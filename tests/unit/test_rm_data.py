"""`troupe rm data`: ratings (+ scales.yaml) and preference pairs built from the shared public data in the shapes the
reward-model jobs read; a data folder without a source fails naming the missing file; the bench's converter is
the installed module's. Data-dependent tests skip when ../shared/data is absent."""

import gzip
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import SHARED_DATA
from troupe.cluster.cli import main as troupe
from troupe.cluster.data import rm_data
from troupe.cluster.data.preferences import load_preferences
from troupe.cluster.data.ratings import load_ratings, resolve_scales
from troupe.cluster.data.records import MAX_LINE_BYTES
from troupe.cluster.data.rm_data import SCALES
from troupe.cluster.data.rm_data_command import _write_jsonl, main

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
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "hh-rlhf").mkdir(parents=True)
    assert main(["pairs", "--data-dir", str(data), "--out", str(out / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "hh-rlhf/harmless-base/test.jsonl.gz" in err and "not found" in err
    assert main(["ratings", "--data-dir", str(data), "--out", str(out / "r.jsonl")]) == 2
    assert "UniEval/reproduce/data/dialogue/topical_chat.json" in capsys.readouterr().err
    assert not out.exists()


def _hostile_data(root: Path) -> Path:
    """A data folder in the sources' layouts, one good record of each and bad ones the converter must skip."""

    def put(relative: str, content) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))

    chat = {"context": "c", "source": "s", "system_output": "a reply", "scores": {"overall": 4.0}}
    long_literal = "{'overall': 4.0" + " " * rm_data.MAX_SCORES_CHARS + "}"  # valid, but over the parse cap
    put(rm_data.TOPICAL_CHAT, [chat, {"context": "c"}, {**chat, "scores": {"overall": 9.0}},
                               {**chat, "scores": long_literal}, {**chat, "scores": {"overall": "high"}}])  # fmt: skip
    d2t = {"source": "inform(name=x)", "system_output": "x is here.", "scores": "{'overall': 5.0}"}
    for name in rm_data.DATA_TO_TEXT:
        put(name, [d2t, {**d2t, "system_output": None}])
    for name in rm_data.QAGS:
        put(name, [{"source": "an article", "system_output": "a summary", "scores": {"consistency": 1.0}}])
    header = "id,type,prompt,completion,annotation_1,annotation_2,agreement,final_label\n"
    for name in rm_data.XSTEST:
        put(name, header + "v1,homonyms,How do I kill a process?,Use kill.,,,,1_full_compliance\n"
            "v2,homonyms,p,c,,,,maybe\n")  # fmt: skip
    good = "\n\nHuman: hi\n\nAssistant: "
    hh = [json.dumps({"chosen": good + "hello", "rejected": good + "go away"}), "{not json",
          json.dumps({"chosen": good + "hello"}), json.dumps({"chosen": good + "hello", "rejected": 3}),
          json.dumps({"chosen": good + "hello", "rejected": "\n\nHuman: hi\n\nHuman: and you?"}),
          "x" * (MAX_LINE_BYTES + 10),
          json.dumps({"chosen": good + "fine", "rejected": good + "no"})]  # fmt: skip
    put(rm_data.HH_RLHF, "\n".join(hh) + "\n")
    panda = {"idx": 1, "instruction": "Say it", "input": "", "response1": "yes", "response2": False,
             "annotator1": 1, "annotator2": 1, "annotator3": 2}  # fmt: skip
    put(rm_data.PANDALM, [panda, {"idx": 2, "instruction": "x"}, {**panda, "idx": 3, "response1": ["a"]}])
    return root


def test_bad_records_are_skipped_counted_and_located(tmp_path, capsys):
    data = _hostile_data(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["ratings", "--data-dir", str(data), "--out", str(out / "r.jsonl")]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "r.jsonl").read_text().splitlines()]
    # one good record per source: chat, d2t (one of each file), qags x2, xstest x2
    assert len(rows) == 1 + 2 + 2 + 2 and all(r["response"].strip() for r in rows)
    dropped = printed.split("dropped by reason ")[1]
    assert "'bad_record': \"6 (first: " in dropped and "topical_chat.json record 1: KeyError" in dropped
    assert "'unknown_label': \"2 (first: " in dropped and "gpt4.csv:3: final_label 'maybe'" in dropped
    assert all(SCALES[k][0] <= v <= SCALES[k][1] for r in rows for k, v in r.items() if k in SCALES)
    assert (
        main(["pairs", "--source", "hh-rlhf,pandalm", "--data-dir", str(data), "--out", str(out / "p.jsonl")])
        == 0
    )
    printed = capsys.readouterr().out
    pairs = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    assert {(p["chosen"], p["rejected"], p["source"]) for p in pairs} == {
        ("hello", "go away", "hh:1"),
        ("fine", "no", "hh:7"),  # after the over-long line 6, read to its end
        ("yes", "False", "pandalm:1"),
    }
    assert "test.jsonl.gz:2: not valid JSON" in printed and "'line_too_long': '1 (first: " in printed
    assert "'not_assistant_turn': '1 (first: " in printed  # a rejected side that ends with the user's turn
    assert re.search(
        r"'hh-harmless': \{'bad_record': .3 \(first: ", printed
    )  # lines 2-4: not JSON, no rejected, 3
    assert "testset-v1.json record 1: KeyError" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["pairs", "--max-pairs", "-3"], "--max-pairs: must be a positive count"),
        (["pairs", "--source", "hh-rlhf,hh-rlhf"], "name each of hh-rlhf, pandalm once"),
        (["pairs", "--source", ","], "name each of hh-rlhf, pandalm once"),
        (["ratings", "--max-rows", "0"], "--max-rows: must be a positive count"),
        (["ratings", "--scales", "OUT"], "are the same file"),
        (["ratings", "--out", "DATA/r.jsonl"], "is inside --data-dir"),
    ],
)
def test_bad_options_are_refused_naming_the_option(tmp_path, capsys, args, message):
    data = _hostile_data(tmp_path / "data")
    out = str(tmp_path / "out" / "r.jsonl")
    args = [a.replace("OUT", out).replace("DATA", str(data)) for a in args]
    argv = [*args, "--data-dir", str(data)] + ([] if "--out" in args else ["--out", out])
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (data / "r.jsonl").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_writes_replace_the_file_and_never_follow_a_stale_temp_link(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    out = tmp_path / "p.jsonl"
    (tmp_path / "p.jsonl.tmp").symlink_to(target)  # the old fixed temp name, pointing outside
    _write_jsonl(out, [{"a": 1}])
    assert out.read_text() == '{"a": 1}\n' and target.read_text() == "keep"
    assert out.stat().st_mode & 0o044 == 0o044 & ~_umask()  # readable as open() would leave it, not 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "p.jsonl", "p.jsonl.tmp"]


def test_bench_uses_the_installed_converter():
    import bench.rm_data
    import troupe.cluster.data.rm_data as installed

    assert (
        bench.rm_data.ratings_rows is installed.ratings_rows and bench.rm_data.hh_pairs is installed.hh_pairs
    )
    assert set(SCALES) == OBJECTIVES
