"""The transformers generator backend samples from exactly softmax(logits / T) (what the learner models): a
checkpoint whose generation_config asks for a repetition penalty, top-k and n-gram blocking does not change the
distribution, and transformers' top-k default of 50 is off."""

import pytest
import torch
from transformers import GenerationConfig

from tests.unit.tiny_models import llama3_style_tokenizer, tiny_lm
from troupe.actors.generator.hf_backend import HFBackend
from troupe.actors.generator.sampling import Sampling


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-sampling")
    tokenizer = llama3_style_tokenizer()
    model = tiny_lm(
        vocab_size=len(tokenizer), initializer_range=0.05
    )  # a broad distribution: top-k would bite
    model.generation_config = GenerationConfig(
        repetition_penalty=1.5, top_k=3, no_repeat_ngram_size=2, temperature=0.3, do_sample=True
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_reported_log_probs_are_those_of_the_configured_distribution(model_dir, temperature):
    backend = HFBackend(str(model_dir), "float32", seed=0, trust_remote_code=False)
    prompt = [5, 17, 42, 8]
    (group,) = backend.generate([prompt], Sampling(n=3, temperature=temperature, max_new_tokens=12))
    for completion in group:
        ids = torch.tensor([prompt + list(completion.token_ids)])
        with torch.no_grad():
            logits = backend.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        expected = (logits / temperature).log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5)
