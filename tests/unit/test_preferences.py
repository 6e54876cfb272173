"""Preference files: plain, chat and hh-rlhf shapes; bad rows give an error naming file and line, or a count."""

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from troupe.cluster.data.preferences import load_preferences, parse_transcript, to_preference
from troupe.cluster.data.records import SkipRow

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_chat_and_transcript_records(tmp_path):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
        },
        {
            "chosen": "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant: yes",
            "rejected": "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant: no",
        },
        {"prompt": "x", "chosen": "  ", "rejected": "y"},  # empty response: skipped, counted
    ]
    prefs, skipped = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.chosen for p in prefs] == ["4", "hello", "yes"]
    assert prefs[0].prompt == [{"role": "user", "content": "2+2?"}]
    assert prefs[1].prompt == [{"role": "user", "content": "hi"}]
    assert [m["role"] for m in prefs[2].prompt] == ["user", "assistant", "user"]
    assert prefs[2].rejected == "no"
    assert skipped == {"empty_response": 1}
    pq = tmp_path / "p.parquet"
    pd.DataFrame([rows[0]]).to_parquet(pq)
    assert load_preferences(pq)[0][0].chosen == "4"


def test_every_record_is_kept_or_counted(tmp_path):
    rows = [
        {"prompt": "a", "chosen": "same", "rejected": "same"},  # identical responses
        {"prompt": "b", "chosen": "yes", "rejected": "no"},
        {"prompt": "c", "chosen": "", "rejected": "no"},  # empty response
        {"prompt": "d", "chosen": "yes", "rejected": "no"},
        {"prompt": "e", "chosen": "yes", "rejected": "no"},  # past max_pairs
        {"prompt": "f", "chosen": "same", "rejected": "same"},  # past max_pairs too (not parsed)
    ]
    prefs, skipped = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), max_pairs=2)
    assert [p.prompt[0]["content"] for p in prefs] == ["b", "d"]
    assert skipped == {"identical_responses": 1, "empty_response": 1, "over_max_pairs": 2}
    assert len(prefs) + sum(skipped.values()) == len(rows)


def test_bad_records_are_counted_and_logged_with_file_and_line(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    with caplog.at_level(logging.WARNING, logger="troupe.data"):
        assert load_preferences(path)[1] == {"missing_key": 1}
        assert load_preferences(broken)[1] == {"malformed_json": 1}
    assert "bad.jsonl:2: missing_key: no field 'rejected'" in caplog.text
    assert "broken.jsonl:2: malformed_json: not valid JSON" in caplog.text
    chat = {
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "rejected": [{"role": "user", "content": "DIFFERENT"}, {"role": "assistant", "content": "c"}],
    }
    with pytest.raises(SkipRow, match="conversations_differ"):
        to_preference(chat, "f:1", "prompt", "chosen", "rejected")
    with pytest.raises(FileNotFoundError):
        load_preferences(tmp_path / "missing.jsonl")


def test_transcript_parser():
    msgs = parse_transcript("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye")
    assert msgs == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]


def test_real_hh_rlhf_file_loads():
    path = DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} absent: ../shared/data is not beside the checkout")
    prefs, skipped = load_preferences(path)
    with gzip.open(path, "rt") as f:
        total = sum(1 for line in f if line.strip())
    assert len(prefs) + sum(skipped.values()) == total  # every record is either loaded or counted
    assert len(prefs) > 2000
    assert all(p.prompt and p.prompt[-1]["role"] == "user" for p in prefs)
