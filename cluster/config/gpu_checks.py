"""Config checks of the GPU paths (cluster/config/checks.py runs them): the weight transport named, vLLM's sleep mode
and tensor parallelism."""

from __future__ import annotations

from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.sync.transport import weight_transport


def check_gpu(cfg: TroupeConfig, error: type[Exception]) -> None:
    g, lr, pl = cfg.generator, cfg.learner, cfg.placement
    named = cfg.sync.transport
    if (
        named in ("nccl", "ipc")
        and weight_transport(named, g.backend, g.num_gpus, lr.num_gpus, pl.layout) != named
    ):
        raise error(
            {
                "nccl": "sync.transport=nccl needs whole GPUs (generator.num_gpus >= 1, learner.num_gpus >= 1), "
                "placement.layout=split and generator.backend=vllm",
                "ipc": "sync.transport=ipc needs placement.layout=colocated on one GPU (generator.num_gpus > 0, "
                "learner.num_gpus > 0, adding up to 1 at most) and generator.backend=vllm",
            }[named]
        )
    _check_engine(cfg, error)


def _check_engine(cfg: TroupeConfig, error: type[Exception]) -> None:
    """vLLM's sleep mode and tensor parallelism, which only GPUs have."""
    g, layout = cfg.generator, cfg.placement.layout
    if g.sleep_level:
        needs = [
            ("generator.backend=vllm", g.backend == "vllm"),
            ("generator.num_gpus > 0 (vLLM's sleep mode is CUDA/ROCm only)", g.num_gpus > 0),
            (
                "placement.layout=colocated (the memory it frees is for the learner on the same GPU)",
                layout == "colocated",
            ),
            ("run.mode=sync (async generators sample through the learn phase)", cfg.run.mode == "sync"),
        ]
        missing = [what for what, ok in needs if not ok]
        if missing:
            raise error(f"generator.sleep_level={g.sleep_level} needs " + ", ".join(missing))
    if g.tensor_parallel_size > 1 and (g.num_gpus != g.tensor_parallel_size or layout != "split"):
        raise error(
            f"generator.tensor_parallel_size={g.tensor_parallel_size}: each generator holds its GPUs, so "
            f"generator.num_gpus must equal it (got {g.num_gpus}) and placement.layout must be split (got {layout})"
        )
