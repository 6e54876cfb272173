"""The `Generator` Ray actor: samples n completions per prompt with logprobs and takes versioned weights.

Plain class; the cluster side wraps it with `ray.remote` and the placement it wants.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import torch

from troupe.actors import weight_buckets
from troupe.actors.envs.config import EnvConfig
from troupe.actors.generator.config import GeneratorConfig, placed
from troupe.actors.generator.sampling import Sampling, prompt_seed
from troupe.actors.generator.weight_handoff import WeightHandoff
from troupe.actors.hardware import node_id, placement_group_id, resolve_dtype
from troupe.actors.protocol import Prompt, Rollout, WeightBundle
from troupe.actors.weight_buckets import BucketedWeights

log = logging.getLogger("troupe.generator")


class Generator:
    """`config` is the run's generator config; `seed` the run seed (each replica draws from its own offset)."""

    def __init__(
        self,
        config: GeneratorConfig,
        model_path: str,
        replica: int = 0,
        seed: int = 0,
        trust_remote_code: bool = False,
        env: EnvConfig | None = None,
        colocated: bool = False,
        transfer: str = "object_store",
    ) -> None:
        config = placed(config, colocated)  # engine settings left unset, by placement
        self.spec = config
        self.env = env  # multi-turn: every generate() runs trajectories against it
        self.model_path = model_path
        self.replica = replica
        self.version = 0
        self.stats = {"prompts": 0, "samples": 0, "tokens": 0, "generate_s": 0.0, "weight_loads": 0}
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and not torch.cuda.is_available():
            torch.set_num_threads(int(threads))
        self.dtype = resolve_dtype(config.dtype)
        seed = seed + 1000 * replica  # replicas must not draw identical samples
        if config.backend == "vllm":
            from troupe.actors.generator.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(
                model_path,
                self.dtype,
                config.max_model_len,
                seed,
                config.enforce_eager,
                config.gpu_memory_utilization,
                config.tensor_parallel_size,
                trust_remote_code,
                config.sleep_level,
                transfer,
            )
        elif config.backend == "hf":
            from troupe.actors.generator.hf_backend import HFBackend

            self.backend = HFBackend(model_path, self.dtype, seed, trust_remote_code)
        else:
            raise ValueError(f"generator.backend must be 'vllm' or 'hf', got {config.backend!r}")
        self._env_calls = None  # built on the first multi-turn call
        self._handoff = WeightHandoff()
        log.info("generator %d ready (%s, %s)", replica, config.backend, model_path)

    def ready(self) -> dict:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "node": node_id(),
            "placement_group": placement_group_id(),
            "version": self.version,
            "backend": self.spec.backend,
            "dtype": self.dtype,
        }

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        """n samples per prompt; with an environment (env.target), n multi-turn trajectories per prompt."""
        with self._handoff.engine:  # weights offered meanwhile wait, or load between steps (partial rollouts)
            return self._generate(prompts, sampling)

    def _generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        if self.env is not None:
            from troupe.actors.envs.trajectory import to_rollout

            trajectories, _ = self._run_trajectories(prompts, sampling, self.env)
            rollouts = [to_rollout(t, sampling.temperature, self.env.on_error) for t in trajectories]
            self.stats["prompts"] += len(prompts)
            self.stats["tokens"] += sum(r.trained_tokens for r in rollouts)
            return rollouts
        start = time.perf_counter()
        seeds = None if sampling.seed is None else [prompt_seed(sampling.seed, p.uid) for p in prompts]
        groups = self.backend.generate([p.token_ids for p in prompts], sampling, seeds)
        rollouts = []
        for prompt, group in zip(prompts, groups, strict=True):
            for k, c in enumerate(group):
                lp = torch.tensor(c.logprobs, dtype=torch.float32)
                rollouts.append(
                    Rollout(
                        prompt,
                        k,
                        c.token_ids,
                        c.text,
                        lp,
                        self.version,
                        c.finish_reason,
                        sampling.temperature,
                    )
                )
        self.stats["prompts"] += len(prompts)
        self.stats["samples"] += len(rollouts)
        self.stats["tokens"] += sum(len(r.response_ids) for r in rollouts)
        self.stats["generate_s"] += time.perf_counter() - start
        return rollouts

    def run_trajectories(
        self, prompts: Sequence[Prompt], sampling: Sampling, env: EnvConfig
    ) -> tuple[list, dict]:
        """Multi-turn trajectories (sampling.n per prompt) against `env`; and the run's env/* counts."""
        with self._handoff.engine:  # weights offered meanwhile load between engine steps (partial rollouts)
            return self._run_trajectories(prompts, sampling, env)

    def _run_trajectories(
        self, prompts: Sequence[Prompt], sampling: Sampling, env: EnvConfig
    ) -> tuple[list, dict]:
        from troupe.actors.envs.runner import run_trajectories

        if self.spec.backend != "vllm":
            raise ValueError("multi-turn environments need generator.backend=vllm")
        calls = self._env_calls
        if (
            calls is None
            or calls.exhausted
            or (calls.max_workers, calls.timeout_s) != (env.workers, env.step_timeout_s)
        ):
            from transformers import AutoTokenizer

            from troupe.actors.envs.calls import EnvCalls
            from troupe.actors.envs.trajectory import TurnEncoder

            if calls is not None:
                calls.close()  # calls stuck in user code finish on their own threads; new ones get fresh ones
                if calls.exhausted:
                    log.warning("every environment worker was stuck past its deadline: starting a fresh pool")
            self._env_calls = EnvCalls(env.workers, env.step_timeout_s)
            self._encoder = TurnEncoder(AutoTokenizer.from_pretrained(self.model_path))
        from troupe.actors.generator.vllm_turns import VLLMTurns

        factory = env.factory()
        self.backend.require_awake()
        start = time.perf_counter()
        trajectories, counts = run_trajectories(
            VLLMTurns(self.backend.llm, sampling, deltas=env.partial_rollouts),
            self._encoder,
            factory,
            prompts,
            sampling.n,
            self.version,
            env.limits(sampling.max_new_tokens, self.spec.max_model_len),
            self._env_calls,
            seed_of=None if sampling.seed is None else lambda t: prompt_seed(sampling.seed, turn_stream(t)),
            sync=_MidRunWeights(self) if env.partial_rollouts else None,
        )
        self.stats["generate_s"] += time.perf_counter() - start
        self.stats["samples"] += len(trajectories)
        return trajectories, dict(counts)

    def update_weights(self, bundle: WeightBundle | BucketedWeights, rollback: bool = False) -> dict:
        """Load newer weights; `rollback` (after a learner rebuild from a checkpoint) may go back to older ones.

        Bucketed weights are fetched and every bucket's checksum checked before anything is loaded. Returns the
        version now held and the transfer's checksum, which the driver compares with what it sent. A generate
        call in flight finishes on the old weights first, unless it runs multi-turn trajectories on an actor that
        takes weights on a second thread (env.partial_rollouts): then they load between two engine steps and the
        turns in flight continue on them.
        """
        return self._handoff.offer(lambda: self._update(bundle, rollback))

    def _update(self, bundle: WeightBundle | BucketedWeights, rollback: bool) -> dict:
        self._check_newer(bundle.version, rollback)
        start = time.perf_counter()
        digest = ""
        if isinstance(bundle, BucketedWeights):
            buffers = _fetch(bundle.buckets)
            fetched = time.perf_counter()
            digest = weight_buckets.verify(bundle.manifest, buffers)  # of the bytes received
            items = weight_buckets.unpack(bundle.manifest, buffers)
        else:
            fetched = start
            items = list(bundle.tensors.items())
        return self._load(
            items, bundle.version, digest, fetch_s=fetched - start, verify_s=time.perf_counter() - fetched
        )

    def _check_newer(self, version: int, rollback: bool) -> None:
        if version <= self.version and not rollback:
            raise ValueError(
                f"generator {self.replica}: weight version {version} is not newer than {self.version}"
            )

    def _load(self, items, version: int, digest: str, fetch_s: float, verify_s: float) -> dict:
        """Load checked weights; the report the driver compares with what it sent."""
        start = time.perf_counter()
        self.backend.load_weights(items)
        self.version = version
        self.stats["weight_loads"] += 1
        load_s = time.perf_counter() - start
        return {
            "version": version,
            "checksum": digest,
            "fetch_s": fetch_s,
            "verify_s": verify_s,
            "load_s": load_s,
        }

    def sleep(self) -> dict:
        """Free the engine's GPU memory while the learners train (generator.sleep_level, colocated GPUs)."""
        free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
        start = time.perf_counter()
        self.backend.sleep()
        freed = (torch.cuda.mem_get_info()[0] - free) / 2**30 if torch.cuda.is_available() else 0.0
        return {"sleep_s": time.perf_counter() - start, "freed_gib": freed}

    def wake(self) -> bool:
        """Wake without new weights; False when sleep freed them (level 2): the caller refits this generator."""
        return self.backend.wake()

    # GPU weight sync (actors/weight_transfer.py): NCCL (this engine's workers join learner rank 0's weight-update
    # group) or CUDA IPC (handles from the learner rank on this GPU); both end in receive_weights.
    def join_weight_transfer(self, unique_id: str, rank_offset: int, world_size: int) -> bool:
        self.backend.join_weight_transfer(unique_id, rank_offset, world_size)
        return True

    def receive_weights(self, version: int, info: dict, rollback: bool = False) -> dict:
        """NCCL: take the broadcast of the weights `info` lays out; every tensor is checked against rank 0's
        checksum before the report (version and digest) goes back to the driver."""
        start = time.perf_counter()
        # receive first, whatever the version: every member of the group waits on every other's receive
        return self._took(version, rollback, self.backend.receive_weights(info), start)

    def begin_weights(self) -> None:
        """IPC (colocated GPUs): open an update that `receive_chunk` fills and `finish_weights` closes."""
        self._receiving = time.perf_counter()
        self.backend.begin_update()

    def receive_chunk(self, info: dict) -> None:
        self.backend.update(info)

    def finish_weights(self, version: int, rollback: bool = False) -> dict:
        return self._took(version, rollback, self.backend.finish_update(), self._receiving)

    def _took(self, version: int, rollback: bool, sums: list[int], start: float) -> dict:
        """A transfer on vLLM's engine loaded: the report the driver compares with the learner's checksums."""
        from troupe.actors.weight_transfer import transfer_digest

        self._check_newer(version, rollback)
        self.version = version
        self.stats["weight_loads"] += 1
        load_s = time.perf_counter() - start
        return {"version": version, "checksum": transfer_digest(version, sums), "load_s": load_s}

    def leave_weight_transfer(self) -> None:
        self.backend.leave_weight_transfer()

    def sequence_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        return self.backend.sequence_logprobs(prompt_ids, completion_ids)

    def get_stats(self) -> dict:
        return dict(self.stats, version=self.version, replica=self.replica)


class _MidRunWeights:
    """The runner's view of weights offered during a multi-turn run (actors/envs/runner.py, WeightSync)."""

    def __init__(self, generator: Generator):
        self.generator = generator

    def due(self) -> bool:
        return self.generator._handoff.due()

    def apply(self) -> int:
        self.generator._handoff.apply()
        return self.generator.version


def turn_stream(traj) -> str:
    """A turn's own sampling stream: its prompt, sample and turn (not which generator or batch serves it)."""
    return f"{traj.prompt.uid}:{traj.sample_index}:{traj.turns}"


def _fetch(buckets) -> list:
    """The buckets' arrays: object refs are read from Ray's object store (no copy on the same node)."""
    import ray

    if any(isinstance(b, ray.ObjectRef) for b in buckets):
        return ray.get(list(buckets))
    return list(buckets)
