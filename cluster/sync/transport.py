"""Which way the weights go from the learners to the generators (`sync.transport`)."""

from __future__ import annotations


def weight_transport(
    transport: str, backend: str, generator_gpus: float, learner_gpus: float, layout: str
) -> str:
    """ "nccl": a broadcast on vLLM's engine when generators and learners have whole GPUs of their own (split); "ipc":
    CUDA IPC handles when generator i shares learner rank i's GPU (colocated); else "object_store" (CPU, the hf
    backend, fractional GPUs in the split layout: two members of one NCCL group cannot share a GPU). `auto` picks;
    `validate` refuses a transport named where it cannot run."""
    if transport == "object_store" or backend != "vllm":
        return "object_store"
    if layout == "split" and generator_gpus >= 1 and learner_gpus >= 1 and transport in ("auto", "nccl"):
        return "nccl"
    one_gpu = (
        0 < generator_gpus and 0 < learner_gpus and generator_gpus + learner_gpus <= 1
    )  # a bundle on one GPU
    if layout == "colocated" and one_gpu and transport in ("auto", "ipc"):
        return "ipc"
    return "object_store"
