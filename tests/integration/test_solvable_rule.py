"""bench/solvable.py's pass-rate rule with a real vLLM engine (the tiny model, in a child process): one count of
right answers out of k per problem, keyed by source line, cached for the same pool and settings only."""

import json

import pytest

from bench.solvable import pass_counts, solvable_rule
from bench.troupe_run import SMOKE_OVERRIDES

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
    again = pass_counts(POOL, "gsm8k", SMOKE_OVERRIDES, 3, cache)  # another k: sampled anew
    assert sorted(again) == [5, 6, 7] and all(0 <= n <= 3 for n in again.values())
    assert json.loads(cache.read_text())["key"]["k"] == 3


def test_the_rule_keeps_problems_solved_at_least_once():
    keeps = solvable_rule({5: 2, 6: 0, 7: 1})
    assert [keeps(r) for r in POOL] == [True, False, True]
    assert not keeps({"source_line": 99})  # never sampled: not shown to be solvable
    assert [solvable_rule({5: 2, 6: 0, 7: 1}, at_least=2)(r) for r in POOL] == [True, False, False]
