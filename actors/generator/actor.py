"""The `Generator` Ray actor: samples n completions per prompt with logprobs and takes versioned weights.

Plain class; the cluster side wraps it with `ray.remote` and the placement it wants.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from actors.generator.sampling import Sampling
from actors.hardware import resolve_dtype
from actors.protocol import Prompt, Rollout, WeightBundle

log = logging.getLogger("troupe.generator")


@dataclass(frozen=True)
class GeneratorSpec:
    model_path: str
    backend: str = "vllm"  # "vllm" or "hf"
    dtype: str = "auto"  # auto: bfloat16 where the hardware has it natively, else float32
    max_model_len: int = 1024
    seed: int = 0
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False


class Generator:
    def __init__(self, spec: GeneratorSpec, replica: int = 0) -> None:
        self.spec = spec
        self.replica = replica
        self.version = 0
        self.stats = {"prompts": 0, "samples": 0, "tokens": 0, "generate_s": 0.0, "weight_loads": 0}
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and not torch.cuda.is_available():
            torch.set_num_threads(int(threads))
        self.dtype = resolve_dtype(spec.dtype)
        seed = spec.seed + 1000 * replica  # replicas must not draw identical samples
        if spec.backend == "vllm":
            from actors.generator.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(
                spec.model_path,
                self.dtype,
                spec.max_model_len,
                seed,
                spec.enforce_eager,
                spec.gpu_memory_utilization,
                spec.tensor_parallel_size,
                spec.trust_remote_code,
            )
        elif spec.backend == "hf":
            from actors.generator.hf_backend import HFBackend

            self.backend = HFBackend(spec.model_path, self.dtype, seed, spec.trust_remote_code)
        else:
            raise ValueError(f"generator.backend must be 'vllm' or 'hf', got {spec.backend!r}")
        log.info("generator %d ready (%s, %s)", replica, spec.backend, spec.model_path)

    def ready(self) -> dict:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "version": self.version,
            "backend": self.spec.backend,
            "dtype": self.dtype,
        }

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        start = time.perf_counter()
        groups = self.backend.generate([p.token_ids for p in prompts], sampling)
        rollouts = []
        for prompt, group in zip(prompts, groups, strict=True):
            for k, c in enumerate(group):
                lp = torch.tensor(c.logprobs, dtype=torch.float32)
                rollouts.append(Rollout(prompt, k, c.token_ids, c.text, lp, self.version, c.finish_reason))
        self.stats["prompts"] += len(prompts)
        self.stats["samples"] += len(rollouts)
        self.stats["tokens"] += sum(len(r.response_ids) for r in rollouts)
        self.stats["generate_s"] += time.perf_counter() - start
        return rollouts

    def update_weights(self, bundle: WeightBundle) -> int:
        if bundle.version <= self.version:
            raise ValueError(
                f"generator {self.replica}: weight version {bundle.version} is not newer than {self.version}"
            )
        self.backend.load_weights(bundle.tensors)
        self.version = bundle.version
        self.stats["weight_loads"] += 1
        return self.version

    def sequence_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        return self.backend.sequence_logprobs(prompt_ids, completion_ids)

    def get_stats(self) -> dict:
        return dict(self.stats, version=self.version, replica=self.replica)
