"""Reward objectives written by users, and the guard that every objective running user or remote code sits behind.

The protocol. A plug-in is a function, or a class, named by import path under `reward.objectives.<name>.target`
(a module on the workers' path, or a .py file that troupe ships to the reward shards with Ray's runtime
environment). The other keys of the entry are its keyword arguments:

    reward:
      objectives:
        polite: {target: /home/me/rewards.py:politeness, bonus: 0.5}

    # /home/me/rewards.py
    def politeness(samples, bonus=0.0):          # or `async def`
        return [1.0 + bonus if "please" in s.response.lower() else 0.0 for s in samples]

A batch of `Sample`s goes in (prompt messages, response text and token ids, reference, metadata); one float per
sample comes out, or one list of per-token floats per sample (its value is then their sum, and the token values
are the objective's per-token channel for token-level aggregations), or None for a sample the objective does not
apply to (it adds 0, as in TRL). A class is built once per shard with the
keyword arguments and called like the function (`__call__(samples)`; `score(samples)` also works).

The guard (`GuardedObjective`). User code never takes the run down: a batch call that raises is retried sample by
sample (all within one more timeout), so only the samples that fail are marked; a call past its timeout marks
every sample of the call, and while it still runs the objective gets no new call (its samples fail); a value that
is not a finite number is a failure too. A failed sample's value is NaN, and the driver applies
`reward.on_error` to it (cluster/run/scoring.py). The first failure of each objective is kept, traceback and
sample id included, for the driver to log once.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from troupe.actors.plugins import PluginError, load_object
from troupe.actors.protocol import Rollout

# Keys of a reward.objectives.<name> entry that troupe reads; every other key is the plug-in's keyword argument.
RESERVED_KEYS = ("target", "type", "timeout_s", "on_error")
ON_ERROR = ("drop", "zero", "fail")


@dataclass(frozen=True)
class Sample:
    """What an objective sees of one rollout."""

    uid: str  # "<prompt uid>#<sample index>": names the sample in error reports and in rollouts.jsonl
    messages: list[dict[str, str]]  # the prompt as chat turns (system turn included)
    prompt: str  # the prompt as the policy saw it (chat template applied)
    response: str
    response_ids: tuple[int, ...]
    reference: str  # the prompt's reference answer ("" when it has none)
    meta: dict[str, Any]  # the prompt row's metadata, JSON-decoded
    finish_reason: str  # "stop" or "length" (cut at generator.max_new_tokens)


def sample_of(r: Rollout) -> Sample:
    p = r.prompt
    return Sample(
        uid=f"{p.uid}#{r.sample_index}",
        messages=p.chat(),
        prompt=p.text,
        response=r.response_text,
        response_ids=tuple(r.response_ids),
        reference=p.reference,
        meta={k: p.meta_value(k) for k, _ in p.meta},
        finish_reason=r.finish_reason,
    )


def plugin_kwargs(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in RESERVED_KEYS}


def resolve_target(target: Any, key: str) -> tuple[Any, str | None]:
    """(import path, file to ship): `dir/file.py:name` becomes `file:name` plus the file; a module path (or, from
    Python, the function itself) stays."""
    if not isinstance(target, str):
        return target, None
    path, sep, attr = target.rpartition(":")
    if sep and path.endswith(".py"):
        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise PluginError(f"{key}={target!r}: no such file {file}")
        if not attr:
            raise PluginError(f"{key}={target!r}: name the function or class after the colon")
        return f"{file.stem}:{attr}", str(file)
    return target, None


def load_target(target: Any, key: str) -> Any:
    """The object a `target` names: an import path, `dir/file.py:name` or, from Python, the object itself."""
    target, file = resolve_target(target, key)
    if file is not None and str(Path(file).parent) not in sys.path:
        # Ray ships the file and puts it on the path (py_modules); in-process (tests, rm eval) add its folder
        sys.path.insert(0, str(Path(file).parent))
    return load_object(target, key)


def load_plugin(name: str, params: dict) -> Callable[[list[Sample]], Any]:
    """The callable an objective entry names, with its keyword arguments bound (a class is built once)."""
    key = f"reward.objectives.{name}.target"
    found = load_target(params["target"], key)
    kwargs = plugin_kwargs(params)
    if inspect.isclass(found):
        try:
            instance = found(**kwargs)
        except TypeError as e:
            raise PluginError(f"{key}: {params['target']} does not take {sorted(kwargs)}: {e}") from e
        call = getattr(instance, "score", None) if not callable(instance) else instance
        if call is None:
            raise PluginError(f"{key}: an instance of {params['target']} is neither callable nor has score()")
        return call
    if not callable(found):
        raise PluginError(f"{key}: {params['target']} is a {type(found).__name__}, not a function or class")
    return lambda samples: found(samples, **kwargs)


class BatchFailed(Exception):
    """Raise from an objective to fail every sample of the call at once (e.g. a service that is down), instead of
    the guard retrying the samples one by one to find the bad ones."""


class CallFailed(Exception):
    def __init__(self, reason: str, detail: str, whole_batch: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.whole_batch = reason, detail, whole_batch


def call_with_timeout(fn: Callable[[], Any], timeout_s: float | None, running: list | None = None) -> Any:
    """fn() on a daemon thread (awaited if it returns a coroutine), at most `timeout_s` seconds. A call that
    overruns is abandoned (a thread cannot be killed; it is named so that it shows up as troupe's) and, when
    `running` is given, appended to it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            out = fn()
            box["value"] = asyncio.run(out) if inspect.isawaitable(out) else out
        except BaseException as e:  # noqa: BLE001 (reported to the caller with its traceback)
            box["error"] = e
            box["traceback"] = traceback.format_exc()

    worker = threading.Thread(target=run, daemon=True, name="troupe-objective")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        if running is not None:
            running.append(worker)
        raise CallFailed("timeout", f"no answer within {timeout_s} s")
    if "error" in box:
        raise CallFailed("error", box["traceback"], isinstance(box["error"], BatchFailed))
    return box["value"]


@dataclass
class Failure:
    """The first failure of an objective: which sample, why, and the traceback."""

    objective: str
    sample: str
    reason: str  # error | timeout | invalid
    detail: str

    def message(self) -> str:
        return f"objective {self.objective!r} failed on sample {self.sample} ({self.reason}):\n{self.detail}"


class GuardedObjective:
    """An objective of user or remote code behind the guard. `score_batch(rollouts, tokens)` gives values [N]
    (NaN where the sample failed) and, when asked and the objective gives them, the flat per-token channel."""

    def __init__(self, name: str, call: Callable[[list[Sample]], Any], timeout_s: float | None) -> None:
        self.name, self.call, self.timeout_s = name, call, timeout_s
        self.first_failure: Failure | None = None
        self.reported = False
        self.failures = 0
        self.overrunning: list[threading.Thread] = []  # timed-out calls still running: no new call meanwhile

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        return self.score_batch(rollouts, tokens=False)[0]

    def score_batch(
        self, rollouts: Sequence[Rollout], tokens: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        samples = [sample_of(r) for r in rollouts]
        self.overrunning = [t for t in self.overrunning if t.is_alive()]
        try:
            if self.overrunning:  # a hung plug-in gets no second thread; its samples fail until it returns
                raise CallFailed("timeout", f"a previous call is still running past {self.timeout_s} s")
            results = self._checked(samples, self._call(samples, self.timeout_s))
        except CallFailed as failed:
            if failed.reason == "timeout" or failed.whole_batch or len(samples) == 1:
                results = [self._fail(s, failed.reason, failed.detail) for s in samples]
            else:  # find the samples that fail: each alone, all within one more timeout
                deadline = time.monotonic() + (self.timeout_s or math.inf)
                results = [self._one(s, deadline) for s in samples]
        values = torch.tensor([v for v, _ in results], dtype=torch.float32)
        if not tokens:
            return values, None
        # The channel always exists when asked for, so every batch and replica agrees: per-token values as given,
        # a scalar on the last token (where the aggregation would put it), a failed sample's zeros.
        flat: list[float] = []
        for r, (value, per_token) in zip(rollouts, results, strict=True):
            n = len(r.response_ids)
            if per_token is not None:
                flat.extend(per_token)
            elif n:
                flat.extend([0.0] * (n - 1) + [0.0 if math.isnan(value) else value])
        return values, torch.tensor(flat, dtype=torch.float32)

    def _call(self, samples: list[Sample], timeout_s: float | None) -> Any:
        return call_with_timeout(lambda: self.call(samples), timeout_s, self.overrunning)

    def _one(self, sample: Sample, deadline: float) -> tuple[float, list[float] | None]:
        left = deadline - time.monotonic()
        if left <= 0 or self.overrunning:
            return self._fail(sample, "timeout", "the sample-by-sample retry ran out of reward.timeout_s")
        try:
            return self._checked([sample], self._call([sample], left if math.isfinite(left) else None))[0]
        except CallFailed as failed:
            return self._fail(sample, failed.reason, failed.detail)

    def _checked(self, samples: list[Sample], out: Any) -> list[tuple[float, list[float] | None]]:
        """One (value, per-token values or None) per sample; a wrong count fails the call, a bad value its sample."""
        if isinstance(out, torch.Tensor):
            out = out.tolist()
        try:
            out = list(out)
        except TypeError as e:
            raise CallFailed("invalid", f"returned {type(out).__name__}, not a list of floats") from e
        if len(out) != len(samples):
            raise CallFailed("invalid", f"returned {len(out)} values for {len(samples)} samples")
        results = []
        for sample, value in zip(samples, out, strict=True):
            results.append(self._value(sample, value))
        return results

    def _value(self, sample: Sample, value: Any) -> tuple[float, list[float] | None]:
        if value is None:  # "does not apply to this sample" (TRL's convention): it adds nothing
            return 0.0, None
        try:
            if isinstance(value, (list, tuple, torch.Tensor)):
                per_token = [float(v) for v in value]
                if len(per_token) != len(sample.response_ids):
                    return self._fail(
                        sample,
                        "invalid",
                        f"{len(per_token)} token values for {len(sample.response_ids)} response tokens",
                    )
                total = math.fsum(per_token)
                if all(math.isfinite(v) for v in per_token):
                    return total, per_token
                return self._fail(sample, "invalid", f"token values not all finite: {per_token}")
            number = float(value)
        except (TypeError, ValueError):
            return self._fail(sample, "invalid", f"value {value!r} is not a number")
        if not math.isfinite(number):
            return self._fail(sample, "invalid", f"value {number} is not finite")
        return number, None

    def _fail(self, sample: Sample, reason: str, detail: str) -> tuple[float, None]:
        self.failures += 1
        if self.first_failure is None:
            self.first_failure = Failure(self.name, sample.uid, reason, detail)
        return math.nan, None

    def take_first_failure(self) -> Failure | None:
        """The objective's first failure, once: later calls return None (the driver logs one per objective)."""
        if self.reported or self.first_failure is None:
            return None
        self.reported = True
        return self.first_failure
