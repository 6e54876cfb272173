"""bench/real_data.py: a fixed dev split, the documented GSM8K subset rules, and reading each evaluation mode."""

import argparse
import json

import pytest

from bench.real_data import (
    before_after,
    carve,
    gsm8k_rules,
    one_operation,
    solution_ops,
    solution_steps,
    source_rows,
    subset_rule,
    table,
)

TWO_STEPS = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


def test_solution_steps_counts_the_lines_before_the_answer():
    assert solution_steps(TWO_STEPS) == 2
    assert solution_steps("One line: 2+2 = <<2+2=4>>4.\n#### 4") == 1
    assert solution_steps("a\nb\nc\nd\n#### 1") == 4


def _source(tmp_path, steps_per_row):
    rows = [
        {"question": f"q{i}", "answer": "\n".join(["step"] * s) + f"\n#### {i}"}
        for i, s in enumerate(steps_per_row)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_dev_split_is_fixed_and_disjoint_from_train(tmp_path):
    source = _source(tmp_path, [2, 3] * 10)
    train, dev = carve(source, 5, tmp_path / "a")
    again_train, again_dev = carve(source, 5, tmp_path / "b")
    assert _read(dev) == _read(again_dev) and _read(train) == _read(again_train)
    dev_lines = {r["source_line"] for r in _read(dev)}
    train_lines = {r["source_line"] for r in _read(train)}
    assert len(dev_lines) == 5 and not dev_lines & train_lines and len(dev_lines | train_lines) == 20


def test_max_steps_keeps_only_short_solutions_in_both_splits(tmp_path):
    steps = [2, 3, 4, 2, 5, 2, 3, 2, 6, 2]
    keeps, name = subset_rule(2, None)
    train, dev = carve(_source(tmp_path, steps), 2, tmp_path / "sub", keeps=keeps)
    assert name == "-max2steps"
    rows = _read(train) + _read(dev)
    assert len(rows) == steps.count(2) and len(_read(dev)) == 2
    assert all(solution_steps(r["answer"]) <= 2 for r in rows)
    assert {r["source_line"] for r in rows} == {i + 1 for i, s in enumerate(steps) if s <= 2}


def test_the_operator_rule_reads_the_calculator_annotations():
    assert solution_ops(TWO_STEPS) == {"/", "+"}
    assert solution_ops("3 x 4 = <<3x4=12>>12\n#### 12") == {"*"}
    assert solution_ops("46 bags weigh 46*7kg = <<322=322>>322kg\n#### 322") == {"*"}  # written outside <<>>
    assert solution_ops("a 5-year-old had $10 - $4 = $<<10-4=6>>6\n#### 6") == {"-"}
    keeps, name = subset_rule(2, "+-")
    assert name == "-max2steps-ops+-"
    assert keeps({"answer": "a <<5+3=8>>8\nb <<8-2=6>>6\n#### 6"})
    assert not keeps({"answer": TWO_STEPS})  # a division
    assert not keeps({"answer": "a <<1+1=2>>2\nb <<2+1=3>>3\nc <<3+1=4>>4\n#### 4"})  # 3 steps
    assert not keeps({"answer": "no annotation\nat all\n#### 4"})  # nothing to check the operators by
    assert subset_rule(None, None)[1] == ""


def test_the_one_operation_rule_finds_answers_one_calculation_from_the_question():
    natalia = {
        "question": "Natalia sold clips to 48 of her friends in April, and half as many in May.",
        "answer": TWO_STEPS,
    }
    assert not one_operation(natalia)  # 72 = 48 + 48 / 2: two calculations
    assert one_operation({"question": "Tom has 1,200 apples and eats 300.", "answer": "...\n#### 900"})
    assert one_operation({"question": "7 boxes of 12 eggs", "answer": "x\ny\n#### 84"})
    assert one_operation({"question": "Share 2.5 pies among 5 people.", "answer": "#### 0.5"})
    assert not one_operation(
        {"question": "Share 5 pies among 0 people.", "answer": "#### 3"}
    )  # 5 / 0 is no error
    keeps, name = subset_rule(None, None, one_op=True)
    assert name == "-oneop" and keeps({"question": "7 boxes of 12 eggs", "answer": "#### 84"})
    assert not subset_rule(2, None, one_op=True)[0](
        {"question": "7 boxes of 12 eggs", "answer": "a\nb\nc\n#### 84"}
    )


def test_before_after_reads_the_greedy_and_the_sampled_evaluation_apart():
    rows = [
        {"iteration": -1, "eval/greedy/accuracy": 0.1, "eval/sampled/accuracy": 0.2},
        {"iteration": 0, "reward/mean": 0.5},
        {
            "iteration": 1,
            "eval/greedy/accuracy": 0.3,
            "eval/sampled/accuracy": 0.5,
            "eval/sampled/env/turns": 2.0,
        },
    ]
    assert before_after(rows) == ({"accuracy": 0.1}, {"accuracy": 0.3})
    assert before_after(rows, "sampled") == (
        {"accuracy": 0.2},
        {"accuracy": 0.5, "env/turns": 2.0},
    )
    with pytest.raises(RuntimeError, match="sampled evaluation before the first"):
        before_after([rows[0] | {"iteration": 0}, rows[2]], "sampled")
    seeds = {
        str(seed): {
            "before": {"accuracy": 0.1},
            "after": {"accuracy": 0.3},
            "sampled": {
                "before": {"accuracy": 0.2, "env/turns": 1.5},
                "after": {"accuracy": a, "env/turns": 2.0},
            },
            "samples": 32,
            "wall_s": 10.0,
        }
        for seed, a in ((0, 0.4), (1, 0.6))
    }
    sampled = table("gsm8k", {"seeds": seeds}, "gsm8k-tools", "sampled")
    assert "| gsm8k-tools (sampled, held-out)" in sampled
    assert "| accuracy | 0.200 ± 0.000 | 0.500 ± 0.141 | 0.300 ± 0.141 | 0.400, 0.600 |" in sampled
    assert "| env/turns |" in sampled
    assert "| accuracy | 0.100 ± 0.000 | 0.300 ± 0.000 |" in table("gsm8k", {"seeds": seeds}, "gsm8k")


def _flags(**given):
    flags = dict(max_steps=None, ops=None, one_op=False, tools=False, solvable=0, overrides=[])
    return argparse.Namespace(**{**flags, **given})


def test_gsm8k_rules_combine_the_step_bound_with_the_pass_rate_rule(tmp_path, monkeypatch):
    source = _source(tmp_path, [1, 3, 2, 2, 1])  # source lines 1-5
    sampled = {}

    def pass_counts(pool, config, overrides, k, cache):  # stands in for vLLM sampling of the base policy
        sampled.update(pool=[r["source_line"] for r in pool], config=config, k=k, cache=cache)
        return {1: 0, 2: 3, 3: 2, 4: 0, 5: 1}  # line 2 (3 steps): as from a cache of a wider pool

    monkeypatch.setattr("bench.real_data.pass_counts", pass_counts)
    config, keeps = gsm8k_rules(_flags(max_steps=2, solvable=4), source, tmp_path / "data")
    rows = source_rows(source)
    assert config == "gsm8k"
    assert sampled == {
        "pool": [1, 3, 4, 5],
        "config": "gsm8k",
        "k": 4,
        "cache": tmp_path / "data" / "passes.json",
    }
    assert [r["source_line"] for r in rows if keeps(r)] == [3, 5]  # at most 2 steps and solved at least once


def test_gsm8k_rules_without_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.real_data.pass_counts", lambda *a: pytest.fail("sampled without --solvable"))
    source = _source(tmp_path, [1, 3])
    config, keeps = gsm8k_rules(_flags(tools=True), source, tmp_path / "data")
    assert config == "gsm8k_tools" and all(map(keeps, _read(source)))
    config, keeps = gsm8k_rules(_flags(max_steps=2), source, tmp_path / "data")
    assert config == "gsm8k" and [keeps(r) for r in _read(source)] == [True, False]
