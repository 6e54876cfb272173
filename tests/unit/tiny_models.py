"""Tiny random Llama models built in memory for unit tests of the learner's math (no files, no tokenizer)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_lm(dtype=torch.float32, seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(LlamaConfig(**(settings | overrides))).to(dtype).eval()
