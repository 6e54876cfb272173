"""What a resume checks before it changes anything: that the checkpoint is of this folder's run (its lineage), and
that it was written with this config and data (its fingerprint).

Every launch has a run id: a fresh run draws one, a resume continues its checkpoint's. `<run dir>/run.json` holds
the folder's; each checkpoint's state.json holds its run's id and fingerprint: the flattened config (secrets
redacted) and the training data's identity (`prompts.*`: cursor kind, content sha256, seed, batch size). A resume
is refused, naming what differs, when the checkpoint is of another run, when a config key changed that neither
ALWAYS_ALLOWED nor `resume_allow_changes` accepts, or when the training data changed (never accepted: the data
cursor would skip or repeat prompts). `admit` runs before anything in the folder is set aside or rewound, so a
refused launch leaves the folder as it was. A checkpoint from before these records is resumed with a warning.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from troupe.cluster.config.compose import config_record
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.data.prompts import BUILTIN_ARITHMETIC
from troupe.cluster.data.records import content_sha256
from troupe.cluster.durability.checkpoint import (
    CheckpointError,
    checkpoints_root,
    complete,
    find_checkpoint,
    set_aside_after,
    verify,
)

log = logging.getLogger("troupe.durable")
RUN_FILE = "run.json"
DATA = "prompts."  # the fingerprint's keys for the training data
LAUNCH_KEYS = ("resume", "resume_allow_changes")  # how this launch was asked for, not what the run is
# Accepted without being listed: they decide how a run is shown, saved and hosted, never what it trains. Not here:
# run.iterations (also the horizon of a decaying LR schedule, learner.lr_schedule) and faults.* (a budget or deadline changed
# mid-run is worth writing on the command line).
ALWAYS_ALLOWED = (
    "run.name",  # names and paths of the outputs: a run folder may be moved or renamed
    "run.output_dir",
    "run.progress_bar",  # the console
    "run.print_table",
    "run.checkpoint_every",  # when checkpoints are written and how many are kept
    "run.keep_checkpoints",
    "run.save_checkpoint",
    "logging",  # logs and trackers (logging.rollouts picks the samples written, not the ones trained)
    "ray",  # where the run runs: a resumed job usually starts on another cluster or node
)
_SECRET = re.compile(r"(^|_)(password|passwd|secret|token|api_?key|credentials?|authorization)$", re.I)
_URL_USER = re.compile(r"(?<=://)[^/@\s]+(?=@)")  # user:password@ in a URL
_ABSENT = object()


class ResumeRefused(CheckpointError):
    """A resume of another run, or with changes it does not accept; raised before the run folder is changed."""


def fingerprint(cfg: TroupeConfig) -> dict:
    """{dotted config key: value}, secrets redacted, and the training data's identity under `prompts.`; as
    state.json holds it (JSON types)."""
    record = {k: v for k, v in config_record(cfg).items() if k not in LAUNCH_KEYS}
    flat = {key: _redacted(key, value) for key, value in _flatten(record)}
    d = cfg.data
    if d.train == BUILTIN_ARITHMETIC:  # the problems are a function of the task's parameters
        task = json.dumps(dataclasses.asdict(cfg.task), sort_keys=True)
        data = {
            "cursor": "arithmetic",
            "sha256": hashlib.sha256(task.encode()).hexdigest(),
            "seed": cfg.task.seed,
        }
    else:
        data = {"cursor": "dataset", "sha256": content_sha256(d.train), "seed": d.seed, "shuffle": d.shuffle}
    data["batch_size"] = d.prompts_per_iteration
    if cfg.job != "rl" or cfg.algo.source == "dataset":  # offline DPO and reward models train on dataset.path
        data["pairs_sha256"] = content_sha256(cfg.dataset.path) if cfg.dataset.path else None
    flat.update({DATA + k: v for k, v in data.items()})
    return json.loads(json.dumps(flat, default=str))


def check_resume(
    saved: dict, current: dict, allow: Sequence[str] = (), checkpoint="the checkpoint"
) -> list[str]:
    """Refuses (ResumeRefused) a resume whose fingerprint differs from `saved` in a key that neither ALWAYS_ALLOWED
    nor `allow` (globs; a group name covers its keys) accepts, or in its data; each is listed as old -> new.
    Returns the accepted changes."""
    keys = saved.keys() | current.keys()
    unknown = [p for p in allow if not any(_covers(p, k) for k in keys)]
    if unknown:
        raise ResumeRefused(f"resume_allow_changes: {', '.join(unknown)} matches no config key")
    changed = sorted(k for k in keys if saved.get(k, _ABSENT) != current.get(k, _ABSENT))
    data = [k for k in changed if k.startswith(DATA)]
    accepted = [k for k in changed if k not in data and any(_covers(p, k) for p in (*ALWAYS_ALLOWED, *allow))]
    refused = [k for k in changed if k not in data and k not in accepted]
    if refused or data:
        lines = [f"  {k}: {_shown(saved, k)} -> {_shown(current, k)}" for k in refused + data]
        hints = []
        if refused:
            hints.append(
                "Run with the checkpoint's values, or accept these changes: "
                f"resume_allow_changes=[{','.join(refused)}] (globs such as faults.* work)."
            )
        if data:
            hints.append(
                "The training data (prompts.*) cannot change within a run: the data cursor would skip or repeat "
                "prompts. Start a new run (model.policy=<checkpoint>/policy starts it from these weights)."
            )
        raise ResumeRefused(
            f"resume refused: {checkpoint} was written with another config or data:\n"
            + "\n".join(lines + hints)
        )
    if accepted:
        log.info("resume accepts changes of %s", ", ".join(accepted))
    return accepted


def admit(cfg: TroupeConfig, out_dir: Path, resume: tuple[Path, dict] | None) -> dict:
    """The identity this launch writes into every checkpoint's state.json: {run_id, fingerprint}. A resume
    (a verified checkpoint and its state) is first checked against the folder's run and the checkpoint's
    fingerprint; <run dir>/run.json is written only after every check passed."""
    current = fingerprint(cfg)
    run_id = uuid.uuid4().hex
    if resume is not None:
        checkpoint, state = resume
        run_id = _lineage(Path(out_dir), Path(checkpoint), state) or run_id
        if "fingerprint" in state:
            check_resume(state["fingerprint"], current, cfg.resume_allow_changes, checkpoint)
        else:
            log.warning(
                "%s was written before troupe recorded run ids and config fingerprints: its lineage, config and "
                "data are not checked",
                checkpoint,
            )
    _write_run_file(Path(out_dir), run_id)
    return {"run_id": run_id, "fingerprint": current}


def resume_point(cfg: TroupeConfig, out_dir: Path) -> tuple[tuple[Path, dict] | None, dict]:
    """The verified checkpoint under `out_dir` to resume from and its state (None without `resume=`), and the
    run's identity (`admit`). Another run's checkpoint or a changed config is refused before anything moves; then
    newer checkpoints are set aside."""
    resume = None
    if cfg.resume:
        folder = find_checkpoint(out_dir, cfg.resume)
        # before anything is loaded: a bad checkpoint fails in seconds, and nothing in it is loaded unverified
        resume = (folder, verify(folder))
    identity = admit(cfg, out_dir, resume)
    if resume is not None:
        for moved in set_aside_after(checkpoints_root(out_dir), resume[0]):
            log.warning("checkpoint of the abandoned timeline set aside: %s", moved)
    return resume, identity


def _lineage(out_dir: Path, checkpoint: Path, state: dict) -> str | None:
    """The run id a resume continues (the checkpoint's, else the folder's). Refused when the folder holds another
    run: its run.json names another id, or the checkpoint is from elsewhere and the folder holds metrics or
    checkpoints whose run cannot be compared."""
    path = out_dir / RUN_FILE
    here, theirs = _read_run_id(path), state.get("run_id")
    if here and theirs and here != theirs:
        raise ResumeRefused(
            f"resume refused: {checkpoint} is a checkpoint of run {theirs}, but {out_dir} holds run {here} "
            f"({path}); resume it in its own run folder or an empty run.output_dir. Nothing was changed"
        )
    elsewhere = checkpoint.resolve().parent != checkpoints_root(out_dir).resolve()
    if elsewhere and not (here and theirs) and _holds_a_run(out_dir):
        raise ResumeRefused(
            f"resume refused: {out_dir} holds a run's metrics or checkpoints, and whether {checkpoint} is of that "
            f"run cannot be told (run ids: folder {here or 'none recorded'}, checkpoint "
            f"{theirs or 'none recorded'}); resume it in an empty run.output_dir. Nothing was changed"
        )
    return theirs or here


def _holds_a_run(out_dir: Path) -> bool:
    return (out_dir / "metrics.jsonl").exists() or bool(complete(checkpoints_root(out_dir)))


def _read_run_id(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        run_id = json.loads(path.read_text())["run_id"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ResumeRefused(f"{path} is not a run record ({{'run_id': ...}}): {e}") from e
    return str(run_id)


def _write_run_file(out_dir: Path, run_id: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id}) + "\n")
    os.replace(tmp, out_dir / RUN_FILE)


def _flatten(value, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], value


def _redacted(key: str, value):
    if _SECRET.search(key.rsplit(".", 1)[-1]):
        return "<redacted>"
    return _URL_USER.sub("<redacted>", value) if isinstance(value, str) else value


def _covers(pattern: str, key: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key, pattern + ".*")


def _shown(fp: dict, key: str) -> str:
    if key not in fp:
        return "(absent)"
    text = repr(fp[key])
    return text if len(text) <= 40 else text[:37] + "..."
