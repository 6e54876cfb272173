"""Tools the model may call, and the parsing of its calls out of generated text.

A tool is a Python function with a JSON schema for its arguments. The schemas reach the model through its chat
template's `tools=` support (or the system turn, for templates without it); calls are read from the generation
by a parser, by default the Hermes / Qwen format:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "127 * 48"}}
    </tool_call>

A parser is any callable `text -> list[ToolCall]` that raises ToolCallError on a malformed call; name your own with
`env.kwargs.parser: mypkg.parsers:parse_my_format`. `parse_calc_annotations` reads GSM8K-style calculator
annotations (`<<57*25>>`, `<<57*25=1425>>`); `parse_equations` reads every equation the model writes in prose
(`57 x 25 = 1115` calls 57*25), the form a small model writes unprompted, so the calculator checks its arithmetic. A
malformed call, an unknown tool, arguments that do not match the schema, or a tool that raises all become an error
observation the model sees, and are counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_CALLS_PER_TURN = 8
MAX_RESULT_CHARS = 2000  # a tool result longer than this is cut, so one call cannot flood the context

JSON_TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
}


class ToolCallError(ValueError):
    """A call the model wrote that cannot be run; the message is shown to the model."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema of type "object"
    fn: Callable[..., Any] = field(compare=False)

    def schema(self) -> dict:
        """The OpenAI-style function schema chat templates take in `tools=`."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def check(self, arguments: dict) -> None:
        """ToolCallError naming the argument when `arguments` do not match the schema's properties and required."""
        props = self.parameters.get("properties", {})
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if missing:
            raise ToolCallError(f"{self.name}: missing argument(s) {missing}")
        unknown = sorted(set(arguments) - set(props))
        if unknown:
            raise ToolCallError(f"{self.name}: unknown argument(s) {unknown}; it takes {sorted(props)}")
        for key, value in arguments.items():
            expected = JSON_TYPES.get(props[key].get("type"), object)
            if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
                raise ToolCallError(
                    f"{self.name}: argument {key}={value!r} should be a {props[key].get('type')}"
                )

    def run(self, arguments: dict) -> str:
        self.check(arguments)
        result = self.fn(**arguments)
        text = result if isinstance(result, str) else json.dumps(result)
        return text[:MAX_RESULT_CHARS]


HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def _bounded(calls: list[ToolCall]) -> list[ToolCall]:
    if len(calls) > MAX_CALLS_PER_TURN:
        raise ToolCallError(f"{len(calls)} tool calls in one turn (at most {MAX_CALLS_PER_TURN})")
    return calls


def parse_hermes(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` in `text` (an unclosed last one is read to the end of the text, as a
    generation stopped at the closing tag leaves it). ToolCallError on the first malformed call."""
    calls = []
    for body in HERMES_CALL.findall(text):
        try:
            obj = json.loads(body.strip())
        except ValueError as e:
            raise ToolCallError(f"tool call is not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ToolCallError('tool call must be a JSON object {"name": ..., "arguments": {...}}')
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):  # some models encode the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise ToolCallError(f"{obj['name']}: arguments are not a JSON object") from None
        if not isinstance(arguments, dict):
            raise ToolCallError(
                f"{obj['name']}: arguments must be a JSON object, got {type(arguments).__name__}"
            )
        calls.append(ToolCall(obj["name"], arguments))
    return _bounded(calls)


CALC_ANNOTATION = re.compile(r"<<([^<>]*?)(?:>>|$)", re.DOTALL)
MAX_EXPRESSION_CHARS = 200


def _calculator_calls(expressions) -> list[ToolCall]:
    """Calculator calls for `expressions`, each and their number bounded."""
    for expression in expressions:
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise ToolCallError(
                f"calculation of {len(expression)} characters (at most {MAX_EXPRESSION_CHARS})"
            )
    return _bounded([ToolCall("calculator", {"expression": e}) for e in expressions])


def parse_calc_annotations(text: str) -> list[ToolCall]:
    """Every `<<expression>>` in `text` as a calculator call; a result the model wrote itself after `=` is
    ignored (`<<57*25=1425>>` calls 57*25), and an unclosed last one is read to the end of the text."""
    expressions = [body.split("=", 1)[0].strip() for body in CALC_ANNOTATION.findall(text)]
    if "" in expressions:
        raise ToolCallError("empty calculation: write it as <<12*34>>")
    return _calculator_calls(expressions)


# Linear-time by construction: possessive quantifiers, a match starts only at a whole number (not inside "7:50",
# "12.5.3", "1e5", "2x"), and the `=` after a chain is checked separately rather than by a lookahead.
NUMBER = r"\d[\d,]*+(?:\.\d+)?+"
OPERATOR = r"(?:\s*[-+*/×÷]\s*|\s+x\s+)"  # a prose "x" only between spaces: "2x + 3" is algebra, "0x10" hex
CHAIN = re.compile(rf"(?<![\w.,:/)-])-?\(?{NUMBER}\)?(?:{OPERATOR}\(?{NUMBER}\)?)++")
EQUALS = re.compile(r"\s*=(?!=)")
DATE = re.compile(r"\d+([-/])\d+\1\d+")  # 2023-12-01, 12/25/2023: not a calculation
PROSE_OPERATORS = str.maketrans({"x": "*", "×": "*", "÷": "/", ",": None})


def _balanced(expression: str) -> str:
    """Without the unmatched parentheses prose wraps around an equation, as in "(57 * 25 = 1425)"."""
    while expression.startswith("(") and expression.count("(") > expression.count(")"):
        expression = expression[1:]
    while expression.endswith(")") and expression.count(")") > expression.count("("):
        expression = expression[:-1]
    return expression


def parse_equations(text: str) -> list[ToolCall]:
    """Each distinct `<number> <op> <number> ... =` in `text`, in order, as a calculator call (x, × and ÷ read as
    * and /, thousands separators dropped); the model's own result after `=` is ignored."""
    expressions = {}
    for m in CHAIN.finditer(text):
        if not EQUALS.match(text, m.end()) or DATE.fullmatch(m.group(0)):
            continue
        expressions[_balanced(m.group(0).translate(PROSE_OPERATORS).strip())] = None
    return _calculator_calls(list(expressions))


def calculator_tool(calculator=None) -> Tool:
    """The sandboxed calculator as a tool (see calculator.py)."""
    from troupe.actors.envs.calculator import shared_calculator

    calc = calculator or shared_calculator()
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression with + - * / // % ** and parentheses; returns the number.",
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example '127 * 48'"}},
            "required": ["expression"],
        },
        fn=lambda expression: calc.evaluate(expression),
    )
