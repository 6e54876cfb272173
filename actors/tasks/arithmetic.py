"""Arithmetic word problems generated on the fly, each with a checkable integer answer.

Pure Python (no torch, no Ray): the driver samples problems, the reward shard checks answers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "coins", "cards", "eggs")

# Each template: (operation, text). {a} and {b} are operands; subtraction always has a >= b.
TEMPLATES = (
    ("+", "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"),
    ("+", "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in all?"),
    ("-", "{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left?"),
    ("-", "A jar holds {a} {item}. {name} takes out {b}. How many {item} are still in the jar?"),
    ("*", "{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?"),
)

# A one-shot system prompt: measured on SmolLM2-135M-Instruct (24 prompts x 4 samples, T=0.7, operands 1-9),
# it lifts the 'Answer:' format rate from 0.21 to 0.78 and accuracy to 0.18, with half the groups mixed (signal).
SYSTEM_PROMPT = (
    "You solve arithmetic word problems. Reply with one short sentence of working, then 'Answer: <number>'.\n"
    "Example:\nQuestion: Tom has 3 pens and buys 4 more. How many pens does Tom have?\nReply: 3 + 4 = 7. Answer: 7"
)

# Multi-step problems (steps > 1): a start, then one sentence per further operation, then the question.
START = "{name} has {a} {item}."
STEPS = (
    ("+", "Then {name} gets {b} more {item}."),
    ("+", "A friend gives {name} {b} more {item}."),
    ("-", "Then {name} gives {b} {item} away."),
    ("-", "{name} loses {b} of the {item}."),
    ("*", "Then the number of {item} {name} has grows {b} times."),
)
QUESTION = "How many {item} does {name} have now?"
MULTI_STEP_SYSTEM_PROMPT = (
    "You solve arithmetic word problems. Work step by step in one short line, then write 'Answer: <number>'.\n"
    "Example:\nQuestion: Tom has 3 pens. Then Tom gets 4 more pens. Then Tom gives 2 pens away. How many pens "
    "does Tom have now?\nReply: 3 + 4 = 7, 7 - 2 = 5. Answer: 5"
)

_ANSWER_LINE = re.compile(r"answer\s*[:=]\s*\$?\s*(-?\d[\d,]*)", re.IGNORECASE)
_ANY_INT = re.compile(r"-?\d[\d,]*")


@dataclass(frozen=True)
class Problem:
    uid: str
    question: str
    answer: int
    operation: str


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems whose operands lie in [min_operand, max_operand], with the given operations."""

    min_operand: int = 1
    max_operand: int = 9
    operations: str = "+-"
    seed: int = 0
    steps: int = 1  # operations per problem

    def __post_init__(self) -> None:
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(
                f"task.min_operand ({self.min_operand}) and task.max_operand ({self.max_operand}): need "
                "0 <= min_operand <= max_operand"
            )
        unknown = set(self.operations) - {"+", "-", "*"}
        if unknown or not self.operations:
            raise ValueError(
                f"task.operations must be a non-empty string over '+-*', got {self.operations!r}"
            )
        if self.steps > 1 and not set(self.operations) & {"+", "*"}:
            raise ValueError(
                "task.steps > 1 needs '+' or '*' in task.operations (a running total to subtract from)"
            )

    def sample(self, count: int, iteration: int) -> list[Problem]:
        """Deterministic in (seed, iteration): a resumed run sees the same prompts."""
        rng = random.Random(f"{self.seed}:{iteration}")
        if self.steps > 1:
            return [self._multi_step(rng, f"arith-{self.seed}-{iteration}-{i}") for i in range(count)]
        templates = [t for t in TEMPLATES if t[0] in self.operations]
        problems = []
        for i in range(count):
            op, text = rng.choice(templates)
            a = rng.randint(self.min_operand, self.max_operand)
            b = rng.randint(self.min_operand, self.max_operand)
            if op == "-" and b > a:
                a, b = b, a
            answer = {"+": a + b, "-": a - b, "*": a * b}[op]
            question = text.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
            problems.append(
                Problem(
                    uid=f"arith-{self.seed}-{iteration}-{i}", question=question, answer=answer, operation=op
                )
            )
        return problems

    def _multi_step(self, rng: random.Random, uid: str) -> Problem:
        """A running total through `steps` operations; subtraction never goes below zero, and a product is used
        only while the total stays under 100, so every intermediate result is a small non-negative integer."""
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        total = rng.randint(self.min_operand, self.max_operand)
        sentences, ops = [START.format(name=name, item=item, a=total)], []
        for _ in range(self.steps - 1):
            allowed = [t for t in STEPS if t[0] in self.operations]
            if total < max(1, self.min_operand):
                allowed = [t for t in allowed if t[0] != "-"] or allowed
            op, text = rng.choice(allowed)
            b = rng.randint(self.min_operand, self.max_operand)
            if op == "-":
                b = min(b, total)
            if op == "*":
                b = min(b, 3) if total * min(b, 3) < 100 else 1
            total = {"+": total + b, "-": total - b, "*": total * b}[op]
            sentences.append(text.format(name=name, item=item, b=b))
            ops.append(op)
        sentences.append(QUESTION.format(name=name, item=item))
        return Problem(uid=uid, question=" ".join(sentences), answer=total, operation="".join(ops))

    def system_prompt(self) -> str:
        return SYSTEM_PROMPT if self.steps == 1 else MULTI_STEP_SYSTEM_PROMPT


def chat_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": f"Question: {question}"},
    ]


def extract_answer(text: str) -> int | None:
    """The integer after the last 'Answer:' if there is one, else the last integer in the text."""
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        matches = _ANY_INT.findall(text)
    if not matches:
        return None
    try:
        return int(matches[-1].replace(",", ""))
    except ValueError:
        return None


def has_answer_line(text: str) -> bool:
    return _ANSWER_LINE.search(text) is not None
