"""Training and evaluation prompts: read once, chat-templated once, served in batches through a data cursor.

A row's prompt (`data.prompt_key`, dotted paths reach inside: "turns.0") is a string (one user turn, after the
optional `data.system_prompt`) or a list of {role, content} messages (trailing assistant turns are dropped: the
policy answers the last user turn). `data.answer_key` becomes the prompt's reference (a string, or a number as
Python writes it) and `data.meta_keys` its metadata, both read by the reward objectives. Bad rows are skipped, logged with where they are (file:line) and
counted by reason; the run goes on. `builtin:arithmetic` is the generated arithmetic task (task.*).

The cursor: a dataset is walked in a seeded order that is reshuffled each epoch (`data.shuffle`); `state_dict()`
holds (epoch, position, batches), so a resumed run continues with the very next prompt, and what the order depends
on (the source and its content hash, seed, batch size): a state saved for other prompts is refused when loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field

from troupe.actors.protocol import Prompt, PromptBatch
from troupe.actors.tasks.arithmetic import ArithmeticTask, chat_messages
from troupe.cluster.config.schema import DataConfig, TaskConfig, TroupeConfig
from troupe.cluster.data import fields
from troupe.cluster.data.records import BadRow, Skipped, SkipRow, content_sha256, iter_rows

log = logging.getLogger("troupe.data")
BUILTIN_ARITHMETIC = "builtin:arithmetic"
EVAL_SEED_OFFSET = 1_000_003  # held-out arithmetic problems come from another seed


@dataclass
class PromptSet:
    """The usable prompts of one source and how many rows were skipped, by reason."""

    source: str
    prompts: list[Prompt]
    rows: int = 0
    skipped: Skipped = field(default_factory=Skipped)

    def metrics(self, prefix: str = "data") -> dict:
        out = {f"{prefix}/rows": self.rows, f"{prefix}/prompts": len(self.prompts)}
        out.update({f"{prefix}/skipped/{reason}": n for reason, n in sorted(self.skipped.items())})
        return out


class PromptEncoder:
    """Row -> `Prompt`: picks the configured fields, applies the chat template once, checks the length."""

    def __init__(self, cfg: DataConfig, tokenizer, max_prompt_tokens: int) -> None:
        self.cfg, self.tokenizer, self.max_tokens = cfg, tokenizer, max_prompt_tokens

    def encode(self, row: dict, uid: str) -> Prompt:
        c = self.cfg
        messages = self.messages_of(_field(row, c.prompt_key, "data.prompt_key"))
        reference = ""
        if c.answer_key:
            answer = _field(row, c.answer_key, "data.answer_key")
            reference = fields.text(answer, f"data.answer_key={c.answer_key!r}", "bad_answer").strip()
            if not reference:
                raise SkipRow("empty_answer", f"empty answer under data.answer_key={c.answer_key!r}")
        meta = []
        for key in c.meta_keys:
            value = _field(row, key, "data.meta_keys")
            meta.append((key, value if isinstance(value, str) else json.dumps(value)))
        if c.id_key:
            uid = str(_field(row, c.id_key, "data.id_key"))
        return self.prompt(uid, messages, reference, tuple(meta))

    def prompt(self, uid: str, messages: list[dict], reference: str = "", meta: tuple = ()) -> Prompt:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > self.max_tokens:
            raise SkipRow(
                "too_long", f"prompt has {len(ids)} tokens, over data.max_prompt_tokens={self.max_tokens}"
            )
        last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        turns = tuple((m["role"], m["content"]) for m in messages)
        return Prompt(uid, tuple(ids), last_user, reference, meta, turns)

    def messages_of(self, value) -> list[dict]:
        where = f"data.prompt_key={self.cfg.prompt_key!r}"
        if isinstance(value, str):
            messages = [{"role": "user", "content": value}]
        else:
            messages = fields.messages(value, where, "bad_prompt")
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
        fields.require_user_turn(messages, where)
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return messages


def load_prompt_set(
    source: str, split: str, encoder: PromptEncoder, limit: int | None = None, name: str = "data"
) -> PromptSet:
    """Every usable row of `source` (the first `limit` usable ones when set), bad rows counted by reason."""
    out = PromptSet(source, [])
    for where, row in iter_rows(source, split):
        out.rows += 1
        try:
            if isinstance(row, BadRow):
                raise SkipRow(row.reason, row.detail)
            out.prompts.append(encoder.encode(row, f"{name}:{out.rows - 1}"))
        except SkipRow as e:
            out.skipped.add(e.reason, where, str(e))
        if limit is not None and len(out.prompts) >= limit:
            break
    if out.skipped:
        log.warning(
            "%s: %d of %d rows skipped %s", source, sum(out.skipped.values()), out.rows, dict(out.skipped)
        )
    if not out.prompts:
        raise ValueError(f"{source}: no usable prompts in {out.rows} rows (skipped: {dict(out.skipped)})")
    return out


class DatasetCursor:
    """Batches of a prompt set in a seeded order reshuffled every epoch; a batch may run into the next epoch.
    `sha256`: the source's content hash (`content_sha256`), so a resume refuses a replaced file with as many rows."""

    def __init__(
        self, prompts: PromptSet, per_batch: int, shuffle: bool, seed: int, sha256: str | None = None
    ) -> None:
        self.set, self.per_batch, self.shuffle, self.seed = prompts, per_batch, shuffle, seed
        self.sha256 = sha256
        self.epoch, self.position, self.batches = 0, 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.set.prompts)))
        if self.shuffle:
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> PromptBatch:
        chosen = []
        while len(chosen) < self.per_batch:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            chosen.append(self.set.prompts[self._order[self.position]])
            self.position += 1
        self.batches += 1
        return PromptBatch(tuple(chosen), self.batches - 1)

    def metrics(self) -> dict:
        return {**self.set.metrics(), "data/epoch": self.epoch + self.position / len(self._order)}

    @functools.cached_property
    def _identity(self) -> dict:
        """What the order depends on: a resume with other rows, seed, shuffle or batch size would skip or repeat.
        Fixed for the cursor's life, so hashed once (the loop snapshots the state every iteration)."""
        uids = hashlib.sha256("\n".join(p.uid for p in self.set.prompts).encode()).hexdigest()[:16]
        return {
            "source": self.set.source,
            "sha256": self.sha256,
            "prompts": len(self.set.prompts),
            "uids_sha256": uids,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "per_batch": self.per_batch,
        }

    def state_dict(self) -> dict:
        return {**self._identity, "epoch": self.epoch, "position": self.position, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        _check_identity(state, self._identity)
        epoch, position, batches = (_count(state, key) for key in ("epoch", "position", "batches"))
        if position > len(self.set.prompts):
            raise ValueError(
                f"the data cursor's position {position} is past the {len(self.set.prompts)} prompts of its epoch"
            )
        self.epoch, self.position, self.batches = epoch, position, batches
        self._order = self._epoch_order(self.epoch)


class ArithmeticCursor:
    """The built-in task: batch k holds problems generated from (task.seed, k), so nothing is read from disk."""

    def __init__(self, task: ArithmeticTask, encoder: PromptEncoder, per_batch: int) -> None:
        self.task, self.encoder, self.per_batch, self.batches = task, encoder, per_batch, 0

    def next_batch(self) -> PromptBatch:
        self.batches += 1
        return self.batch(self.batches - 1)

    def batch(self, index: int) -> PromptBatch:
        """Batch `index` without moving the cursor (problems are a pure function of seed and index)."""
        return PromptBatch(tuple(arithmetic_prompts(self.task, self.encoder, self.per_batch, index)), index)

    def metrics(self) -> dict:
        return {}

    @functools.cached_property
    def _identity(self) -> dict:
        """What the problems depend on: another task or batch size would serve other problems than the run's."""
        return {
            "source": BUILTIN_ARITHMETIC,
            "task": dataclasses.asdict(self.task),
            "per_batch": self.per_batch,
        }

    def state_dict(self) -> dict:
        return {**self._identity, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        _check_identity(state, self._identity)
        self.batches = _count(state, "batches")


def _check_identity(state, identity: dict) -> None:
    """Refuses a cursor state saved for other prompts or settings, naming each difference. A key the state lacks
    was not recorded by the troupe version that saved it: warned about, not refused."""
    if not isinstance(state, dict):
        raise ValueError(f"the data cursor's state must be a mapping, got {type(state).__name__}")
    differ = {k: (state[k], v) for k, v in identity.items() if k in state and state[k] != v}
    if differ:
        said = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"the data cursor was saved for other prompts or settings ({said})")
    unchecked = [k for k in identity if k not in state]
    if unchecked:
        log.warning("the data cursor's saved state has no %s (an older troupe): not checked", unchecked)


def _count(state: dict, key: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"the data cursor's state: {key!r} must be a whole number >= 0, got {value!r}")
    return value


def arithmetic_prompts(task: ArithmeticTask, encoder: PromptEncoder, count: int, index: int) -> list[Prompt]:
    system = encoder.cfg.system_prompt or task.system_prompt()
    return [
        encoder.prompt(p.uid, chat_messages(p.question, system), str(p.answer), (("operation", p.operation),))
        for p in task.sample(count, index)
    ]


def arithmetic_task(cfg: TaskConfig, seed_offset: int = 0) -> ArithmeticTask:
    return ArithmeticTask(cfg.min_operand, cfg.max_operand, cfg.operations, cfg.seed + seed_offset, cfg.steps)


def prompt_encoder(data: DataConfig, tokenizer, max_model_len: int, max_new_tokens: int) -> PromptEncoder:
    limit = data.max_prompt_tokens if data.max_prompt_tokens is not None else max_model_len - max_new_tokens
    return PromptEncoder(data, tokenizer, limit)


def build_prompt_sources(
    cfg: TroupeConfig, tokenizer
) -> tuple[ArithmeticCursor | DatasetCursor, PromptSet | None]:
    """The training cursor and the evaluation set (None without data.eval) the run's config describes."""
    encoder = prompt_encoder(cfg.data, tokenizer, cfg.generator.max_model_len, cfg.generator.max_new_tokens)
    return train_cursor(cfg.data, cfg.task, encoder), eval_prompt_set(
        cfg.data, cfg.task, encoder, cfg.eval.prompts
    )


def train_cursor(data: DataConfig, task: TaskConfig, encoder: PromptEncoder):
    if data.train == BUILTIN_ARITHMETIC:
        return ArithmeticCursor(arithmetic_task(task), encoder, data.prompts_per_iteration)
    sha256 = content_sha256(data.train)
    prompts = load_prompt_set(data.train, data.split, encoder, name="train")
    return DatasetCursor(prompts, data.prompts_per_iteration, data.shuffle, data.seed, sha256)


def eval_prompt_set(
    data: DataConfig, task: TaskConfig, encoder: PromptEncoder, count: int
) -> PromptSet | None:
    """The first `count` usable eval prompts; None without data.eval."""
    if not data.eval:
        return None
    if data.eval == BUILTIN_ARITHMETIC:
        prompts = arithmetic_prompts(arithmetic_task(task, EVAL_SEED_OFFSET), encoder, count, 0)
        return PromptSet(BUILTIN_ARITHMETIC, prompts, rows=count)
    return load_prompt_set(data.eval, data.eval_split, encoder, limit=count, name="eval")


def _field(row: dict, path: str, key_name: str):
    """row["a"]["b"] for "a.b", list positions as numbers ("turns.0"); a missing field is a skipped row."""
    value = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise SkipRow("missing_key", f"no field {path!r} ({key_name})")
    if value is None:
        raise SkipRow("missing_key", f"field {path!r} ({key_name}) is null")
    return value
