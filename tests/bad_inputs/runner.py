"""Runs the bad-input corpus: each case in tests/bad_inputs/*.yaml is materialised into a folder, handed to the
real loader or validator, and its outcome classified:

  clear error   the project's own error type, with a message matching the case's `match` (the key, file:line)
  counted skip  the good rows kept, the bad one counted under the case's `reason`, the log naming file:line
  crash         any other exception (TypeError, KeyError, RecursionError, ...): the input was not checked
  silent        nothing refused and nothing counted: the bad input went through
  wrong message the right kind of refusal, but it does not name what the case says it should

tests/unit/test_bad_inputs.py asserts every case ends as it `expect`s; report.py prints the table.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KINDS = ("config", "prompts", "preferences", "ratings", "bundles", "fleet", "http", "checkpoints")
OUTCOME = {"error": "clear error", "skip": "counted skip"}
HTTP_SKIP = "HTTP cases run in tests/integration/test_rm_serve.py"
TEST_KEY = "troupe-bad-inputs-checkpoint-key"  # what the corpus's checkpoints are signed with


@dataclass(frozen=True)
class Case:
    kind: str
    id: str
    spec: dict = field(hash=False, compare=False)
    pending: bool = False  # not refused yet (config checks being added): xfail, reported apart

    @property
    def expected(self) -> str:
        return OUTCOME[self.spec["expect"]]


class NotRun(Exception):
    """The case cannot run here (the HTTP layer it needs is absent); the reason says where it runs."""


def load_cases() -> list[Case]:
    cases = []
    for kind in KINDS:
        data = yaml.safe_load((HERE / f"{kind}.yaml").read_text(encoding="utf-8"))
        for pending, key in ((False, "cases"), (True, "pending")):
            for spec in data.get(key) or []:
                if spec.get("expect") not in OUTCOME or "id" not in spec or "match" not in spec:
                    raise ValueError(
                        f"{kind}.yaml {key}: case {spec.get('id')!r} needs id, expect (error|skip), match"
                    )
                cases.append(Case(kind, spec["id"], spec, pending))
    ids = [f"{c.kind}/{c.id}" for c in cases]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"duplicate case ids: {dupes}")
    return cases


def run_case(case: Case, tmp: Path) -> tuple[str, str]:
    """(outcome, what happened): raises NotRun when the case cannot run here."""
    from troupe.actors.reward.bundle import FailedBundle
    from troupe.cluster.config.checks import ConfigError
    from troupe.cluster.durability.checkpoint import CheckpointError
    from troupe.cluster.durability.signing import CheckpointKeyError
    from troupe.cluster.fleet.requests import FleetRequestError

    clear = {
        "config": (ConfigError,),
        "prompts": (ValueError, FileNotFoundError),
        "preferences": (ValueError, FileNotFoundError),
        "ratings": (ValueError, FileNotFoundError),
        "bundles": (ValueError, FileNotFoundError, FailedBundle),
        "fleet": (FleetRequestError,),
        "checkpoints": (CheckpointError, CheckpointKeyError),
        "http": (ValueError,),  # _http raises it for the expected status and message
    }[case.kind]
    spec = case.spec
    with _captured_log() as logged:
        try:
            result = RUNNERS[case.kind](spec, tmp)
        except NotRun:
            raise
        except clear as e:
            said = f"{type(e).__name__}: {e}"
            if not re.search(spec["match"], str(e)):
                return "wrong message", said
            return "clear error", said
        except Exception as e:  # noqa: BLE001 (what the corpus is for: any other exception is a crash)
            return "crash", f"{type(e).__name__}: {e}"
    if result is None:
        return "silent", "accepted"
    kept, skipped, where = result
    if not skipped:
        return "silent", f"{kept} rows kept, nothing skipped"
    said = f"{kept} kept, skipped {dict(skipped)}"
    reason, want_kept = spec.get("reason"), spec.get("kept", 2)
    log_line = f"{where}: {reason}: "
    ok = (
        dict(skipped) == {reason: 1}
        and kept == want_kept
        and any(log_line in m and re.search(spec["match"], m) for m in logged)
    )
    return ("counted skip" if ok else "wrong message"), said + ("" if ok else f"; log: {logged[:3]}")


@contextmanager
def _captured_log():
    logger = logging.getLogger("troupe.data")
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, level = Keep(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# data files -------------------------------------------------------------------------------------------------------

GOOD = {
    "prompts": {"prompt": "What is 2+2?", "answer": "4"},
    "preferences": {"prompt": "q", "chosen": "yes", "rejected": "no"},
    "ratings": {"prompt": "q", "response": "an answer", "h": 3},
}


def _bytes(spec: dict, key: str) -> bytes | None:
    """`key` as bytes: a YAML mapping or list (written as JSON), a string, or `<key>_b64` (base64)."""
    if f"{key}_b64" in spec:
        return base64.b64decode(spec[f"{key}_b64"])
    if key not in spec:
        return None
    value = spec[key]
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


def _data_file(kind: str, spec: dict, tmp: Path) -> tuple[Path, str]:
    """The file a data case describes, and where its bad row is ("file:2"). `row`/`line`: one bad line between
    two good rows (`good`: other good rows); `file`: the whole file. `name` sets the file name, `gzip` compresses, `cut` keeps that
    fraction of the bytes (a truncated download)."""
    path = tmp / spec.get("name", "rows.jsonl")
    good_row = spec.get("good", GOOD[kind])
    good = json.dumps(good_row).encode() + b"\n"
    if "row" in spec:
        middle = json.dumps({**good_row, **spec["row"]}).encode() + b"\n"
        data = good + middle + good
    elif (line := _bytes(spec, "line")) is not None:
        data = good + line + b"\n" + good
    else:
        data = _bytes(spec, "file") or b""
        if spec.get("repeat"):
            data = b"".join(data.replace(b"{i}", str(i).encode()) + b"\n" for i in range(spec["repeat"]))
    if spec.get("gzip"):
        data = gzip.compress(data)
    if "cut" in spec:
        data = data[: int(len(data) * spec["cut"])]
    if not spec.get("absent"):
        path.write_bytes(data)
    return path, f"{path}:2"


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from tests.unit.tiny_models import llama3_style_tokenizer

        _TOKENIZER = llama3_style_tokenizer()
    return _TOKENIZER


def _prompts(spec, tmp):
    from troupe.cluster.config.schema import DataConfig
    from troupe.cluster.data.prompts import PromptEncoder, load_prompt_set

    path, where = _data_file("prompts", spec, tmp)
    data = DataConfig(**{"answer_key": "answer", **spec.get("data", {})})
    encoder = PromptEncoder(data, _tokenizer(), spec.get("max_prompt_tokens", 10_000))
    got = load_prompt_set(str(path), "train", encoder)
    return len(got.prompts), got.skipped, where


def _preferences(spec, tmp):
    from troupe.cluster.data.preferences import load_preferences

    path, where = _data_file("preferences", spec, tmp)
    prefs, skipped = load_preferences(path, **spec.get("options", {}))
    return len(prefs), skipped, where


def _ratings(spec, tmp):
    from troupe.cluster.data.ratings import load_ratings, resolve_scales

    path, where = _data_file("ratings", spec, tmp)
    if "scales" in spec or "scales_file" in spec:
        scales_path = None
        if "scales_file" in spec:
            scales_path = tmp / "scales.yaml"
            scales_path.write_text(spec["scales_file"])
        scales = resolve_scales(spec.get("scales"), str(scales_path) if scales_path else None)
    else:
        scales = {"h": (0, 4)}
    ratings = load_ratings(str(path), scales)
    return len(ratings.responses), ratings.skipped, where


# config, bundles, fleet requests ----------------------------------------------------------------------------------


def _config(spec, tmp):
    from troupe.cluster.config.checks import validate
    from troupe.cluster.config.compose import compose

    overrides = [o.replace("{tmp}", str(tmp)) for o in spec.get("overrides", [])]
    for rel, text in spec.get("files", {}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    recipe = spec.get("recipe", "config").replace("{tmp}", str(tmp))
    validate(compose(overrides, recipe=recipe))


def _bundles(spec, tmp):
    from troupe.actors.reward.bundle import read_info

    folder = tmp / "bundle"
    folder.mkdir()
    if (content := _bytes(spec, "content")) is not None:
        (folder / "bundle.json").write_bytes(content)
    read_info(folder)


NOW = 1_700_000_000.0


def _fleet(spec, tmp):
    from troupe.cluster.fleet.requests import Bounds, check_request

    bounds = {"generators": Bounds(1, 4, "autoscale.generators.min/max"), "reward.rules": Bounds(1, 2, "x")}
    raw = _bytes(spec, "bytes")
    if spec.get("repeat"):
        raw = raw * spec["repeat"]
    obj = raw if raw is not None else spec["request"]
    if spec.get("ratio_of_now") is not None:
        obj = {**obj, "requested_at": NOW * spec["ratio_of_now"]}
    check_request(obj, None if spec.get("no_bounds") else bounds, now=NOW)


# checkpoints ------------------------------------------------------------------------------------------------------


@contextmanager
def _key(value: str):
    from troupe.cluster.durability.signing import ENV

    old = os.environ.get(ENV)
    os.environ[ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def _checkpoints(spec, tmp):
    """A good signed checkpoint, then `edits` applied in order, then `verify` (under `verify_key` if given)."""
    from troupe.cluster.durability.checkpoint import verify, write_checkpoint
    from troupe.cluster.durability.signing import load_key, sign

    def parts(folder):
        (folder / "policy").mkdir()
        (folder / "policy" / "model.safetensors").write_bytes(b"xy" * 32)
        (folder / "policy-ds").mkdir()
        (folder / "policy-ds" / "rank0.safetensors").write_bytes(b"yx" * 32)

    with _key(TEST_KEY):
        folder, _ = write_checkpoint(tmp / "run", 3, parts, {"iteration": 3}, keep=2)
        manifest_path = folder / "manifest.json"
        for edit in spec.get("edits", []):
            ((op, arg),) = edit.items()
            if op == "delete":
                (folder / arg).unlink()
            elif op == "write":
                (folder / arg["path"]).parent.mkdir(parents=True, exist_ok=True)
                (folder / arg["path"]).write_bytes(_bytes(arg, "content"))
            elif op == "truncate":
                data = (folder / arg).read_bytes()
                (folder / arg).write_bytes(data[: len(data) // 2])
            elif op == "symlink":
                (folder / arg["path"]).symlink_to(arg["to"].replace("{tmp}", str(tmp)))
            elif op in ("manifest_set", "manifest_drop", "manifest_unlist", "manifest_resign"):
                manifest = json.loads(manifest_path.read_text())
                if op == "manifest_set":
                    manifest.update(arg)
                elif op == "manifest_drop":
                    manifest.pop(arg)
                elif op == "manifest_unlist":
                    manifest["files"].pop(arg)
                else:
                    manifest = sign({k: v for k, v in manifest.items() if k != "hmac"}, load_key())
                manifest_path.write_text(json.dumps(manifest))
            elif op == "remove_folder":
                shutil.rmtree(folder)
            else:
                raise ValueError(f"checkpoints.yaml: unknown edit {op!r}")
    with _key(spec.get("verify_key", TEST_KEY)):
        verify(folder)


# HTTP -------------------------------------------------------------------------------------------------------------


def _http(spec, tmp, module: str = "troupe.cluster.jobs.rm_http"):
    """Runs only where the rewritten HTTP layer (`module`.make_app) exists: its app, with a reward service that
    has no fleet behind it (a bad request never reaches scoring), called in-process."""
    import importlib

    try:
        http = importlib.import_module(module)
    except ImportError:
        http = None
    if http is None or not hasattr(http, "make_app"):
        raise NotRun(HTTP_SKIP)
    if spec.get("over_socket"):
        raise NotRun("h11 refuses this request before the app: it needs a real connection")
    response = _http_client(http).request(
        spec["method"], spec["path"], headers=spec.get("headers", {}), content=_bytes(spec, "body") or b""
    )
    error = response.json().get("error", "") if response.content else ""
    if response.status_code == spec["status"] and re.search(spec["match"], error):
        raise ValueError(error)  # what run_case classifies as a clear error
    if response.status_code < 400:
        return None  # accepted: silent
    raise RuntimeError(f"HTTP {response.status_code}, expected {spec['status']}: {error}")


_CLIENTS: dict = {}


class _NoFleet:
    """A reward fleet with no pools: a bad request is refused before scoring, so nothing reaches it."""

    pools: dict = {}

    def score(self, rollouts, deadline_s=None):
        raise RuntimeError("a bad-input case reached scoring: the request was accepted")


def _http_client(http):
    if http.__name__ not in _CLIENTS:
        from fastapi.testclient import TestClient

        from troupe.cluster.config.compose import compose
        from troupe.cluster.jobs.rm_serve import RewardService

        cfg = compose(["reward=open"])
        service = RewardService(cfg, _NoFleet(), None, _tokenizer())
        _CLIENTS[http.__name__] = TestClient(
            http.make_app(service, cfg.serve, None), raise_server_exceptions=False
        )
    return _CLIENTS[http.__name__]


RUNNERS = {
    "config": _config,
    "prompts": _prompts,
    "preferences": _preferences,
    "ratings": _ratings,
    "bundles": _bundles,
    "fleet": _fleet,
    "http": _http,
    "checkpoints": _checkpoints,
}
