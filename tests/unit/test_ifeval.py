"""IFEval instruction checkers (actors/reward/ifeval_checks.py) and the `ifeval` / `instructions` objectives."""

import json
from pathlib import Path

import pytest
import torch

from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.ifeval import IFEval, Instructions
from troupe.actors.reward.ifeval_checks import CHECKS, build_check, count_sentences, count_words
from troupe.actors.reward.shard import RewardShard, ShardSpec

IFEVAL_DATA = Path("/work/shared/data/IFEval/data/input_data.jsonl")

# (instruction id, kwargs, a reply that follows it, a reply that does not)
CASES = [
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "one two three four",
        "a b c d e",
    ),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "don't stop", "just two"),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "Dr. Who is here.",
        "Hi. Bye.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "at least"},
        "A! B? C. D",
        "Pi is 3.14. Yes.",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First.\n***\nSecond.\n***\n",
        "One\n***\n\n***\nTwo",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        'Hello.\n\n"Then, bye.',
        "Hello.\n\nSo then bye.",
    ),
    (
        "keywords:existence",
        {"keywords": ["moon", "Tide"]},
        "The MOON pulls the tides.",
        "The moon is bright.",
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "at least"},
        "Cat and cat.",
        "One cat.",
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "less than"},
        "One cat.",
        "cat cat",
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["bad", "evil"]},
        "A badger is good.",
        "Not BAD at all.",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
        "Zoo zone",
        "zoo",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "a", "let_frequency": 2, "let_relation": "less than"},
        "a dog",
        "A cat",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "#", "let_frequency": 2, "let_relation": "at least"},
        "#a #b",
        "#a b",
    ),
    ("change_case:english_lowercase", {}, "all lower case, 42 times.", "Not all lower."),
    (
        "change_case:english_lowercase",
        {},
        "all lower case",
        "\u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    ),
    ("change_case:english_capital", {}, "ALL CAPS HERE!", "ALL CAPS But one"),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "The AI and NLP fields.",
        "The AI field.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "less than"},
        "Only AI here.",
        "WELL-KNOWN NASA.",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "Intro\n* one\n  - two\n**bold** line",
        "* one\n* two\n* three",
    ),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "*one* and **two**",
        "*one* and * *",
    ),
    ("detectable_format:title", {}, "<<My Poem>>\nRoses...", "<< >> no title"),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', 'Here: {"a": 1}'),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nfoo\nSECTION 2\nbar",
        "SECTION 1\nfoo\nSection 2\nbar",
    ),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "My answer is perhaps."),
    ("punctuation:no_comma", {}, "No commas here.", "Well, here is one."),
    ("startend:end_checker", {"end_phrase": "Peace!"}, 'Go now. peace!"  ', "Peace! Go now."),
    ("startend:quotation", {}, ' "Quoted reply." ', '"Half quoted.'),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Hi.\n\n**P. S.** See you.",
        "Hi. P.P.S late",
    ),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S extra", "Hi.\nP.S. only"),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "[name] at [address]",
        "[name] and []",
    ),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a poem."},
        "write a poem. Roses...",
        "Sure! Write a poem.",
    ),
    ("combination:two_responses", {}, "First.\n******\nSecond.", "Same.\n******\nSame."),
]


@pytest.mark.parametrize("instruction_id, kwargs, follows, breaks", CASES)
def test_checker_verdicts(instruction_id, kwargs, follows, breaks):
    check = build_check(instruction_id, kwargs)
    assert check(follows) is True
    assert check(breaks) is False


def test_every_supported_id_has_a_hand_case():
    assert {c[0] for c in CASES} == set(CHECKS)


def test_counters():
    assert count_words("Don't stop-me now, 3.5!") == 7  # Don t stop me now 3 5: runs of word characters
    assert count_sentences("Mr. Smith met e.g. Dr. Jones. Then? They left...  Done") == 4
    assert count_sentences("") == 0 and count_sentences("no end mark") == 1


@pytest.mark.parametrize(
    "instruction_id, kwargs, match",
    [
        ("punctuation:no_commas", {}, "'punctuation:no_commas' is not supported"),
        ("length_constraints:number_words", {"num_words": 5}, "missing kwarg.*'relation'"),
        (
            "length_constraints:number_words",
            {"num_words": 5, "relation": "at most"},
            "'relation' must be one of",
        ),
        (
            "length_constraints:number_words",
            {"num_words": "5", "relation": "at least"},
            "'num_words' must be",
        ),
        ("punctuation:no_comma", {"num_words": 5}, "unexpected kwarg.*'num_words'"),
        (
            "keywords:letter_frequency",
            {"letter": "ab", "let_frequency": 1, "let_relation": "at least"},
            "'letter'",
        ),
        ("keywords:existence", {"keywords": []}, "'keywords' must be a non-empty list"),
    ],
)
def test_bad_instructions_are_named(instruction_id, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_check(instruction_id, kwargs)


def test_null_kwargs_are_padding():
    check = build_check("punctuation:no_comma", {"num_words": None, "relation": None})
    assert check("fine") and not check("a, b")


def _rollout(text: str, meta: dict | None = None, uid: str = "p0") -> Rollout:
    encoded = tuple((k, json.dumps(v)) for k, v in (meta or {}).items())
    prompt = Prompt(uid, (1,), "q", "", encoded)
    return Rollout(prompt, 0, (1, 2), text, torch.zeros(2), 0, "stop", 1.0)


def test_ifeval_objective_scores_the_share_followed_and_skips_unsupported():
    meta = {
        "instruction_id_list": [
            "punctuation:no_comma",
            "language:response_language",
            "detectable_format:title",
        ],
        "kwargs": [{}, {"language": "de"}, {}],
    }
    objective = IFEval()
    values = objective.score(
        [_rollout("<<T>> no commas", meta), _rollout("<<T>>, comma", meta), _rollout("x, y", meta)]
    )
    assert values.tolist() == [1.0, 0.5, 0.0]
    assert objective.unsupported == {"language:response_language": 3}

    only_unsupported = {"instruction_id_list": ["language:response_language"], "kwargs": [{"language": "de"}]}
    assert objective.score([_rollout("Hallo", only_unsupported)]).tolist() == [0.0]
    assert objective.unscorable == 1


def test_ifeval_objective_names_the_prompt_on_bad_metadata():
    with pytest.raises(ValueError, match="prompt p7 has no instruction_id_list"):
        IFEval().score([_rollout("hi", uid="p7")])
    with pytest.raises(ValueError, match="prompt p7 needs a 'kwargs' list aligned"):
        IFEval().score([_rollout("hi", {"instruction_id_list": ["punctuation:no_comma"]}, uid="p7")])
    bad = {"instruction_id_list": ["detectable_format:title"], "kwargs": [{"num_words": 3}]}
    with pytest.raises(ValueError, match="prompt p7: instruction 'detectable_format:title': unexpected"):
        IFEval().score([_rollout("hi", bad, uid="p7")])


def test_instructions_objective_through_a_shard():
    checks = [
        {"id": "length_constraints:number_words", "relation": "less than", "num_words": 4},
        {"id": "punctuation:no_comma"},
    ]
    shard = RewardShard(ShardSpec({"instructions": {"checks": checks}}))
    out = shard.score(
        [_rollout("short reply"), _rollout("short, reply"), _rollout("a long, long reply here")]
    )
    assert out["instructions"].tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match=r"checks\[1\]: instruction 'punctuation:no_comma': unexpected"):
        Instructions([checks[0], {"id": "punctuation:no_comma", "num_words": 3}])
    with pytest.raises(ValueError, match=r"checks\[0\] needs an 'id'"):
        Instructions([{"num_words": 3}])
    with pytest.raises(ValueError, match="non-empty list"):
        Instructions([])


def test_real_ifeval_rows_build(capsys):
    if not IFEVAL_DATA.exists():
        pytest.skip(f"IFEval input data not found at {IFEVAL_DATA}")
    rows = [json.loads(line) for line in IFEVAL_DATA.open()]
    fully = 0
    for row in rows:
        supported = [
            (i, kw) for i, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True) if i in CHECKS
        ]
        checks = [build_check(i, kw) for i, kw in supported]  # raises, naming the id, on bad kwargs
        assert all(isinstance(c(row["prompt"]), bool) for c in checks)
        fully += len(supported) == len(row["instruction_id_list"])
    share = fully / len(rows)
    with capsys.disabled():
        print(f"\nIFEval: {fully}/{len(rows)} rows fully supported ({share:.1%})")
    assert len(rows) > 500 and share > 0.9


def test_instructions_accept_config_containers():
    from omegaconf import OmegaConf

    # Checks written in YAML arrive as OmegaConf containers, not plain lists and dicts.
    checks = OmegaConf.create(
        [{"id": "keywords:existence", "keywords": ["moon"]}, {"id": "startend:quotation"}]
    )
    values = Instructions(checks).score([_rollout('"The moon."'), _rollout("The sun.")])
    assert values.tolist() == [1.0, 0.0]
