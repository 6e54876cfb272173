"""Rollout generation: the `Generator` actor and its inference backends (vLLM, transformers)."""
