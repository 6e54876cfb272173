"""Multi-turn token ids (actors/envs/trajectory.py): the ids after any number of turns equal the chat template's
rendering of the whole conversation, observations are masked out of the loss and carry no log-prob or version."""

import pytest
from transformers import AutoTokenizer

from troupe.actors.envs.trajectory import OBSERVATION, TWO_TURN_BASE, Trajectory, TurnEncoder
from troupe.actors.models import resolve_model
from troupe.actors.protocol import Prompt


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(
        resolve_model("builtin:tiny-llama")
    )  # SmolLM2's tokenizer and template


def _sampled(tokenizer, text):
    """What an engine returns for a turn that writes `text` and ends with EOS."""
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_ids_after_every_turn_equal_the_templated_conversation(tokenizer):
    encoder = TurnEncoder(tokenizer)
    first = [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "127 * 48?"}]
    traj = Trajectory(Prompt("p", (), "127 * 48?"), 0, encoder.first(first), list(first))
    turns = [
        ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "127*48"}}\n</tool_call>', 3),
        ("Let me check: <tool_call>{}</tool_call>", 4),
        ("The answer is 6096.", None),
    ]
    observations = [[{"role": "tool", "content": "6096"}], [{"role": "tool", "content": "error: bad call"}]]
    for i, (text, version) in enumerate(turns):
        ids = _sampled(tokenizer, text)
        traj.add_turn(ids, [-0.5] * len(ids), version or 5, text)
        if i < len(observations):
            obs_ids = encoder.observation(observations[i], ids[-1])
            traj.add_observation(observations[i], obs_ids, reward=0.25)
            rendered = tokenizer.apply_chat_template(
                traj.messages, tokenize=False, add_generation_prompt=True
            )
            assert traj.context() == tokenizer(rendered, add_special_tokens=False).input_ids
    # the last turn ended with EOS: the whole conversation, as the template renders it, minus the trailing "\n"
    rendered = tokenizer.apply_chat_template(traj.messages, tokenize=False)
    expected = tokenizer(rendered, add_special_tokens=False).input_ids
    assert traj.context() == expected[: len(traj.context())] and len(expected) - len(traj.context()) == 1
    generated = sum(len(_sampled(tokenizer, t)) for t, _ in turns)
    assert sum(traj.loss_mask) == generated and len(traj.loss_mask) == len(traj.ids)
    for i, m in enumerate(traj.loss_mask):
        assert (traj.versions[i] == OBSERVATION) == (m == 0) and (traj.logprobs[i] == 0.0) == (m == 0)
    assert [traj.loss_mask[e] for e in traj.turn_ends] == [1, 1, 1] and traj.turns == 3
    assert traj.turn_rewards == [0.25, 0.25, 0.0]
    assert sorted(set(traj.versions)) == [OBSERVATION, 3, 4, 5]


def test_a_turn_stopped_on_another_token_gets_the_end_token_as_an_observation(tokenizer):
    encoder = TurnEncoder(tokenizer)
    obs = [{"role": "user", "content": "And now?"}]
    after_eos = encoder.observation(obs, tokenizer.eos_token_id)
    after_other = encoder.observation(obs, 0)
    assert after_other == [tokenizer.eos_token_id, *after_eos]
    assert tokenizer.decode(after_eos).startswith("\n<|im_start|>user\nAnd now?")
    assert tokenizer.decode(after_eos).endswith("<|im_start|>assistant\n")


def test_tool_schemas_reach_a_template_that_renders_them(tokenizer):
    schema = {"type": "function", "function": {"name": "calculator", "description": "d", "parameters": {}}}
    renders = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = renders
        encoder = TurnEncoder(tokenizer)
        with_tools = tokenizer.decode(encoder.first([{"role": "user", "content": "2*3?"}], [schema]))
        assert with_tools.startswith('<tools>[{"type": "function"') and '"name": "calculator"' in with_tools
        assert "<tools>" not in tokenizer.decode(encoder.first([{"role": "user", "content": "2*3?"}]))
    finally:
        tokenizer.chat_template = original
    ignores = TurnEncoder(tokenizer)  # SmolLM2's template ignores tools: the same ids either way
    message = [{"role": "user", "content": "2*3?"}]
    assert ignores.first(message, [schema]) == ignores.first(message)


QWEN3_LIKE = (  # re-renders an earlier assistant turn without its <think> block, as Qwen3's template does
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
    "{% elif m['role'] == 'assistant' %}<think>\n\n</think>\n\n{{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2_LIKE = (  # user turns carry no EOS; only an assistant turn ends with it
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template", [QWEN3_LIKE, LLAMA2_LIKE])
def test_observations_continue_templates_that_rerender_turns_or_end_only_replies(tokenizer, template):
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = template
        encoder = TurnEncoder(tokenizer)
        first = [{"role": "user", "content": "127 * 48?"}]
        traj = Trajectory(Prompt("p", (), "q"), 0, encoder.first(first), list(first))
        ids = _sampled(tokenizer, "Let me compute.")
        traj.add_turn(ids, [0.0] * len(ids), 1, "Let me compute.")
        obs = [{"role": "user", "content": "Go on."}]
        traj.add_observation(obs, encoder.observation(obs, ids[-1]), 0.0)
        rendered = tokenizer.apply_chat_template(traj.messages, tokenize=False, add_generation_prompt=True)
        expected = tokenizer(rendered, add_special_tokens=False).input_ids
        if template is QWEN3_LIKE:
            # the observation is exactly the new turn; a base with an assistant turn could not be continued
            # (the template renders that turn differently once it is not the last)
            after = tokenizer.decode(traj.ids[len(ids) :])
            assert after == "\n<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n"
            two = tokenizer.apply_chat_template(TWO_TURN_BASE, tokenize=False)
            assert not tokenizer.apply_chat_template([*TWO_TURN_BASE, *obs], tokenize=False).startswith(two)
        else:
            assert traj.context() == expected
    finally:
        tokenizer.chat_template = original
