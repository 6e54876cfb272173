"""Reward backbone encoding and the feature cache, on the tiny local model (no Ray)."""

import pytest
import torch

from troupe.actors.models import resolve_model
from troupe.actors.reward.backbone import RewardBackbone, encode, gather_rows


@pytest.fixture(scope="module")
def backbone():
    return RewardBackbone(resolve_model("builtin:tiny-llama"), max_length=48)


def test_prompt_feature_sits_at_the_end_of_the_user_turn(backbone):
    tok = backbone.tokenizer
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    enc = encode(tok, prompt, "Answer: 4", 48)
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    head = head["input_ids"] if not isinstance(head, list) else head
    kept = head[-(48 // 2) :]  # the prompt keeps its last max_length // 2 tokens
    assert enc.input_ids[: enc.response_start] == tuple(kept)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids[enc.prompt_end] == im_end and enc.prompt_end < enc.response_start
    assert enc.input_ids[-1] == im_end  # SmolLM2's end-of-turn token closes the assistant turn
    long = encode(tok, [{"role": "user", "content": "word " * 200}], "Answer: 4", 48)
    assert len(long.input_ids) <= 48 and long.input_ids[-1] == im_end  # prompt cut from the left
    assert long.input_ids[long.prompt_end] == im_end


def test_features_are_independent_of_padding(backbone):
    prompts = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hello there, how are you?"}],
    ]
    responses = ["Short.", "A much longer answer with several more words in it."]
    batched, _ = backbone.features(prompts, responses, batch_size=2)
    alone = torch.cat(
        [backbone.features([p], [r], batch_size=1)[0] for p, r in zip(prompts, responses, strict=True)]
    )
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    h = torch.arange(24.0).view(2, 3, 4)
    assert gather_rows(h, torch.tensor([2, 0])).tolist() == [h[0, 2].tolist(), h[1, 0].tolist()]
