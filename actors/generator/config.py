"""Typed config of the generator role: the Hydra schema's `generator` group and what a `Generator` actor is
built from (no copies between the two). No Ray or vLLM imports here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from troupe.actors.field_domains import bounded, one_of, resource


@dataclass
class GeneratorConfig:
    backend: str = one_of("vllm", "hf")
    replicas: int = bounded(1, ge=1)
    num_cpus: float = resource(1.0)
    num_gpus: float = resource(0.0)
    omp_threads: int = bounded(1, ge=1)
    # auto: bf16 on GPUs and AMX/AVX512-BF16 CPUs
    dtype: str = one_of("auto", "bfloat16", "float32", "float16")
    max_model_len: int = bounded(1024, ge=1)
    # None: chosen by placement (`placed`): on GPUs, CUDA graphs with GPUs of its own, eager when colocated (the
    # graphs' memory stays allocated through sleep and the learn phase); always eager on CPU
    enforce_eager: bool | None = None
    # None: chosen by placement (`placed`): 0.9 of its GPUs (of its fraction of one), 0.4 colocated (0.5 asleep)
    gpu_memory_utilization: float | None = bounded(None, gt=0, le=1)
    # vLLM tensor parallelism: the generator actor holds tensor_parallel_size GPUs on one node
    tensor_parallel_size: int = bounded(1, ge=1)
    # Colocated GPUs: vLLM sleep mode around the learn phase. 1: weights to CPU memory, KV cache freed; 2: both
    # freed, the weights come back with the next sync. 0: the engine keeps its memory.
    sleep_level: int = one_of(0, 1, 2)
    kv_cache_gib: int = bounded(1, ge=1)  # vLLM-CPU KV cache size
    samples_per_prompt: int = bounded(4, ge=1)
    # > 0: the learner divides logits by it to score the sampled distribution
    temperature: float = bounded(1.0, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    max_new_tokens: int = bounded(128, ge=1)


def placed(config: GeneratorConfig, colocated: bool) -> GeneratorConfig:
    """`config` with the engine settings it leaves unset chosen for where the generator runs (GPU or CPU, its own
    GPUs or a learner rank's)."""
    on_gpu = config.num_gpus > 0
    eager = config.enforce_eager
    if eager is None:
        eager = not on_gpu or colocated
    share = config.gpu_memory_utilization
    if share is None:
        # a fractional GPU of its own is shared with other actors: its share of the memory, no more
        share = (0.5 if config.sleep_level else 0.4) if colocated else 0.9 * min(1.0, config.num_gpus or 1.0)
    return dataclasses.replace(config, enforce_eager=eager, gpu_memory_utilization=share)
