"""LoRA export: merged weights equal peft's own merge, with plain HF names, and the live model is left unmerged."""

import copy

import torch

from tests.unit.tiny_models import tiny_lm
from troupe.actors.learner import lora
from troupe.actors.learner.config import LoraConfig


def test_merged_state_dict_matches_peft_merge():
    base = tiny_lm(
        vocab_size=64,
        num_hidden_layers=1,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    model = lora.wrap(
        copy.deepcopy(base), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # peft initialises B to zero; make the delta non-trivial
    assert 0 < lora.trainable_fraction(model) < 0.5
    merged = lora.merged_state_dict(model, torch.float32)
    assert set(merged) == set(base.state_dict()) - {k for k in base.state_dict() if "inv_freq" in k}
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], base.state_dict()[q])  # the adapters are folded in
    ids = torch.tensor([[1, 2, 3]])
    with lora.base_model(model):  # adapters off: the frozen base, i.e. the reference policy
        torch.testing.assert_close(model(ids).logits, base(ids).logits)
