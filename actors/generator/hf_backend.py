"""transformers inference backend with the vLLM backend's interface, for machines without vLLM.

Slower than vLLM (no paged attention, no continuous batching) but exact and dependency-light. It samples from
exactly the configured distribution (temperature, top-p): the checkpoint's own generation_config (a repetition
penalty, top-k, suppressed tokens...) is set aside, and transformers' top-k default of 50 is turned off, since the
learner models softmax(logits / T) and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from troupe.actors.generator.sampling import Completion, Sampling


class HFBackend:
    def __init__(
        self, model_path: str, dtype: str, seed: int, trust_remote_code: bool, batch_size: int = 16
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        torch.manual_seed(seed)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.eos_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        self.model.generation_config = GenerationConfig()  # generate() fills unset values from it: none here

    def require_awake(self) -> None:
        """No sleep mode here (generator.sleep_level needs the vLLM backend)."""

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        result: list[list[Completion]] = []
        if (
            seeds is not None
        ):  # deterministic: one prompt at a time from its own seed (generate has no generator)
            for ids, seed in zip(prompt_ids, seeds, strict=True):
                torch.manual_seed(seed)
                result.extend(self._generate_chunk([ids], sampling))
            return result
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = prompt_ids[start : start + self.batch_size]
            result.extend(self._generate_chunk(chunk, sampling))
        return result

    def _generate_chunk(self, chunk: Sequence[Sequence[int]], sampling: Sampling) -> list[list[Completion]]:
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding so every prompt ends at the same column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        greedy = sampling.temperature == 0
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # not transformers' default 50
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            pad_token_id=self.pad_id,
            eos_token_id=list(self.eos_ids),
            return_dict_in_generate=True,
            output_scores=True,  # processed (after temperature / top-p): what vLLM reports as processed_logprobs
        )
        new_tokens = out.sequences[:, width:].cpu()
        logps = torch.stack(out.scores, dim=1).float().log_softmax(-1).cpu()
        groups: list[list[Completion]] = []
        for row in range(new_tokens.shape[0]):
            toks = new_tokens[row].tolist()
            end = next((k + 1 for k, t in enumerate(toks) if t in self.eos_ids), None)
            reason = "stop" if end is not None else "length"
            toks = toks[: end if end is not None else len(toks)]
            lps = tuple(float(logps[row, k, t]) for k, t in enumerate(toks))
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if row % sampling.n == 0:
                groups.append([])
            groups[-1].append(Completion(tuple(toks), text, lps, reason))
        return groups

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=self.device)
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids, device=self.device)[:, None])
        return lp[:, 0].tolist()

    def load_weights(self, items: list[tuple[str, torch.Tensor]]) -> None:
        tensors = dict(items)
        own = self.model.state_dict()
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise KeyError(f"weight bundle has parameters this model lacks: {unknown[:5]}")
        with torch.no_grad():
            for name, t in tensors.items():
                own[name].copy_(t.to(own[name].dtype))


def _eos_ids(generation_config, tokenizer) -> tuple[int, ...]:
    eos = (
        generation_config.eos_token_id
        if generation_config.eos_token_id is not None
        else tokenizer.eos_token_id
    )
    return tuple(eos) if isinstance(eos, list | tuple) else (eos,)
