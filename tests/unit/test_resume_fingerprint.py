"""A resume refuses a different run: a changed config key (unless accepted), other training data, another run's
checkpoint, and a bad cursor state; a refused launch leaves the run folder as it was."""

import json
import logging
import re

import pytest

from tests.unit.tiny_models import llama3_style_tokenizer
from troupe.cluster.config.compose import compose
from troupe.cluster.data.prompts import ArithmeticCursor, arithmetic_task, prompt_encoder, train_cursor
from troupe.cluster.durability.checkpoint import write_checkpoint
from troupe.cluster.durability.fingerprint import RUN_FILE, ResumeRefused, admit, check_resume, fingerprint
from troupe.cluster.run import driver


def _cfg(*overrides):
    return compose(list(overrides), adapt=False)


def _checkpoint(out_dir, iteration, identity):
    def parts(tmp):
        (tmp / "policy").mkdir()
        (tmp / "policy" / "model.safetensors").write_bytes(b"w" * 16)

    return write_checkpoint(out_dir, iteration, parts, {"iteration": iteration, **identity}, keep=5)[0]


def _prompts(path, words):
    path.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in words))
    return path


def _listing(folder):
    """Every file under `folder` with its bytes and mtime: what a refused launch must leave alone (all but the
    folder's lock file and the driver's log, which record the attempt)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".troupe.lock" and "logs" not in p.relative_to(folder).parts
    }


def test_a_changed_learning_rate_is_refused_naming_the_key_old_and_new():
    saved = fingerprint(_cfg())
    with pytest.raises(ResumeRefused) as refused:
        check_resume(saved, fingerprint(_cfg("learner.lr=0.125")), checkpoint="iter-000003")
    message = str(refused.value)
    assert re.search(re.escape(f"learner.lr: {saved['learner.lr']!r} -> 0.125"), message)
    assert "resume_allow_changes=[learner.lr]" in message and "iter-000003" in message
    assert message.count("\n  ") == 1  # nothing else is named


def test_listed_and_always_allowed_changes_are_accepted_and_others_refused():
    saved = fingerprint(_cfg())
    assert check_resume(saved, fingerprint(_cfg("learner.lr=0.125")), ["learner.lr"]) == ["learner.lr"]
    # display, checkpoint cadence, logging and the Ray address need no listing
    quiet = fingerprint(_cfg("run.checkpoint_every=5", "logging.tensorboard=false", "ray.address=auto"))
    assert check_resume(saved, quiet) == ["logging.tensorboard", "ray.address", "run.checkpoint_every"]
    # a longer run changes the learning-rate schedule: it must be asked for
    with pytest.raises(ResumeRefused, match=r"run\.iterations: 3 -> 12"):
        check_resume(saved, fingerprint(_cfg("run.iterations=12")))
    assert check_resume(saved, fingerprint(_cfg("run.iterations=12")), ["run.iterations"]) == [
        "run.iterations"
    ]


def test_a_glob_or_a_group_accepts_its_keys_and_an_unknown_pattern_is_named():
    saved = fingerprint(_cfg())
    changed = fingerprint(_cfg("faults.learn_s=60", "faults.retries.generator=9"))
    both = ["faults.learn_s", "faults.retries.generator"]
    assert check_resume(saved, changed, ["faults.*"]) == both == check_resume(saved, changed, ["faults"])
    with pytest.raises(ResumeRefused, match=r"faults\.learn_s: 1800\.0 -> 60\.0"):
        check_resume(saved, changed, ["faults.retries.*"])
    with pytest.raises(ResumeRefused, match=r"resume_allow_changes: learner\.lrr matches no config key"):
        check_resume(saved, changed, ["faults.*", "learner.lrr"])


def test_a_replaced_prompt_file_with_the_same_row_count_is_refused(tmp_path):
    path = _prompts(tmp_path / "p.jsonl", ["red", "green", "blue", "black"])
    cfg = _cfg(f"data.train={path}", "data.prompts_per_iteration=2")
    saved = fingerprint(cfg)
    tokenizer = llama3_style_tokenizer()
    encoder = prompt_encoder(cfg.data, tokenizer, 4096, 64)
    cursor = train_cursor(cfg.data, cfg.task, encoder)
    cursor.next_batch()
    state = json.loads(json.dumps(cursor.state_dict()))

    _prompts(path, ["one", "two", "three", "four"])  # same rows, same positional ids, other content
    with pytest.raises(ResumeRefused, match=r"prompts\.sha256: '[0-9a-f]+\.\.\. -> '[0-9a-f]+") as refused:
        check_resume(saved, fingerprint(cfg), ["data.*", "prompts.*"])  # never accepted
    assert "the data cursor would skip or repeat" in str(refused.value)
    with pytest.raises(ValueError, match=r"the data cursor was saved for other prompts.*sha256: saved '"):
        train_cursor(cfg.data, cfg.task, encoder).load_state_dict(state)


def test_the_arithmetic_cursor_refuses_a_bad_or_foreign_state(caplog):
    cfg = _cfg("data.prompts_per_iteration=2")
    encoder = prompt_encoder(cfg.data, llama3_style_tokenizer(), 4096, 64)
    cursor = ArithmeticCursor(arithmetic_task(cfg.task), encoder, 2)
    cursor.next_batch()
    good = json.loads(json.dumps(cursor.state_dict()))
    for bad, named in [
        ([1, 2], "must be a mapping, got list"),
        ({**good, "source": "prompts.jsonl"}, "source: saved 'prompts.jsonl'"),
        ({**good, "per_batch": 8}, "per_batch: saved 8, now 2"),
        ({**good, "task": {**good["task"], "seed": 7}}, "task: saved"),
        ({**good, "batches": -1}, "'batches' must be a whole number >= 0, got -1"),
        ({**good, "batches": "3"}, "'batches' must be a whole number >= 0, got '3'"),
        ({**good, "batches": True}, "'batches' must be a whole number"),
        ({"source": "builtin:arithmetic"}, "'batches' must be a whole number >= 0, got None"),
    ]:
        with pytest.raises(ValueError, match=re.escape(named)):
            ArithmeticCursor(arithmetic_task(cfg.task), encoder, 2).load_state_dict(bad)
    resumed = ArithmeticCursor(arithmetic_task(cfg.task), encoder, 2)
    resumed.load_state_dict(good)
    assert resumed.next_batch() == cursor.next_batch()
    # a state saved before the task was recorded: accepted, with a warning naming what was not checked
    with caplog.at_level(logging.WARNING, logger="troupe.data"):
        resumed.load_state_dict({"source": "builtin:arithmetic", "batches": 5})
    assert resumed.batches == 5 and "['task', 'per_batch']" in caplog.text


def test_a_checkpoint_of_another_run_is_refused_and_the_folder_left_as_it_was(tmp_path, monkeypatch):
    def launched(*_a, **_k):
        raise AssertionError("the launch went past the resume checks")

    monkeypatch.setattr(driver.Job, "connect_ray", launched)  # a refused launch never starts Ray
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    here, there = tmp_path / "here", tmp_path / "there"
    base = (f"model.policy={model}", "run.checkpoint_every=1")
    ours = admit(_cfg(*base, f"run.output_dir={here}"), here, None)
    for it in (1, 3):
        _checkpoint(here, it, ours)
    (here / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(4)))
    theirs = admit(_cfg(*base, f"run.output_dir={there}"), there, None)
    foreign = _checkpoint(there, 0, theirs)
    before = _listing(here)

    with pytest.raises(ResumeRefused) as refused:
        driver.run(_cfg(*base, f"run.output_dir={here}", f"resume={foreign}"))
    assert f"of run {theirs['run_id']}, but {here} holds run {ours['run_id']}" in str(refused.value)
    assert _listing(here) == before  # iter-000003 not set aside, metrics not rewound, run.json as it was
    # this run's own older checkpoint, with a changed config: refused too, before anything moves
    with pytest.raises(ResumeRefused, match=r"learner\.lr: .* -> 0\.125"):
        driver.run(_cfg(*base, f"run.output_dir={here}", "resume=latest", "learner.lr=0.125"))
    assert _listing(here) == before
    # into an empty folder, the other run continues under its own id
    elsewhere = tmp_path / "elsewhere"
    assert (
        admit(_cfg(*base, f"run.output_dir={there}"), elsewhere, (foreign, theirs))["run_id"]
        == theirs["run_id"]
    )
    assert json.loads((elsewhere / RUN_FILE).read_text()) == {"run_id": theirs["run_id"]}


def test_a_folder_without_a_run_id_refuses_a_checkpoint_from_elsewhere(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    (here).mkdir()
    (here / "metrics.jsonl").write_text('{"iteration": 0}\n')
    theirs = admit(_cfg(), there, None)
    foreign = _checkpoint(there, 0, theirs)
    with pytest.raises(ResumeRefused, match="cannot be told .*folder none recorded"):
        admit(_cfg(), here, (foreign, {"iteration": 0, **theirs}))
    assert not (here / RUN_FILE).exists()


def test_an_old_checkpoint_without_run_id_or_fingerprint_is_resumed_with_a_warning(tmp_path, caplog):
    old = _checkpoint(tmp_path, 2, {})  # written before troupe recorded them
    with caplog.at_level(logging.WARNING, logger="troupe.durable"):
        identity = admit(_cfg("learner.lr=0.125"), tmp_path, (old, {"iteration": 2}))
    assert "its lineage, config and data are not checked" in caplog.text
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {"run_id": identity["run_id"]}
    assert identity["fingerprint"]["learner.lr"] == 0.125  # its new checkpoints carry the fingerprint


def test_the_fingerprint_redacts_secrets_and_keeps_the_rest():
    cfg = _cfg()
    cfg.reward.objectives["remote"] = {
        "type": "http",
        "url": "https://user:hunter2@rm.example/score",
        "api_key": "hunter2",
        "token_env": "RM_TOKEN",  # the name of a variable, not a secret
    }
    fp = fingerprint(cfg)
    assert "hunter2" not in json.dumps(fp)
    assert fp["reward.objectives.remote.url"] == "https://<redacted>@rm.example/score"
    assert fp["reward.objectives.remote.api_key"] == "<redacted>"
    assert fp["reward.objectives.remote.token_env"] == "RM_TOKEN"
    assert "resume" not in fp and fp["prompts.cursor"] == "arithmetic" and fp["prompts.batch_size"] == 8
