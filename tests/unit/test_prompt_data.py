"""Prompt datasets: string prompts, message lists, a system prompt, dotted keys, bad rows skipped and counted with
where they are, over-long prompts skipped, JSONL / JSON / parquet / `datasets` folders, and the data cursor."""

import json
import logging

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.unit.tiny_models import llama3_style_tokenizer
from troupe.cluster.config.compose import CONF_DIR
from troupe.cluster.config.schema import DataConfig, TaskConfig, register
from troupe.cluster.data.prompts import (
    DatasetCursor,
    PromptEncoder,
    PromptSet,
    eval_prompt_set,
    load_prompt_set,
)

register()


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_style_tokenizer()


def encoder(tokenizer, max_tokens=10_000, **data):
    return PromptEncoder(DataConfig(**data), tokenizer, max_tokens)


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_string_and_message_prompts_with_system_prompt_answer_and_meta(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"q": "What is 2+2?", "a": "4", "level": 1, "tags": ["math"]},
            {
                "q": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Name a colour."},
                    {"role": "assistant", "content": "Red."},  # a trailing answer is not part of the prompt
                ],
                "a": "blue",
                "level": 2,
                "tags": [],
            },
        ],
    )
    enc = encoder(tokenizer, prompt_key="q", answer_key="a", meta_keys=["level", "tags"], system_prompt="SYS")
    got = load_prompt_set(str(path), "train", enc)
    first, second = got.prompts
    assert first.messages == (("system", "SYS"), ("user", "What is 2+2?"))
    assert first.text == "What is 2+2?" and first.reference == "4"
    assert first.meta_value("level") == 1 and first.meta_value("tags") == ["math"]
    # the row's own system turn wins over data.system_prompt; the trailing assistant turn is dropped
    assert second.messages == (("system", "Be terse."), ("user", "Name a colour."))
    assert "Red." not in tokenizer.decode(second.token_ids)
    want = tokenizer.apply_chat_template(
        [{"role": "system", "content": "SYS"}, {"role": "user", "content": "What is 2+2?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tuple(tokenizer(want, add_special_tokens=False).input_ids) == first.token_ids
    assert got.skipped == {} and got.rows == 2


def test_bad_rows_are_skipped_counted_and_logged_with_file_and_line(tmp_path, tokenizer, caplog):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "fine", "answer": "1"},
            '{"prompt": "broken',  # line 2: malformed JSON
            {"answer": "3"},  # line 3: no prompt
            {"prompt": "   ", "answer": "4"},  # line 4: empty prompt
            {"prompt": "x " * 400, "answer": "5"},  # line 5: over max_prompt_tokens
            {"prompt": 42, "answer": "6"},  # line 6: not a prompt
            {"prompt": "also fine", "answer": "7"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="troupe.data"):
        got = load_prompt_set(str(path), "train", encoder(tokenizer, max_tokens=64, answer_key="answer"))
    assert [p.reference for p in got.prompts] == ["1", "7"]
    assert got.rows == 7
    assert got.skipped == {
        "malformed_json": 1,
        "missing_key": 1,
        "empty_prompt": 1,
        "too_long": 1,
        "bad_prompt": 1,
    }
    logged = caplog.text
    for line in (2, 3, 4, 5, 6):
        assert f"bad.jsonl:{line}" in logged
    metrics = got.metrics()
    assert metrics["data/skipped/too_long"] == 1 and metrics["data/prompts"] == 2


def test_dotted_keys_reach_into_lists_and_objects(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "mt.jsonl",
        [{"turns": ["first question", "follow-up"]}, {"turns": [{"content": "arena style"}]}],
    )
    got = load_prompt_set(str(path), "train", encoder(tokenizer, prompt_key="turns.0"))
    assert got.prompts[0].text == "first question"
    assert got.skipped == {"bad_prompt": 1}  # a dict is not a prompt: "turns.0.content" is
    got = load_prompt_set(str(path), "train", encoder(tokenizer, prompt_key="turns.0.content"))
    assert [p.text for p in got.prompts] == ["arena style"] and got.skipped == {"missing_key": 1}


def test_json_parquet_and_datasets_folder_read_the_same_prompts(tmp_path, tokenizer):
    import datasets
    import pandas as pd

    rows = [{"prompt": f"question {i}", "answer": str(i)} for i in range(5)]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "splits"))
    enc = encoder(tokenizer, answer_key="answer")
    want = [(f"question {i}", str(i)) for i in range(5)]
    for source in ("p.json", "p.parquet", "saved"):
        got = load_prompt_set(str(tmp_path / source), "train", enc)
        assert [(p.text, p.reference) for p in got.prompts] == want, source
    assert len(load_prompt_set(str(tmp_path / "splits"), "test", enc).prompts) == 5
    with pytest.raises(KeyError, match="no split 'validation'"):
        load_prompt_set(str(tmp_path / "splits"), "validation", enc)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompt_set(str(tmp_path / "missing.jsonl"), "train", enc)
    # a null in a numeric parquet column comes back from pandas as NaN: a missing answer, not the answer "nan"
    pd.DataFrame({"prompt": ["a", "b"], "answer": [1.0, None]}).to_parquet(tmp_path / "nulls.parquet")
    got = load_prompt_set(str(tmp_path / "nulls.parquet"), "train", enc)
    assert [p.reference for p in got.prompts] == ["1.0"] and got.skipped == {"missing_key": 1}


def test_a_file_with_no_usable_prompt_is_an_error_naming_it(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "none.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="none.jsonl: no usable prompts"):
        load_prompt_set(str(path), "train", encoder(tokenizer))


def _set(n, tokenizer):
    enc = encoder(tokenizer)
    return PromptSet("mem", [enc.prompt(f"p{i}", [{"role": "user", "content": f"q{i}"}]) for i in range(n)])


def test_cursor_covers_each_epoch_once_reshuffles_and_resumes_exactly(tokenizer):
    prompts = _set(10, tokenizer)
    cursor = DatasetCursor(prompts, per_batch=4, shuffle=True, seed=3)
    seen = [p.uid for _ in range(5) for p in cursor.next_batch().prompts]  # 20 prompts = 2 epochs
    assert sorted(seen[:10]) == sorted(seen[10:]) == sorted(f"p{i}" for i in range(10))
    assert seen[:10] != seen[10:]  # a new order each epoch
    assert seen[:10] != [f"p{i}" for i in range(10)]  # shuffled
    assert cursor.metrics()["data/epoch"] == 2.0

    # resume: a fresh cursor loaded with the state after 3 batches serves the same 4th and 5th batches
    first = DatasetCursor(prompts, per_batch=4, shuffle=True, seed=3)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = DatasetCursor(prompts, per_batch=4, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    assert [p.uid for _ in range(2) for p in resumed.next_batch().prompts] == seen[12:]
    # a resume against other rows or settings would skip or repeat prompts: refused, naming what differs
    for other, differs in [
        (DatasetCursor(PromptSet("other", prompts.prompts), 4, True, 3), "source: saved 'mem'"),
        (DatasetCursor(PromptSet("mem", prompts.prompts[:9]), 4, True, 3), "prompts: saved 10, now 9"),
        (DatasetCursor(PromptSet("mem", prompts.prompts[::-1]), 4, True, 3), "uids_sha256"),
        (DatasetCursor(prompts, 4, True, 4), "seed: saved 3, now 4"),
        (DatasetCursor(prompts, 4, False, 3), "shuffle"),
        (DatasetCursor(prompts, 2, True, 3), "per_batch"),
    ]:
        with pytest.raises(ValueError, match=differs):
            other.load_state_dict(state)


def test_unshuffled_cursor_keeps_file_order(tokenizer):
    cursor = DatasetCursor(_set(3, tokenizer), per_batch=2, shuffle=False, seed=0)
    assert [p.uid for p in cursor.next_batch().prompts] == ["p0", "p1"]
    assert [p.uid for p in cursor.next_batch().prompts] == ["p2", "p0"]  # runs into the next epoch


def test_builtin_arithmetic_eval_set_is_held_out_and_multi_step(tokenizer):
    task = TaskConfig(steps=3)
    enc = encoder(tokenizer)
    held_out = eval_prompt_set(DataConfig(eval="builtin:arithmetic"), task, enc, 16)
    assert len(held_out.prompts) == 16
    assert all(
        len(p.meta_value("operation")) == 2 for p in held_out.prompts
    )  # two operations after the start
    assert all(p.reference.isdigit() for p in held_out.prompts)
    assert eval_prompt_set(DataConfig(), task, enc, 16) is None


def test_data_keys_compose_from_the_command_line():
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(
            compose(
                config_name="config",
                overrides=["data.train=x.jsonl", "data.meta_keys=[a,b]", "run.seed=7", "eval.every=2"],
            )
        )
    assert cfg.data.train == "x.jsonl" and cfg.data.meta_keys == ["a", "b"]
    assert cfg.data.seed == 7 and cfg.data.eval_split == "train" and cfg.eval.every == 2
