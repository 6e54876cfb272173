"""The built-in environments.

ToolEnv (`env.target: troupe.actors.envs.builtin:ToolEnv`): the model may call tools (the sandboxed calculator by
default); each call's result comes back as a tool message, and the trajectory ends at a turn without a call (the
final answer, which the reward hierarchy scores). Malformed calls, unknown tools and tools that raise become an
error observation the model can read and correct, counted in env/tool_errors.

FollowUpEnv (`env.target: troupe.actors.envs.builtin:FollowUpEnv`): a data-driven conversation. The prompt's
metadata holds the user turns (`data.meta_keys: [turns]`, MT-Bench's question.jsonl); after each assistant turn
the next user turn comes back, and the trajectory ends after the last one.
"""

from __future__ import annotations

import json

from troupe.actors.envs.protocol import EnvError, StepResult
from troupe.actors.envs.tools import Tool, ToolCallError, calculator_tool, parse_hermes
from troupe.actors.plugins import load_object

TOOL_SYSTEM_PROMPT = (
    "You can call tools. To call one, write on its own line:\n"
    '<tool_call>\n{"name": <tool name>, "arguments": {<arguments>}}\n</tool_call>\n'
    "and stop; the result comes back in the next message. When you know the answer, reply without a tool call.\n"
    "Tools:\n{schemas}"
)


class ToolEnv:
    def __init__(
        self,
        tools=None,
        parser=None,
        system_prompt: str | None = TOOL_SYSTEM_PROMPT,
        keep_system: bool = True,
        repeats_end: bool = False,
    ):
        # tools: Tool objects or import paths of factories returning one (default: the calculator)
        self.tools: list[Tool] = [
            load_object(t, "env.kwargs.tools")() if isinstance(t, str) else t
            for t in (tools or [calculator_tool()])
        ]
        self.by_name = {t.name: t for t in self.tools}
        self.parse = load_object(parser, "env.kwargs.parser") if parser else parse_hermes
        self.system_prompt = system_prompt  # "{schemas}" in it becomes the tools' JSON schemas
        self.keep_system = keep_system  # False: it replaces the prompt's own system turn
        # True: a turn whose every call repeats one made earlier in the trajectory is final (with parse_equations,
        # an answer that restates its checked equation); otherwise repeats run again
        self.repeats_end = repeats_end
        self.made: set[str] = set()

    def reset(self, prompt) -> list[dict]:
        """The prompt's chat, with the tools described in the system turn (for templates that ignore `tools=`;
        with one that renders them, set system_prompt to null: the schemas reach the template anyway)."""
        messages = prompt.chat()
        if not self.system_prompt:
            return messages
        schemas = "\n".join(json.dumps(t.schema()["function"]) for t in self.tools)
        described = self.system_prompt.replace("{schemas}", schemas)
        if messages[0]["role"] == "system" and not self.keep_system:
            messages = messages[1:]
        if messages[0]["role"] == "system":
            return [{"role": "system", "content": messages[0]["content"] + "\n\n" + described}, *messages[1:]]
        return [{"role": "system", "content": described}, *messages]

    def step(self, message: dict) -> StepResult:
        try:
            calls = self.parse(message["content"])
        except ToolCallError as e:
            return StepResult(
                [_tool_message("error", f"error: {e}")], counts={"tool_errors": 1, "malformed": 1}
            )
        keys = [json.dumps([c.name, c.arguments], sort_keys=True, default=str) for c in calls]
        if not calls or (self.repeats_end and self.made.issuperset(keys)):
            return StepResult(done=True)
        self.made.update(keys)
        results, errors = [], 0
        for call in calls:
            tool = self.by_name.get(call.name)
            try:
                if tool is None:
                    raise ToolCallError(f"no tool named {call.name!r}; tools: {sorted(self.by_name)}")
                results.append(_tool_message(call.name, tool.run(call.arguments)))
            except Exception as e:  # noqa: BLE001 - a failing tool is the model's observation, counted
                errors += 1
                results.append(_tool_message(call.name, f"error: {e}"))
        return StepResult(results, counts={"tool_calls": len(calls), "tool_errors": errors})


class FollowUpEnv:
    def __init__(self, turns_key: str = "turns"):
        self.turns_key = turns_key
        self.turns: list[str] = []
        self.next_turn = 1

    def reset(self, prompt) -> list[dict]:
        turns = prompt.meta_value(self.turns_key)
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise EnvError(
                f"prompt {prompt.uid}: meta {self.turns_key!r} must be a list of user turns (strings)"
            )
        self.turns = turns
        return prompt.chat()

    def step(self, message: dict) -> StepResult:
        if self.next_turn >= len(self.turns):
            return StepResult(done=True)
        turn = self.turns[self.next_turn]
        self.next_turn += 1
        return StepResult([{"role": "user", "content": turn}])


def _tool_message(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}
