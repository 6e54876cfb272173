"""The reward sections of the typed schema (cluster/config/schema.py): the reward model (`reward`: objectives,
weights, experts, judges, the ALaRM hierarchy) and its HTTP service (`serve`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from troupe.actors.field_domains import bounded, one_of, resource
from troupe.actors.reward.judge import JudgeConfig
from troupe.actors.reward.objective import ON_ERROR


@dataclass
class ServeConfig:
    """`troupe rm serve`: the reward fleet over HTTP (cluster/jobs/rm_serve.py)."""

    host: str = "127.0.0.1"  # loopback unless the user opts in
    port: int = bounded(8008, ge=0, le=65535)  # 0: any free port (printed)
    max_items: int = bounded(256, ge=1)  # per request
    max_body_mb: int = bounded(16, ge=1)
    # Concurrent requests are merged into one fleet batch of up to max_batch_items: those that queued while the
    # previous batch was on the fleet, plus any arriving within batch_wait_ms (0: no waiting, no added latency)
    max_batch_items: int = bounded(256, ge=1)
    batch_wait_ms: float = bounded(0.0, ge=0)
    request_timeout_s: float = bounded(300.0, gt=0)  # a request not scored by then gets a 504
    # open at once; a request on one more gets a 503 and the connection is closed
    max_connections: int = bounded(64, ge=1)
    # Threads that parse requests and shape results (the event loop only moves bytes); requests beyond wait
    workers: int = bounded(8, ge=1)
    # items waiting for the fleet; a request that would pass it gets a 503 + Retry-After
    max_queued: int = bounded(1024, ge=1)
    # A connection must send its request headers within header_timeout_s and its body within body_timeout_s
    # (else 408 and it is closed); an idle keep-alive connection is closed after keep_alive_s
    header_timeout_s: float = bounded(10.0, gt=0)
    body_timeout_s: float = bounded(30.0, gt=0)
    keep_alive_s: float = bounded(5.0, gt=0)
    # a client that reads nothing of its responses for write_timeout_s (the socket's buffers stay full) is dropped
    write_timeout_s: float = bounded(30.0, gt=0)
    max_header_kb: int = bounded(16, ge=1)  # request line + headers; more gets a 431
    max_json_depth: int = bounded(32, ge=1)  # arrays/objects nested deeper get a 400
    # Shard losses one batch may cost; past it the batch's requests are scored one by one, and the request that
    # still fails gets a 503, so an item that kills a shard cannot loop forever
    retries: int = bounded(2, ge=0)
    # The name of an environment variable holding a bearer token clients must send; required when host is not
    # loopback (127.0.0.1, ::1, localhost)
    token_env: str | None = None
    # A run's checkpoint-final/troupe_state.json or a checkpoint's state.json: the normaliser statistics to score with
    aggregation_state: str | None = None


@dataclass
class HierarchyConfig:
    """ALaRM: holistic objective first; aspects (weights) added where its z-score >= threshold."""

    holistic: str = "armo"  # an objective produced by a shard (an expert's scalar, or a rule)
    threshold: float = 0.0  # in z-units of the holistic reward
    holistic_weight: float = bounded(1.0, ge=0)  # 0: the holistic reward only gates the aspects
    aspects: dict[str, float] = field(default_factory=dict)
    # Fixed z-statistics; None: carried by the holistic expert's bundle, else fitted on a warm-up of samples.
    mean: float | None = None
    std: float | None = bounded(None, gt=0)
    # Holistic values collected across the first batches before the statistics freeze (0: the first batch);
    # until then each batch is normalised with the statistics of all samples seen so far.
    warmup_samples: int = bounded(0, ge=0)
    # Place each reward on response tokens (ALaRM): w_h*h on the last token, aspects' per-token values on theirs;
    # the scalar is their sum. False: one sequence-level reward.
    token_level: bool = False
    # ALaRM's aspect selection: `consistency` keeps the aspects whose pairwise ordering of the warm-up samples
    # (same prompt) agrees with the holistic reward at least `min_agreement` of the time; `none` keeps them all.
    # The warm-up is the first reward.hierarchy.warmup_samples training samples (at least the first batch).
    select: str = one_of("none", "consistency")
    min_agreement: float = bounded(0.55, ge=0, le=1)


@dataclass
class ExpertConfig:
    """A reward bundle served by its own pool of shards (reward.experts.<name>)."""

    bundle: str = ""  # a folder written by `troupe rm train`
    replicas: int = bounded(1, ge=1)
    num_cpus: float = resource(0.0)
    num_gpus: float = resource(0.0)
    # the backbone's compute dtype (scores stay float32)
    dtype: str = one_of("float32", "auto", "bfloat16")


@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment on training rewards (cluster/run/shaping.py): 0 up to
    generator.max_new_tokens - buffer_tokens, falling linearly to -penalty at max_new_tokens."""

    buffer_tokens: int = bounded(0, ge=0)  # 0: off
    penalty: float = bounded(1.0, ge=0)


@dataclass
class RewardConfig:
    shards: int = bounded(1, ge=1)  # replicas of the rule shard; a batch is split across them
    # rule objectives are cheap; shards that host a backbone need real CPUs/GPUs
    num_cpus: float = resource(0.0)
    batch_size: int = bounded(64, ge=1)
    # {objective: {param: value}} hosted by the shards: a built-in rule by name (actors/reward/rules.py), your
    # own code ({target: pkg.module:fn | /path/file.py:fn, <kwargs>}), a remote reward model ({type: http, url:
    # ...}) or an LLM judge ({type: judge, ...}); see docs/rewards.md
    objectives: dict[str, Any] = field(
        default_factory=lambda: {
            "correctness": {},
            "format": {},
            "length": {"target_tokens": 64, "max_tokens": 256},
        }
    )
    weights: dict[str, float | None] = field(
        default_factory=lambda: {"correctness": 1.0, "format": 0.2, "length": 0.1}
    )
    experts: dict[str, ExpertConfig] = field(default_factory=dict)  # backbone experts, one shard pool each
    judges: dict[str, JudgeConfig] = field(default_factory=dict)  # LLM-judge pools, one shard pool each
    # A sample that user or remote code fails on (exception, timeout, non-finite value): drop its prompt group
    # from training (counted in the accounting) | zero (the value counts as 0) | fail (stop the run). An objective
    # entry's own `on_error` / `timeout_s` win. See actors/reward/objective.py.
    on_error: str = one_of(*ON_ERROR)
    timeout_s: float = bounded(60.0, gt=0)  # per call of a plug-in or remote objective
    aggregation: str = one_of("weighted_sum", "hierarchy")  # with reward.weights | reward.hierarchy
    hierarchy: HierarchyConfig = field(default_factory=lambda: HierarchyConfig())
    overlong: OverlongConfig = field(default_factory=lambda: OverlongConfig())

    def __post_init__(self) -> None:
        # `<objective>: null` turns a default objective off: a config file can add keys to a dict, not delete them
        self.objectives = {k: v for k, v in self.objectives.items() if v is not None}
        self.weights = {k: v for k, v in self.weights.items() if v is not None}
