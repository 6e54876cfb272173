"""Every loader (prompts, preference pairs, ratings) reads rows through `records`: a bad row is a counted skip
logged with file:line and the field, the good rows are kept; a bad file (truncated .gz, malformed .json) is an
error naming the file. A bad bundle.json names the file and the key."""

import gzip
import json
import logging
import math
import os

import pytest

from tests.unit.tiny_models import llama3_style_tokenizer
from troupe.actors.reward.bundle import read_info
from troupe.cluster.config.schema import DataConfig
from troupe.cluster.data.preferences import load_preferences
from troupe.cluster.data.prompts import PromptEncoder, load_prompt_set
from troupe.cluster.data.ratings import load_ratings

GOOD = {
    "pairs": {"prompt": "q", "chosen": "yes", "rejected": "no"},
    "ratings": {"prompt": "q", "response": "an answer", "h": 3},
    "prompts": {"prompt": "What is 2+2?", "answer": "4"},
}


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_style_tokenizer()


def load(kind, path, tokenizer=None):
    """(rows kept, skipped counter) from the loader of `kind`."""
    if kind == "pairs":
        prefs, skipped = load_preferences(path)
        return len(prefs), skipped
    if kind == "ratings":
        ratings = load_ratings(str(path), {"h": (0, 4)})
        return len(ratings.responses), ratings.skipped
    encoder = PromptEncoder(DataConfig(answer_key="answer"), tokenizer, 10_000)
    got = load_prompt_set(str(path), "train", encoder)
    return len(got.prompts), got.skipped


def line(row) -> bytes:
    return (row if isinstance(row, str) else json.dumps(row)).encode() + b"\n"


def between_good_rows(path, kind, middle: bytes):
    """Good row, `middle`, good row: the bad one is line 2."""
    path.write_bytes(line(GOOD[kind]) + middle + line(GOOD[kind]))
    return path


KINDS = ["pairs", "ratings", "prompts"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_utf8_bom_keeps_row_one(tmp_path, kind, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line(GOOD[kind]) + line(GOOD[kind]))
    assert load(kind, path, tokenizer) == (2, {})


@pytest.mark.parametrize("kind", KINDS)
def test_an_invalid_byte_skips_only_its_line(tmp_path, kind, tokenizer, caplog):
    bad = line(GOOD[kind]).replace(b'"q"', b'"\xff"').replace(b"2+2", b"\xff")
    path = between_good_rows(tmp_path / "bytes.jsonl", kind, bad)
    with caplog.at_level(logging.WARNING, logger="troupe.data"):
        assert load(kind, path, tokenizer) == (2, {"invalid_utf8": 1})
    assert f"{path}:2: invalid_utf8: not UTF-8 at byte" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "middle, reason",
    [(b"{oops\n", "malformed_json"), (b"[1, 2]\n", "not_an_object"), (b'"text"\n', "not_an_object")],
)
def test_a_line_that_is_not_a_json_object_is_counted(tmp_path, kind, middle, reason, tokenizer, caplog):
    path = between_good_rows(tmp_path / "rows.jsonl", kind, middle)
    with caplog.at_level(logging.WARNING, logger="troupe.data"):
        assert load(kind, path, tokenizer) == (2, {reason: 1})
    assert f"{path}:2: {reason}" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_a_truncated_gz_names_the_file_and_the_last_line_read(tmp_path, kind, tokenizer):
    whole = gzip.compress(b"".join(line({**GOOD[kind], "n": i}) for i in range(3000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: truncated or corrupt gzip file after line \d+"):
        load(kind, path, tokenizer)


def test_a_file_that_is_not_gzip_names_the_file(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(line(GOOD["pairs"]))
    with pytest.raises(ValueError, match=r"plain\.jsonl\.gz: truncated or corrupt gzip file after line 0"):
        load_preferences(path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_malformed_json_file_names_file_line_and_column(tmp_path, kind, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(f"[\n{json.dumps(GOOD[kind])},\n]\n")  # a trailing comma
    with pytest.raises(ValueError, match=r"rows\.json:3: not valid JSON \(Expecting value at column 1\)"):
        load(kind, path, tokenizer)


def test_a_json_file_with_a_bom_loads_and_a_bad_item_is_counted(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD["pairs"], 7, GOOD["pairs"]]).encode())
    assert load("pairs", path) == (2, {"not_an_object": 1})
    gz = tmp_path / "rows.json.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf[" + b"\xff" + b"]"))
    with pytest.raises(ValueError, match=r"rows\.json\.gz: not UTF-8 at byte 2"):
        load("pairs", gz)


USER = {"role": "user", "content": "q"}


def said(text):
    return {"role": "assistant", "content": text}


PAIR_SHAPES = {
    "rejected missing": ({"prompt": "q", "chosen": "a"}, "missing_key", "no field 'rejected'"),
    "chosen null": ({"prompt": "q", "chosen": None, "rejected": "b"}, "missing_key", "'chosen' is null"),
    "chosen a number": ({"prompt": "q", "chosen": 5, "rejected": "b"}, "bad_response", "'chosen' holds int"),
    "rejected an object": ({"prompt": "q", "chosen": "a", "rejected": {"t": "b"}}, "bad_response", "'rejected' holds dict"),
    "text against messages": ({"prompt": "q", "chosen": "a", "rejected": [USER, said("b")]}, "bad_response", "differ in shape"),
    "a message that is not an object": ({"chosen": [USER, "a"], "rejected": [USER, said("b")]}, "bad_response", "'chosen'[1] holds str"),
    "an unknown role": ({"chosen": [{"role": "human", "content": "q"}, said("a")], "rejected": [USER, said("b")]}, "bad_response", "'chosen'[0] has role 'human'"),
    "content not text": ({"chosen": [USER, said(1)], "rejected": [USER, said(2)]}, "bad_response", "'chosen'[1] content holds int"),
    "rejected ends with the user": ({"chosen": [USER, said("a")], "rejected": [USER, USER]}, "not_assistant_turn", "'rejected' ends with a user turn"),
    "transcript ends with the user": ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nHuman: b"}, "not_assistant_turn", "'rejected' ends with a user turn"),
    "transcript on one side": ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "plain"}, "bad_response", "'rejected' is an hh-rlhf transcript on one side only"),
    "conversations differ": ({"chosen": [USER, said("a")], "rejected": [{"role": "user", "content": "other"}, said("b")]}, "conversations_differ", "differ before the last turn"),
    "identical responses": ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_responses", "the same text"),
    "empty chosen": ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty_response", "'chosen' is empty"),
    "empty prompt": ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_prompt", "'prompt' has no non-empty user turn"),
    "prompt a number": ({"prompt": 5, "chosen": "a", "rejected": "b"}, "bad_prompt", "'prompt' holds int"),
    "prompt an object": ({"prompt": {"x": 1}, "chosen": "a", "rejected": "b"}, "bad_prompt", "'prompt' holds dict"),
    "prompt null": ({"prompt": None, "chosen": "a", "rejected": "b"}, "missing_key", "'prompt' is null"),
    "no prompt before the turn": ({"chosen": [said("a")], "rejected": [said("b")]}, "empty_prompt", "no non-empty user turn"),
}  # fmt: skip


@pytest.mark.parametrize("shape", PAIR_SHAPES)
def test_a_malformed_pair_is_counted_naming_line_and_field(tmp_path, shape, caplog):
    record, reason, field_said = PAIR_SHAPES[shape]
    path = between_good_rows(tmp_path / "pairs.jsonl", "pairs", line(record))
    with caplog.at_level(logging.WARNING, logger="troupe.data"):
        prefs, skipped = load_preferences(path)
    assert [p.source for p in prefs] == [f"{path}:1", f"{path}:3"]
    assert skipped == {reason: 1}
    assert f"{path}:2: {reason}: " in caplog.text and field_said in caplog.text


RATING_SHAPES = {
    "N/A": ({"h": "N/A"}, "bad_rating", "rating 'h' is 'N/A', not a number"),
    "a word": ({"h": "high"}, "bad_rating", "rating 'h' is 'high'"),
    "a boolean": ({"h": True}, "bad_rating", "rating 'h' holds bool"),
    "a list": ({"h": [1]}, "bad_rating", "rating 'h' holds list"),
    "NaN": ({"h": math.nan}, "bad_rating", "rating 'h' is NaN"),
    "out of scale": ({"h": 9}, "out_of_scale", "rating 'h' 9 is outside its scale [0, 4]"),
    "infinite": ({"h": "inf"}, "out_of_scale", "rating 'h' 'inf' is outside"),
    "null response": ({"response": None}, "missing_key", "'response' is null"),
    "response a list": ({"response": ["a"]}, "bad_response", "'response' holds list"),
    "empty response": ({"response": " "}, "empty_response", "'response' is empty"),
    "no prompt": ({"prompt": None}, "missing_key", "'prompt' is null"),
    "prompt a number": ({"prompt": 3}, "bad_prompt", "'prompt' holds int"),
    "no rating at all": ({"h": None}, "no_rating", "no rating for any of h"),
}


@pytest.mark.parametrize("shape", RATING_SHAPES)
def test_a_malformed_rating_is_counted_naming_line_and_field(tmp_path, shape, caplog):
    change, reason, field_said = RATING_SHAPES[shape]
    path = between_good_rows(tmp_path / "r.jsonl", "ratings", line({**GOOD["ratings"], **change}))
    with caplog.at_level(logging.WARNING, logger="troupe.data"):
        ratings = load_ratings(str(path), {"h": (0, 4)})
    assert ratings.sources == [f"{path}:1", f"{path}:3"] and ratings.responses == ["an answer"] * 2
    assert ratings.skipped == {reason: 1}
    assert f"{path}:2: {reason}: " in caplog.text and field_said in caplog.text


def test_a_null_rating_is_that_objective_missing_and_a_numeric_string_counts(tmp_path):
    rows = [
        {"prompt": "q", "response": "r", "h": None, "v": 2},
        {"prompt": "q", "response": "s", "h": "3", "v": 1},
    ]
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"".join(line(r) for r in rows))
    ratings = load_ratings(str(path), {"h": (0, 4), "v": (0, 4)})
    assert ratings.skipped == {}
    assert math.isnan(ratings.labels[0, 0]) and ratings.labels[1, 0] == 0.75


@pytest.mark.parametrize("answer, reference", [(42, "42"), (4.5, "4.5"), (" 7 ", "7")])
def test_a_numeric_answer_is_kept_as_its_text(tmp_path, answer, reference, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_bytes(line({"prompt": "q", "answer": answer}))
    encoder = PromptEncoder(DataConfig(answer_key="answer"), tokenizer, 10_000)
    assert [p.reference for p in load_prompt_set(str(path), "train", encoder).prompts] == [reference]


@pytest.mark.parametrize(
    "answer, reason, field_said",
    [
        ([4], "bad_answer", "data.answer_key='answer' holds list"),
        ({"value": 4}, "bad_answer", "data.answer_key='answer' holds dict"),
        (True, "bad_answer", "data.answer_key='answer' holds bool"),
        (None, "missing_key", "field 'answer' (data.answer_key) is null"),
    ],
)
def test_an_answer_that_is_not_text_is_counted(tmp_path, answer, reason, field_said, tokenizer, caplog):
    path = between_good_rows(tmp_path / "p.jsonl", "prompts", line({"prompt": "q", "answer": answer}))
    with caplog.at_level(logging.WARNING, logger="troupe.data"):
        assert load("prompts", path, tokenizer) == (2, {reason: 1})
    assert f"{path}:2: {reason}: {field_said}" in caplog.text


BUNDLES = {
    "malformed JSON": ('{"name": "x",', r"bundle\.json: not a valid bundle description \(Expecting"),
    "not an object": ("[1]", r"bundle\.json: must hold a JSON object, got list"),
    "missing key": ('{"name": "x"}', r"bundle\.json: missing key 'backbone'"),
    "unknown key": ('{"name": "x", "backbone": "b", "heads": 2}', r"bundle\.json: unknown key\(s\) \['heads'\]"),
    "wrong type": ('{"name": "x", "backbone": "b", "max_length": "512"}', r"bundle\.json: 'max_length' must be int, got str"),
    "a boolean length": ('{"name": "x", "backbone": "b", "max_length": true}', r"'max_length' must be int, got bool"),
    "objectives not a list": ('{"name": "x", "backbone": "b", "objectives": "a,b"}', r"'objectives' must be list"),
    "null name": ('{"name": null, "backbone": "b"}', r"bundle\.json: 'name' must be str, got NoneType"),
}  # fmt: skip


@pytest.mark.parametrize("case", BUNDLES)
def test_a_bad_bundle_json_names_the_file_and_key(tmp_path, case):
    text, message = BUNDLES[case]
    (tmp_path / "bundle.json").write_text(text)
    with pytest.raises(ValueError, match=message) as raised:
        read_info(tmp_path)
    assert str(tmp_path / "bundle.json") in str(raised.value)


def test_a_good_bundle_json_reads(tmp_path):
    (tmp_path / "bundle.json").write_text(
        '{"name": "x", "backbone": "b", "verbosity": null, "objectives": ["a"]}'
    )
    info = read_info(tmp_path)
    assert (info.name, info.objectives, info.verbosity, info.max_length) == ("x", ["a"], None, 512)


def test_a_launch_hashes_its_data_once_and_a_changed_file_again(tmp_path):
    from troupe.cluster.data.records import _hash_files, content_sha256

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "a"}\n')
    first = content_sha256(str(data))
    hits = _hash_files.cache_info().hits
    assert content_sha256(str(data)) == first and _hash_files.cache_info().hits == hits + 1
    data.write_text('{"prompt": "b"}\n')  # same size, new content and mtime
    os.utime(data, ns=(1, 1))
    assert content_sha256(str(data)) != first
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text("x\n")
    (folder / "b.jsonl").write_text("y\n")
    assert content_sha256(str(folder)) != content_sha256(str(folder / "a.jsonl"))
