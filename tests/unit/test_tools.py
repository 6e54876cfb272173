"""Tool calls (actors/envs/tools.py) and the built-in environments (actors/envs/builtin.py): calls are parsed from
the Hermes format, malformed ones become counted error observations, and MT-Bench's second turn follows the first."""

import json
import re

import pytest

from tests.conftest import SHARED_DATA
from troupe.actors.envs.builtin import FollowUpEnv, ToolEnv
from troupe.actors.envs.protocol import EnvError, StepResult, check_step
from troupe.actors.envs.tools import (
    MAX_RESULT_CHARS,
    Tool,
    ToolCall,
    ToolCallError,
    parse_calc_annotations,
    parse_equations,
    parse_hermes,
)
from troupe.actors.protocol import Prompt

MT_BENCH = SHARED_DATA / "FastChat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def _call(name="calculator", **arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def test_hermes_calls_are_read_in_order():
    text = "Let me compute.\n" + _call(expression="127*48") + "\n" + _call("lookup", key="x")
    assert parse_hermes(text) == [
        ToolCall("calculator", {"expression": "127*48"}),
        ToolCall("lookup", {"key": "x"}),
    ]
    assert parse_hermes("The answer is 6096.") == []
    unclosed = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}'  # stopped at the tag
    assert parse_hermes(unclosed) == [ToolCall("calculator", {"expression": "1+1"})]
    as_string = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}</tool_call>'
    assert parse_hermes(as_string) == [ToolCall("calculator", {"expression": "2"})]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<tool_call>{name: calculator}</tool_call>", "not valid JSON"),
        ("<tool_call></tool_call>", "not valid JSON"),
        ('<tool_call>["calculator"]</tool_call>', "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', "must be a JSON object"),
        (
            '<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>',
            "arguments must be a JSON object",
        ),
        (
            '<tool_call>{"name": "calculator", "arguments": "1+1"}</tool_call>',
            "arguments are not a JSON object",
        ),
        (_call(expression="1") * 9, "9 tool calls in one turn"),
    ],
)
def test_malformed_calls_are_refused_naming_why(text, message):
    with pytest.raises(ToolCallError, match=message):
        parse_hermes(text)


def test_calculator_annotations_are_read_as_calls():
    text = "She pays 57 * 25 = <<57*25=1400>>1400, then <<1400 + 3>> and at last <<(2+3)*4"
    assert parse_calc_annotations(text) == [
        ToolCall("calculator", {"expression": "57*25"}),
        ToolCall("calculator", {"expression": "1400 + 3"}),
        ToolCall("calculator", {"expression": "(2+3)*4"}),
    ]
    assert parse_calc_annotations("57 * 25 = 1425. Answer: 1425") == []
    for bad, message in [
        ("<<>>", "empty calculation"),
        ("<< =5>>", "empty calculation"),
        ("<<" + "1+" * 150 + "1>>", "at most 200"),
        ("<<1>>" * 9, "9 tool calls"),
    ]:
        with pytest.raises(ToolCallError, match=message):
            parse_calc_annotations(bad)


def test_equations_in_prose_are_read_as_calls():
    text = (
        "57 * 25 = 1250 apples, and 1,200 - 300 = 900. Again 57 * 25 = 1425. (2 + 3) × 4 = 20, 3.5 ÷ 7 = 0.5"
    )
    assert [c.arguments["expression"] for c in parse_equations(text)] == [
        "57 * 25",
        "1200 - 300",
        "(2 + 3) * 4",
        "3.5 / 7",
    ]
    assert {c.name for c in parse_equations(text)} == {"calculator"}
    # a lone number, a variable, a word, a time, a date, a version or hex before "=" is no calculation
    prose = (
        "It is 12. In 2023 = a year, x = 5, 57 bags x 25 = 1115, 2x + 3 = 7, 7:50 + 10 = 8:00, 2023-12-01 = "
    )
    assert (
        parse_equations(prose + "today, 12.5.3 + 1 = 2, 1e5 + 2 = 3, 0x10 + 1 = 17, 5 + 3 <= 9, 3, 4 = 7.")
        == []
    )
    for text, expression in [
        ("12 x 3 x 2 = 72", "12 * 3 * 2"),
        ("(57 * 25 = 1425)", "57 * 25"),  # prose parentheses around the equation are not the calculation's
        ("4 + 5) = 9", "4 + 5"),
        ("-5 + 3 = -2", "-5 + 3"),
        ("so 1/2 + 1/4 = 3/4", "1/2 + 1/4"),
    ]:
        assert parse_equations(text) == [ToolCall("calculator", {"expression": expression})], text
    with pytest.raises(ToolCallError, match="9 tool calls"):
        parse_equations(" ".join(f"{i} + 1 = {i + 1}." for i in range(9)))
    # degenerate generations: no call, or one too long; linear-time matching answers these at once
    assert parse_equations("1" * 20_000) == parse_equations("1+" * 10_000) == []
    with pytest.raises(ToolCallError, match="at most 200"):
        parse_equations("1 + " * 5_000 + "1 = 2")


def test_the_tool_env_runs_annotated_calculations_with_the_sandboxed_calculator():
    env = ToolEnv(parser="troupe.actors.envs.tools:parse_calc_annotations", system_prompt=None)
    result = env.step({"role": "assistant", "content": "57 * 25 = <<57*25=1400>>"})
    assert [m["content"] for m in result.observations] == ["1425"]
    assert result.counts == {"tool_calls": 1, "tool_errors": 0} and not result.done
    assert env.step({"role": "assistant", "content": "Answer: 1425"}).done


@pytest.mark.parametrize("repeats_end", [True, False])
def test_a_turn_that_only_restates_its_checked_equations_can_end_the_trajectory(repeats_end):
    env = ToolEnv(
        parser="troupe.actors.envs.tools:parse_equations", system_prompt=None, repeats_end=repeats_end
    )
    assert not env.step({"role": "assistant", "content": "57 * 25 = 1250"}).done
    restated = env.step({"role": "assistant", "content": "So 57 * 25 = 1425. Answer: 1425"})
    assert restated.done is repeats_end
    # a new calculation next to a repeated one is a call either way
    more = env.step({"role": "assistant", "content": "57 * 25 = 1425 and 1425 + 1 = 1426"})
    assert not more.done and more.counts["tool_calls"] == 2


def _prompt(text="What is 127 * 48?", **meta):
    return Prompt("p0", (1, 2), text, "6096", tuple((k, json.dumps(v)) for k, v in meta.items()))


def _echo_tool(fn=lambda text: text):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    return Tool("echo", "echo the text", schema, fn)


def test_the_tool_env_describes_its_tools_and_runs_calls():
    env = ToolEnv()
    first = env.reset(_prompt())
    assert first[0]["role"] == "system" and '"name": "calculator"' in first[0]["content"]
    assert first[1:] == [{"role": "user", "content": "What is 127 * 48?"}]
    result = check_step(env.step({"role": "assistant", "content": _call(expression="127 * 48")}))
    assert result.observations == ({"role": "tool", "name": "calculator", "content": "6096"},)
    assert not result.done and result.counts == {"tool_calls": 1, "tool_errors": 0}
    final = check_step(env.step({"role": "assistant", "content": "127 * 48 = 6096. Answer: 6096"}))
    assert final.done and final.observations == ()


def test_every_kind_of_bad_call_is_an_error_observation_and_counted():
    def raises(text):
        raise RuntimeError("the service is down")

    env = ToolEnv(tools=[_echo_tool(), Tool("broken", "", _echo_tool().parameters, raises)])
    cases = [
        (
            "<tool_call>{oops</tool_call>",
            "error: tool call is not valid JSON",
            {"tool_errors": 1, "malformed": 1},
        ),
        (_call("nope", text="a"), "error: no tool named 'nope'", {"tool_calls": 1, "tool_errors": 1}),
        (
            _call("echo"),
            r"error: echo: missing argument\(s\) \['text'\]",
            {"tool_calls": 1, "tool_errors": 1},
        ),
        (
            _call("echo", text=3),
            "error: echo: argument text=3 should be a string",
            {"tool_calls": 1, "tool_errors": 1},
        ),
        (_call("echo", text="a", x=1), r"unknown argument\(s\) \['x'\]", {"tool_calls": 1, "tool_errors": 1}),
        (_call("broken", text="a"), "error: the service is down", {"tool_calls": 1, "tool_errors": 1}),
    ]
    for content, message, counts in cases:
        result = check_step(env.step({"role": "assistant", "content": content}))
        assert not result.done and len(result.observations) == 1, content
        assert re.search(message, result.observations[0]["content"]), (content, result.observations)
        assert result.counts == counts
    ok = check_step(env.step({"role": "assistant", "content": _call("echo", text="x" * 5000)}))
    assert len(ok.observations[0]["content"]) == MAX_RESULT_CHARS and ok.counts["tool_errors"] == 0


def test_the_calculator_tool_answers_hostile_input_with_an_error():
    env = ToolEnv()
    result = env.step({"role": "assistant", "content": _call(expression="__import__('os').system('id')")})
    assert (
        result.observations[0]["content"].startswith("error: not allowed: Call")
        and result.counts["tool_errors"] == 1
    )


def test_follow_up_env_gives_each_user_turn_then_ends():
    env = FollowUpEnv()
    prompt = _prompt("Write a poem.", turns=["Write a poem.", "Now make it rhyme.", "Shorter."])
    assert env.reset(prompt) == [{"role": "user", "content": "Write a poem."}]
    assert env.step({"role": "assistant", "content": "a"}).observations == [
        {"role": "user", "content": "Now make it rhyme."}
    ]
    assert env.step({"role": "assistant", "content": "b"}).observations[0]["content"] == "Shorter."
    assert env.step({"role": "assistant", "content": "c"}).done
    with pytest.raises(EnvError, match="meta 'turns' must be a list of user turns"):
        FollowUpEnv().reset(_prompt(turns="just one"))


@pytest.mark.skipif(
    not MT_BENCH.is_file(), reason=f"MT-Bench questions not found at {MT_BENCH} (../shared/data)"
)
def test_follow_up_env_on_mt_bench_questions():
    rows = [json.loads(line) for line in MT_BENCH.read_text().splitlines()]
    assert len(rows) == 80 and all(len(r["turns"]) == 2 for r in rows)
    for row in rows[:5]:
        env = FollowUpEnv()
        assert env.reset(_prompt(row["turns"][0], turns=row["turns"]))[0]["content"] == row["turns"][0]
        second = check_step(env.step({"role": "assistant", "content": "..."}))
        assert second.observations == ({"role": "user", "content": row["turns"][1]},) and not second.done
        assert check_step(env.step({"role": "assistant", "content": "..."})).done


@pytest.mark.parametrize(
    "value, message",
    [
        ("done", "expected a StepResult, got str"),
        (StepResult(reward=float("nan"), done=True), "reward=nan is not a finite number"),
        (StepResult(reward=float("inf"), done=True), "reward=inf is not a finite number"),
        (StepResult(reward=True, done=True), "reward=True"),
        (StepResult(done=1), "done=1 is not a bool"),
        (StepResult(), "not done but no observation"),
        (StepResult([{"role": "user"}]), r"observations\[0\]: expected"),
        (StepResult([{"role": "robot", "content": "x"}]), r"observations\[0\]: expected"),
        (StepResult([{"role": "assistant", "content": "x"}]), "cannot speak as the assistant"),
        (StepResult([{"role": "user", "content": "x" * 30_000}]), "content of 30000 characters"),
        (StepResult("not a list", done=True), "expected a list of messages, got str"),
    ],
)
def test_a_bad_step_result_is_refused_naming_the_field(value, message):
    with pytest.raises(EnvError, match=message):
        check_step(value)


def test_the_tool_env_can_replace_the_prompts_system_turn():
    prompt = Prompt("p", (1,), "q", messages=(("system", "Answer directly."), ("user", "2 * 3?")))
    kept = ToolEnv(system_prompt='Call {"name": ...} like this. Tools: {schemas}').reset(prompt)
    assert kept[0]["content"].startswith('Answer directly.\n\nCall {"name": ...} like this. Tools: {')
    replaced = ToolEnv(system_prompt="Use tools: {schemas}", keep_system=False).reset(prompt)
    assert (
        replaced[0]["content"].startswith("Use tools: {") and "Answer directly" not in replaced[0]["content"]
    )
    assert replaced[1:] == [{"role": "user", "content": "2 * 3?"}]
