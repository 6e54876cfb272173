"""bench/solvable.py's pass-rate rule with a real vLLM engine (the tiny model, in a child process): one count of
right answers out of k per problem, keyed by source line, cached for the same pool and settings only."""

import json

import pytest

from bench.solvable import count_right, pass_counts, solvable_rule
from bench.troupe_run import SMOKE_OVERRIDES
from troupe.actors.protocol import Prompt

pytestmark = pytest.mark.integration

POOL = [
    {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}", "source_line": line}
    for line, (a, b) in enumerate(((2, 3), (10, 4), (7, 7)), start=5)
]


def test_pass_counts_samples_k_answers_per_problem_and_caches_them(tmp_path):
    cache = tmp_path / "passes.json"
    passes = pass_counts(POOL, "gsm8k", SMOKE_OVERRIDES, 2, cache)
    assert sorted(passes) == [5, 6, 7] and all(0 <= n <= 2 for n in passes.values())
    saved = json.loads(cache.read_text())
    saved["passes"] = {"5": 2, "6": 0, "7": 1}  # a cached answer is read back, not sampled again
    cache.write_text(json.dumps(saved))
    assert pass_counts(POOL, "gsm8k", SMOKE_OVERRIDES, 2, cache) == {5: 2, 6: 0, 7: 1}
    # another temperature (or any sampling setting): sampled anew
    hotter = pass_counts(POOL, "gsm8k", [*SMOKE_OVERRIDES, "generator.temperature=1.3"], 2, cache)
    assert sorted(hotter) == [5, 6, 7] and all(0 <= n <= 2 for n in hotter.values())
    assert json.loads(cache.read_text())["key"]["settings_sha256"] != saved["key"]["settings_sha256"]


def test_the_rule_keeps_problems_solved_at_least_once():
    keeps = solvable_rule({5: 2, 6: 0, 7: 1})
    assert [keeps(r) for r in POOL] == [True, False, True]
    assert not keeps({"source_line": 99})  # never sampled: not shown to be solvable


def test_replies_count_right_by_the_correctness_check():
    prompts = [Prompt(str(r["source_line"]), (1,), r["question"], r["answer"]) for r in POOL]
    replies = [
        ["2 + 3 = 5\n#### 5", "#### 6", "The answer is 5."],
        ["Answer: 14"],
        ["7 + 7 = 15", "no number"],
    ]
    assert count_right(prompts, replies) == {"5": 2, "6": 1, "7": 0}


def test_recipes_with_an_environment_are_refused(tmp_path):
    with pytest.raises(ValueError, match="one reply per problem; recipe 'gsm8k_tools' has an env.target"):
        pass_counts(POOL, "gsm8k_tools", SMOKE_OVERRIDES, 2, tmp_path / "passes.json")
