"""Typed config of the generator role: the Hydra schema's `generator` group and what a `Generator` actor is
built from (no copies between the two). No Ray or vLLM imports here.
"""

from __future__ import annotations

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
    enforce_eager: bool = True
    gpu_memory_utilization: float = bounded(0.5, gt=0, le=1)
    tensor_parallel_size: int = bounded(1, ge=1)
    kv_cache_gib: int = bounded(1, ge=1)  # vLLM-CPU KV cache size
    samples_per_prompt: int = bounded(4, ge=1)
    # > 0: the learner divides logits by it to score the sampled distribution
    temperature: float = bounded(1.0, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    max_new_tokens: int = bounded(128, ge=1)
