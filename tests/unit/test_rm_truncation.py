"""The reward models' truncation rule on long conversations: the system block and the last user turn stay, earlier
turns go first (whole user-led turns, so a template that insists on alternating roles still renders), then the
middle of the last user turn; `Encoded.cut` says so. Tiny local tokenizer, no model, no Ray."""

import pytest
from transformers import AutoTokenizer

from troupe.actors.models import resolve_model
from troupe.actors.reward.backbone import encode, fit_prompt

# A template in the style of strict ones (Mistral, Gemma): roles after the system message must alternate.
STRICT = (
    "{% for m in messages %}"
    "{% if m['role'] != 'system' and ((m['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] == "
    "'system' else 0))) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    t = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))
    t.chat_template = STRICT
    return t


def _conversation(last_words: int = 5):
    conv = [{"role": "system", "content": "Be brief and kind."}]
    for i in range(4):
        conv.append({"role": "user", "content": f"old question {i} " + "filler " * 15})
        conv.append({"role": "assistant", "content": f"old answer {i} " + "reply " * 10})
    last = "FIRST " + " ".join(f"w{i}" for i in range(last_words)) + " LAST QUESTION?"
    return conv + [{"role": "user", "content": last}]


def _length(tok, messages):
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def test_a_prompt_that_fits_is_untouched(tok):
    conv = _conversation()
    messages, cut = fit_prompt(tok, conv, 10_000)
    assert messages == conv and not cut
    enc = encode(tok, conv, "fine", 10_000)
    assert not enc.cut


def test_earlier_turns_go_first_oldest_first(tok):
    conv = _conversation()
    # Room for the system block, the last two old turns and the final question, not for all four old turns.
    budget = _length(tok, conv[:1] + conv[5:]) + 2
    messages, cut = fit_prompt(tok, conv, budget)
    assert cut and messages == conv[:1] + conv[5:]  # old turns 0 and 1 dropped, whole, oldest first
    assert _length(tok, messages) <= budget


def test_then_the_middle_of_the_last_user_turn(tok):
    conv = _conversation(last_words=200)
    budget = _length(tok, [conv[0], {"role": "user", "content": ""}]) + 40
    messages, cut = fit_prompt(tok, conv, budget)
    assert cut and messages[0] == conv[0] and len(messages) == 2  # system block + the cut last turn
    text = messages[1]["content"]
    assert text.startswith("FIRST w0") and text.endswith("LAST QUESTION?") and " ... " in text
    assert _length(tok, messages) <= budget
    enc = encode(tok, conv, "an answer", 2 * budget)
    assert enc.cut and enc.response_start <= budget
    assert tok.decode(list(enc.input_ids[: enc.response_start])).startswith("<|im_start|>system\nBe brief")


def test_a_long_response_is_cut_and_says_so(tok):
    prompt = [{"role": "user", "content": "Hi"}]
    short, long = encode(tok, prompt, "ok", 64), encode(tok, prompt, "word " * 200, 64)
    assert not short.cut and long.cut and len(long.input_ids) == 64
