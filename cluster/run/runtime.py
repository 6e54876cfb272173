"""Starts or joins Ray, and builds the per-role environment variables actors run with.

Only this module and the fleets talk to `ray.init`; the dashboard stays on loopback unless configured.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

import ray

from troupe.actors.generator.config import GeneratorConfig
from troupe.actors.learner.config import LearnerConfig
from troupe.cluster.config.checks import ConfigError
from troupe.cluster.config.schema import RayConfig, TroupeConfig

log = logging.getLogger("troupe.cluster")

# Environment every actor inherits: never reach for the hub at run time unless the user set otherwise.
_PASSTHROUGH = ("HF_HUB_OFFLINE", "HF_HOME", "TROUPE_CACHE", "TORCH_EXTENSIONS_DIR", "TRANSFORMERS_OFFLINE")


def start_ray(cfg: RayConfig, log_to_driver: bool = True, py_modules: list[str] | None = None) -> None:
    """log_to_driver=False: actors' output (vLLM, DeepSpeed) stays in Ray's session logs, off the console.
    `py_modules`: local files or packages of user code that every worker of the job can import (Ray uploads them)."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env: dict = {"env_vars": env}
    if py_modules:
        runtime_env["py_modules"] = list(py_modules)
    # Quiet runs keep Ray's own logger as the caller routed it (cluster/observe/run_log.py) instead of Ray's console set-up.
    kwargs = dict(runtime_env=runtime_env, log_to_driver=log_to_driver, configure_logging=log_to_driver)
    if cfg.address is None:
        # "local" always starts a fresh instance: a stale local Ray would otherwise reject num_cpus.
        with own_session():
            ray.init(
                address="local",
                num_cpus=cfg.num_cpus,
                include_dashboard=cfg.include_dashboard,
                dashboard_host=cfg.dashboard_host,
                object_store_memory=cfg.object_store_memory,
                **kwargs,
            )
    else:
        _follow_cluster_token()
        ray.init(address=cfg.address, **kwargs)
    log.info("ray resources: %s", ray.cluster_resources())


@contextmanager
def own_session():
    """The embedded Ray's processes (GCS, raylet, and through the raylet every actor's worker) start in a session
    of their own. Otherwise they share the driver's process group, and a SIGTERM to that group (a launcher
    stopping the job, `kill -TERM -<pgid>`) ends every actor at once, so the driver, which stops gracefully on
    SIGTERM, could write no checkpoint. They still end with the driver: Ray starts them with the kernel's
    parent-death signal, and the driver's ray.shutdown stops them. Where the kernel cannot do that, Ray's
    reaper cleans up by process group instead, so they stay in the driver's group."""
    try:  # Ray has no option for this, so private names: if a Ray release moves them, start as Ray does
        from ray._private import services, utils

        popen, fate_sharing = services.ConsolePopen, utils.detect_fate_sharing_support()
    except (ImportError, AttributeError):
        popen, fate_sharing = None, False
    if popen is None or not sys.platform.startswith("linux") or not fate_sharing:
        yield
        return

    class SessionPopen(popen):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = SessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


def _follow_cluster_token() -> None:
    """`ray start --head` turns on token authentication when a token exists on the machine (a local `ray.init()`
    leaves one in ~/.ray/auth_token), but a client with RAY_AUTH_MODE unset sends none and is refused. Take the
    same decision `ray start` takes; a client sending a token also joins a cluster without authentication."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return  # a Ray without token authentication
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # RAY_AUTH_MODE, when set, decides
    except Exception as e:  # a private Ray function: if it changed, join as Ray would on its own
        log.warning("ray: could not check for an authentication token (%s); joining without one", e)


def generator_env(cfg: GeneratorConfig) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(cfg.omp_threads),
        # In-process engine: 2.5x faster start-up, and weights load with a direct call.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "TOKENIZERS_PARALLELISM": "false",
    }


CPU_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def learner_env(cfg: LearnerConfig, deterministic: bool = False) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(cfg.omp_threads), "TOKENIZERS_PARALLELISM": "false"}
    if cfg.num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
        # glibc serves every allocation over 32 MiB (activations, logits) with a fresh mmap, whose pages the kernel
        # zeroes on first touch, and unmaps it on free: measured here, 20-25% of a CPU learn phase. Heap only within
        # a step; each rank returns the free pages after it (rank.release_free_heap). The user's own setting wins.
        for key, value in CPU_MALLOC.items():
            env[key] = os.environ.get(key, value)
    elif deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = (
            ":4096:8"  # cuBLAS's deterministic mode (torch docs, reproducibility)
        )
    return env


def check_capacity(cfg: TroupeConfig) -> None:
    """Fail fast, naming the keys, when the embedded Ray cannot place every actor (they would wait forever)."""
    if cfg.ray.address is not None:
        return  # a real cluster may autoscale to fit
    have = ray.cluster_resources()
    critics = cfg.critic.world_size if cfg.algo.critic else 0
    experts = list(cfg.reward.experts.items())
    judges = list(cfg.reward.judges.items())
    for resource, parts in (
        (
            "CPU",
            (
                ("generator", cfg.generator.replicas, cfg.generator.num_cpus),
                ("reward", cfg.reward.shards, cfg.reward.num_cpus),
                ("learner", cfg.learner.world_size, cfg.learner.num_cpus),
                ("critic", critics, cfg.critic.num_cpus),
                *((f"reward.experts.{n}", e.replicas, e.num_cpus) for n, e in experts),
                *((f"reward.judges.{n}", j.replicas, j.num_cpus) for n, j in judges),
            ),
        ),
        (
            "GPU",
            (
                ("generator", cfg.generator.replicas, cfg.generator.num_gpus),
                ("learner", cfg.learner.world_size, cfg.learner.num_gpus),
                ("critic", critics, cfg.critic.num_gpus),
                *((f"reward.experts.{n}", e.replicas, e.num_gpus) for n, e in experts),
                *((f"reward.judges.{n}", j.replicas, j.num_gpus) for n, j in judges),
            ),
        ),
    ):
        need = sum(count * each for _, count, each in parts)
        if need > have.get(resource, 0.0) + 1e-6:
            detail = " + ".join(
                f"{role}: {count} x {role}.num_{resource.lower()}s={each}" for role, count, each in parts
            )
            raise ConfigError(
                f"actors need {need:g} {resource} but local Ray has {have.get(resource, 0.0):g} ({detail})"
            )
