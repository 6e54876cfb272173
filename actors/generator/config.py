"""Typed config of the generator role: the Hydra schema's `generator` group and what a `Generator` actor is
built from (no copies between the two). No Ray or vLLM imports here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GeneratorConfig:
    backend: str = "vllm"  # vllm | hf
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    omp_threads: int = 1
    dtype: str = "auto"  # auto | bfloat16 | float32 (auto: bf16 on GPUs and AMX/AVX512-BF16 CPUs)
    max_model_len: int = 1024
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    kv_cache_gib: int = 1  # vLLM-CPU KV cache size
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
