"""Reward-model features: the chat template's end-of-turn token (three template styles), one truncation rule for
training and serving (tests/unit/test_rm_truncation.py has the rule's cases), and the debiasing lambda stored in a
gating bundle. Tiny local model, no Ray."""

import pytest
import torch
from transformers import AutoTokenizer

from troupe.actors.models import resolve_model
from troupe.actors.reward.backbone import encode
from troupe.actors.reward.bundle import BundleInfo, load_bundle, save_bundle
from troupe.cluster.data.preferences import Preference
from troupe.cluster.jobs.rm_training import tokenize_for_rm, train_gating_stage

# Templates written for these tests in the style of Llama-3 and Gemma (content trimmed, own end-of-turn token).
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_STYLE = (
    "{{ '<bos>' }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
STYLES = {
    "smollm2": (None, "<|im_end|>"),
    "llama3": (LLAMA3_STYLE, "<|eot_id|>"),
    "gemma": (GEMMA_STYLE, "<end_of_turn>"),
}


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("builtin:tiny-llama")


def _tokenizer(model_path, style):
    tok = AutoTokenizer.from_pretrained(model_path)
    template, _ = STYLES[style]
    if template is not None:
        tok.add_tokens(
            ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
            + ["<bos>", "<start_of_turn>", "<end_of_turn>"],
            special_tokens=True,
        )
        tok.chat_template = template
    return tok


@pytest.mark.parametrize("style", sorted(STYLES))
def test_response_feature_sits_on_the_templates_end_of_turn_token(model_path, style):
    tok = _tokenizer(model_path, style)
    eot = tok.convert_tokens_to_ids(STYLES[style][1])
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    enc = encode(tok, prompt, "Answer: 4", 128)
    assert enc.input_ids[-1] == eot  # read here: the end of the assistant turn, not an appended eos_token
    assert enc.input_ids[enc.prompt_end] == eot  # the end of the user turn (ArmoRM's prompt feature)
    assert enc.prompt_end < enc.response_start
    body = tok.decode(list(enc.input_ids[enc.response_start : -1]))
    assert body == "Answer: 4"
    if style != "smollm2":  # SmolLM2's eos is its end-of-turn token; the others must not gain one
        assert tok.eos_token_id not in enc.input_ids
    # The text the template renders for the whole conversation (assistant message included), up to and
    # including the end-of-turn token of the assistant turn.
    full = tok.apply_chat_template(
        prompt + [{"role": "assistant", "content": "Answer: 4"}], add_generation_prompt=False, tokenize=False
    )
    end = full.rindex(STYLES[style][1]) + len(STYLES[style][1])
    assert tok.decode(list(enc.input_ids)) == full[:end]


@pytest.mark.parametrize("style", ["smollm2", "llama3"])
def test_training_and_serving_truncate_the_same_way(model_path, style):
    tok = _tokenizer(model_path, style)
    eot = tok.convert_tokens_to_ids(STYLES[style][1])
    prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(120))}]
    chosen = " ".join(f"yes{i}" for i in range(80))
    rejected = "no"
    max_length = 96  # the prompt's 48 tokens leave room for part of the user turn beside the system block
    pairs, cut = tokenize_for_rm([Preference(prompt, chosen, rejected, "t:1")], tok, max_length)
    pair = pairs[0]
    served_c, served_r = encode(tok, prompt, chosen, max_length), encode(tok, prompt, rejected, max_length)
    assert pair.prompt_ids + pair.chosen_ids == served_c.input_ids
    assert pair.prompt_ids + pair.rejected_ids == served_r.input_ids
    assert len(served_c.input_ids) == max_length and served_c.input_ids[-1] == eot
    assert served_r.input_ids[-1] == eot
    assert cut == 1 and served_c.cut and served_r.cut  # both sides share the cut prompt
    # The rule: the prompt fits in max_length // 2 with the user turn's middle cut (its start and end stay, and
    # SmolLM2's default system block too); the response keeps its first tokens.
    assert len(pair.prompt_ids) <= max_length // 2
    text = tok.decode(list(pair.prompt_ids))
    assert "word0 " in text and " ... " in text and "word119" in text
    if style == "smollm2":
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    words = tok.decode(list(pair.chosen_ids[:-1])).split()
    assert words[0] == "yes0" and len(words) >= 5


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"], ids=["bf16", "fp32"])
def test_gating_bundle_stores_the_true_lambda_bf16_and_fp32(model_path, tmp_path, dtype):
    hidden = 64  # the tiny model's width
    torch.manual_seed(0)
    w_verbose = torch.randn(hidden) * 0.1
    w_quality = 0.5 * w_verbose + 0.05 * torch.randn(hidden)  # quality tracks verbosity: 0 < lambda < 1
    stage1 = save_bundle(
        tmp_path / "stage1",
        BundleInfo("armo", model_path, 48, ["quality", "verbosity"]),
        {"regression": torch.stack([w_quality, w_verbose]), "transform": torch.eye(2)},
    )
    prefs = [
        Preference([{"role": "user", "content": f"Q{i}?"}], "ok " * (1 + i % 3), "long answer " * (2 + i), "")
        for i in range(12)
    ]
    out, stats = train_gating_stage(
        stage1, prefs, tmp_path / "stage2", tmp_path / "cache", verbosity="verbosity", steps=3,
        batch_size=8, hidden=8, n_hidden=1, dropout=0.0, dtype=dtype,
    )  # fmt: skip
    info, tensors = load_bundle(out)
    lam = [stats["debias"][o]["lambda"] for o in info.objectives]
    assert tensors["lambda"].tolist() == pytest.approx(lam)
    # lambda is what the transform subtracts: (r M)_i = r_i - lambda_i r_v for i != v; (r M)_v = 0
    m = tensors["transform"]
    r = torch.tensor([[0.3, 0.7]])
    assert (r @ m)[0, 0].item() == pytest.approx(0.3 - lam[0] * 0.7)
    assert (r @ m)[0, 1].item() == pytest.approx(0.0)
    assert 0 < lam[0] < 1 and lam[1] == 1.0
