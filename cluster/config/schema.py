"""Typed schema of the Hydra config (conf/): dataclasses registered as structured configs.

A wrong key or a value of the wrong type fails at start-up naming the key (OmegaConf struct mode); the cross-field
checks (cluster/config/checks.py, `validate`) name the keys they relate. No Ray imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from troupe.actors.envs.config import EnvConfig
from troupe.actors.field_domains import bounded, one_of
from troupe.actors.generator.config import GeneratorConfig
from troupe.actors.learner.config import AlgoConfig, CriticConfig, LearnerConfig
from troupe.cluster.config.reward_schema import (  # noqa: F401 (the schema's reward sections, importable here too)
    ExpertConfig,
    HierarchyConfig,
    JudgeConfig,
    RewardConfig,
    ServeConfig,
)


@dataclass
class RunConfig:
    name: str = "troupe"
    # One process at a time (<output_dir>/.troupe.lock). A new run refuses a folder holding an earlier run's files
    # (metrics.jsonl, checkpoints, ...; cluster/durability/run_folder.py) unless resume= continues it or
    # overwrite=true deletes them. `troupe -m` (multirun) puts job N in <output_dir>/<N>_<swept key=value,...>.
    output_dir: str = "outputs/${run.name}"
    overwrite: bool = False
    iterations: int = bounded(3, ge=1)
    seed: int = bounded(0, ge=0)
    progress_bar: bool = True
    print_table: bool = True
    save_checkpoint: bool = True  # the final HF checkpoint (checkpoint-final)
    # Run checkpoints (<output_dir>/checkpoints/iter-NNNNNN): every N iterations (0: none), and on SIGTERM/SIGINT.
    # Offline DPO and rm bt/haf: every N learner calls; rm gating: every N gating steps (<rm.output>.train/).
    checkpoint_every: int = bounded(0, ge=0)
    # the newest ones kept; older ones are deleted once a newer one is complete
    keep_checkpoints: int = bounded(2, ge=1)
    # Seeded per-request sampling and deterministic torch kernels: a resumed run repeats the uninterrupted one.
    deterministic: bool = False
    # sync: generate, score, learn and sync in turn. async: the generators sample the next batch while the
    # learners train; a rollout is at most max_staleness weight versions behind the learner (older groups are
    # sampled again) and its tokens are importance-corrected (algo.tis_cap).
    mode: str = one_of("sync", "async")
    # At most 8: each version keeps one more batch in flight (its prompts, rollouts and object-store
    # refs held by the driver), and a few versions back pi_old / pi_behaviour is clipped at algo.tis_cap for most
    # tokens, so such rollouts teach little; async RL systems run with 1-4.
    max_staleness: int = bounded(1, ge=0, le=8)


@dataclass
class SyncConfig:
    """Weight transfer learner -> generators (cluster/sync/object_store.py)."""

    # Object store: flat buffers of at most this size, each checksummed; the generator checks all before loading any.
    bucket_mb: float = bounded(256, gt=0)
    # auto: on vLLM's weight-transfer engines, NCCL broadcast from learner rank 0 when generators and learners have
    # whole GPUs and the layout is split (cluster/sync/nccl.py), CUDA IPC when colocated on GPUs
    # (cluster/sync/ipc.py), else the object store | object_store | nccl | ipc
    transport: str = one_of("auto", "object_store", "nccl", "ipc")


@dataclass
class PoolBounds:
    min: int = bounded(1, ge=1)  # a pool of 0 could neither generate nor score
    max: int = bounded(4, ge=1)


@dataclass
class AutoscaleConfig:
    """Grows and shrinks the generator pool and each reward pool between iterations (cluster/fleet/elastic.py)."""

    enabled: bool = False
    generators: PoolBounds = field(default_factory=PoolBounds)
    reward: PoolBounds = field(default_factory=PoolBounds)  # each reward pool
    # A pool the loop waited on (time/generate, time/score) for more than this fraction of the iteration grows...
    grow_wait_frac: float = bounded(0.3, ge=0, le=1)
    # ...and one it waited on for less than this fraction shrinks (async: the generators were ahead, idle).
    shrink_wait_frac: float = bounded(0.05, ge=0, le=1)
    cooldown: int = bounded(2, ge=0)  # iterations between two changes of one pool


@dataclass
class RolePlacement:
    """Where one role's actors run (cluster/fleet/placement.py)."""

    # generator / reward pools: DEFAULT (Ray packs a node, then spreads) | SPREAD (over the nodes);
    # learner ranks (a placement group): PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    strategy: str = "DEFAULT"
    # Custom resources per actor (`ray start --resources`), e.g. {rollout: 1}, and node labels it needs
    # (`ray start --labels`). Typed Any with a None default: Hydra merges `placement.generator.resources={...}`
    # into an empty dict default as new keys, which struct mode refuses; a None leaf is replaced (see rm.scales).
    resources: Any = None
    labels: Any = None

    def needs(self) -> tuple[dict[str, float], dict[str, str]]:
        """(custom resources, node labels), empty when unset."""
        resources = {str(k): float(v) for k, v in (self.resources or {}).items()}
        return resources, {str(k): str(v) for k, v in (self.labels or {}).items()}


@dataclass
class PlacementConfig:
    """Placement per role, and the layout of generators against learner ranks."""

    # split: generators have their own resources. colocated: generator i shares learner rank i's placement bundle
    # (its node, and a share of its GPU): generator.replicas = learner.world_size, fixed for the run.
    layout: str = one_of("split", "colocated")
    generator: RolePlacement = field(default_factory=RolePlacement)
    reward: RolePlacement = field(default_factory=RolePlacement)
    learner: RolePlacement = field(default_factory=lambda: RolePlacement(strategy="PACK"))
    # An actor whose resources no node has: the run fails after this long (at once on an embedded local Ray,
    # which cannot grow), naming the role and what it asked for.
    wait_s: float = bounded(120.0, gt=0)


@dataclass
class BestOfNConfig:
    """`troupe best-of-n`: N samples per prompt from model.policy (generator.* sets the engine and sampling), scored
    by a running `troupe rm serve`, the best kept (cluster/jobs/best_of_n.py). Prompts are read by data.prompt_key."""

    prompts: str | None = None  # a JSONL file
    reference_key: str | None = None  # the answer field, for objectives that check one
    n: int = bounded(4, ge=1)
    out: str = "${run.output_dir}/best_of_n.jsonl"
    url: str = "http://127.0.0.1:8008"  # the reward service
    batch: int = bounded(64, ge=1)  # items per request (whole prompts)


@dataclass
class RayConfig:
    address: str | None = (
        None  # None: start an embedded local Ray; "auto" or "ray://host:port": join a cluster
    )
    num_cpus: int | None = bounded(None, ge=1)  # for the embedded local Ray only
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"  # loopback unless the user opts in
    object_store_memory: int | None = bounded(None, ge=1)  # bytes
    actor_timeout_s: float = bounded(600.0, gt=0)


@dataclass
class ModelConfig:
    policy: str = "builtin:smollm2-135m-instruct"  # hub id, local folder, or builtin:*
    trust_remote_code: bool = False


@dataclass
class TaskConfig:
    """The built-in arithmetic word problems (`data.train=builtin:arithmetic`), generated on the fly."""

    min_operand: int = bounded(1, ge=0)
    max_operand: int = bounded(9, ge=0)
    operations: str = "+-"
    steps: int = bounded(1, ge=1)  # operations per problem: 2 or 3 make multi-step word problems
    seed: int = bounded(0, ge=0)


@dataclass
class DataConfig:
    """Training and evaluation prompts (cluster/data/prompts.py).

    `train` / `eval`: builtin:arithmetic (task.*), a .jsonl/.jsonl.gz/.json/.parquet file, a `datasets` folder
    (save_to_disk or data files), or a hub id when online. Bad rows (malformed JSON, a missing key, an empty or
    over-long prompt) are skipped, logged with file:line and counted in the metrics (data/skipped/<reason>).
    """

    train: str = "builtin:arithmetic"
    eval: str | None = None  # builtin:arithmetic draws held-out problems with another seed
    split: str = "train"  # the split of a `datasets` source
    eval_split: str = "${data.split}"
    prompt_key: str = "prompt"  # a string or a list of {role, content}; dotted paths reach inside ("turns.0")
    system_prompt: str | None = None  # added as the system turn when a prompt has none
    answer_key: str | None = None  # the checkable answer, passed to objectives as the prompt's reference
    id_key: str | None = None  # a stable id for each prompt; default: its position in the source
    meta_keys: list[str] = field(
        default_factory=list
    )  # more fields for the objectives (e.g. IFEval's kwargs)
    # After the chat template; longer prompts are skipped and counted. None: generator.max_model_len minus
    # generator.max_new_tokens (what the generator can take).
    max_prompt_tokens: int | None = bounded(None, ge=1)
    prompts_per_iteration: int = bounded(8, ge=1)
    # Dynamic sampling (cluster/run/dynamic_sampling.py): prompt groups whose rewards do not vary are left out
    # (`zero_variance`) and more batches are drawn until prompts_per_iteration groups are informative, at most
    # max_oversampling batches per iteration
    dynamic_sampling: bool = False
    max_oversampling: int = bounded(4, ge=2, le=64)
    # The rewards the variance test sees. reward: the aggregated reward before reward.overlong's penalty (DAPO
    # filters on accuracy; verl's filter_groups.metric=acc). shaped_reward: after it, so groups differing only in
    # length are informative too (verl's seq_reward): with sparse rewards those then fill most of the batch.
    dynamic_sampling_on: str = one_of("reward", "shaped_reward")
    shuffle: bool = True  # a new seeded order each epoch
    seed: int = bounded("${run.seed}", ge=0)  # type: ignore[assignment]


@dataclass
class EvalConfig:
    """Evaluation on data.eval: before the first iteration, every `every` iterations, and after the last."""

    every: int = bounded(0, ge=0)  # 0: only before the first and after the last iteration
    prompts: int = bounded(64, ge=1)  # at most this many eval prompts (the first ones of the eval source)
    greedy: bool = True  # one greedy completion per prompt (metrics eval/greedy/*)
    samples: int = bounded(0, ge=0)  # also this many sampled completions per prompt at generator.temperature
    accuracy_objective: str = "correctness"  # eval/<mode>/accuracy is its mean where the objective is served


@dataclass
class MonitorConfig:
    # warn (and count) when corr(reward, response length) in a batch exceeds it
    length_corr_max: float = bounded(0.5, ge=-1, le=1)


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # event files under <run dir>/tensorboard
    wandb_project: str | None = (
        None  # set to log to Weights & Biases too (needs `wandb` installed and a login)
    )
    wandb_mode: str = one_of("online", "offline")
    # Set to log to MLflow too (needs `mlflow` or `mlflow-skinny`): "file:./mlruns", "sqlite:///mlflow.db",
    # "http://host:5000". Params are the flattened config (learner.lr, ...); resume=... continues the same MLflow run.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "troupe"
    quiet: bool = True  # Ray, vLLM and DeepSpeed logs go to <run dir>/logs/, not the console
    # Share of the prompt groups whose samples go to <run dir>/rollouts.jsonl with their reward breakdown (1: all,
    # 0: none); `troupe inspect <run dir>` reads it. The first `text_samples` of each iteration also go to
    # TensorBoard as text.
    rollouts: float = bounded(1.0, ge=0, le=1)
    text_samples: int = bounded(2, ge=0)


@dataclass
class FaultsConfig:
    """Deadlines of remote calls and retry budgets per role (cluster/durability/faults.py): a call past its deadline is a
    lost member; a role that loses more than its budget (within the window) stops the run with a checkpoint and an
    error naming it. Non-finite values: cluster/durability/nonfinite.py."""

    generate_s: float = bounded(600.0, gt=0)
    score_s: float = bounded(600.0, gt=0)
    # Every learner/critic group call (train, export, checkpoint): also bounds a stalled collective.
    learn_s: float = bounded(1800.0, gt=0)
    sync_s: float = bounded(600.0, gt=0)
    retries: dict[str, int] = bounded(
        factory=lambda: {"generator": 3, "reward": 3, "learner": 2, "critic": 2}, ge=0
    )
    # Losses older than this many iterations stop counting against faults.retries, so the budgets refill (0: every
    # loss of the run counts).
    retry_window_iterations: int = bounded(50, ge=0)
    # A non-finite (inf/NaN) reward or advantage drops its prompt group; a non-finite loss skips its optimizer step.
    # Both are counted (faults/nonfinite_*). skip: the run goes on | stop: a checkpoint after the iteration, then
    # an error.
    on_nonfinite: str = one_of("skip", "stop")


@dataclass
class DatasetConfig:
    """A preference file (JSONL, JSONL.gz, JSON or parquet) for offline DPO and reward-model jobs."""

    path: str | None = None
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    # Offline DPO: prompt + response tokens, longer pairs are skipped and counted. Reward-model training
    # (bt / haf / regression) uses it when rm.max_length is unset.
    max_length: int = bounded(512, ge=1)
    max_pairs: int | None = bounded(None, ge=1)
    # Reward-model jobs (rm train / rm eval): which pairs max_pairs / max_pairs_per_subset keep: "first" (file
    # order) or "random" (seeded by run.seed, kept in file order); max_pairs_per_subset caps each rm.subset_key
    # value, before max_pairs. The pairs left out are counted in the report's `dropped`.
    sample: str = one_of("first", "random")
    max_pairs_per_subset: int | None = bounded(None, ge=1)
    # offline DPO: pairs per learner call (one row of the metrics table)
    pairs_per_iteration: int = bounded(64, ge=1)


@dataclass
class RmConfig:
    """Reward-model jobs: `troupe rm train rm.stage=regression|gating|probe|bt|haf` and `troupe rm eval`."""

    stage: str = one_of("regression", "gating", "probe", "bt", "haf")
    name: str = "armo"  # the bundle's name = the objective key its scalar is served under
    backbone: str = "builtin:smollm2-135m-instruct"
    output: str = "${run.output_dir}/rm-${rm.name}"
    cache: str = "${run.output_dir}/feature-cache"  # a sub-folder per fingerprint, shared by all stages
    # Tokens per prompt + response, cut by one rule (actors/reward/backbone.py). Unset: rm_train uses
    # dataset.max_length (gating: the stage-1 bundle's), rm_eval the bundle's own. Set, it wins for every job.
    max_length: int | None = bounded(None, ge=1)
    # regression: a ratings file with one rating field per objective and its scale
    ratings_path: str | None = None
    response_key: str = "response"
    # {objective: [lo, hi]}. Typed Any with a None default: Hydra applies `rm.scales={...}` as a merge, and merging
    # new keys into an empty dict default fails in struct mode ("not in struct"); a None leaf is replaced instead.
    # Checked when read (cluster/data/ratings.py), naming rm.scales.<objective>.
    scales: Any = None
    scales_path: str | None = None  # a YAML/JSON file with the same mapping; rm.scales wins per objective
    # gating: the stage-1 bundle and the debiasing settings (pairs come from `dataset`)
    stage1: str | None = None
    verbosity: str | None = None
    verbosity_threshold: float = bounded(0.03, ge=-1, le=1)  # a Spearman correlation
    gating_steps: int = bounded(2000, ge=1)
    gating_lr: float = bounded(1e-3, gt=0)
    gating_batch: int = bounded(1024, ge=1)
    gating_hidden: int = bounded(1024, ge=1)
    gating_layers: int = bounded(3, ge=0)  # hidden layers of the gating MLP
    gating_temperature: float = bounded(10.0, gt=0)
    gating_dropout: float = bounded(0.2, ge=0, lt=1)
    # gating / probe: a Bradley-Terry loss that ends at chance (log 2) fails the job and marks the bundle failed
    # (serving refuses it); true keeps such a bundle as a usable one (rm eval of a failed bundle needs it too)
    allow_chance: bool = False
    # probe: a Bradley-Terry linear head on frozen backbone features of the response (L-BFGS, L2 penalty)
    probe_l2: float = bounded(1e-3, ge=0)
    probe_steps: int = bounded(500, ge=1)
    # bt / haf: trained on the learner group (learner.* sets DeepSpeed, lr, micro-batches)
    haf_alpha: float = bounded(0.2, ge=0)  # HaF's policy-loss weight; rm.stage=bt forces 0
    haf_beta: float = bounded(0.1, gt=0)
    epochs: int = bounded(1, ge=1)
    # rm_eval: which bundle and which of its outputs to compare; optional subset field and sections
    bundle: str | None = None
    eval_key: str | None = None  # default: the bundle's name
    subset_key: str | None = None
    sections: Any = None  # {section: [subsets or subset groups]}; Any/None as for rm.scales
    # rm_import: a local folder laid out like RLHFlow/ArmoRM-Llama3-8B-v0.1, written as a bundle to rm.output
    checkpoint: str | None = None


@dataclass
class TroupeConfig:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    env: EnvConfig = field(
        default_factory=EnvConfig
    )  # multi-turn environments (env.target unset: single-turn)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    rm: RmConfig = field(default_factory=RmConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    # Set by the subcommand (cluster/cli.py): rl is troupe train / dpo
    job: str = one_of("rl", "rm_train", "rm_eval", "rm_import", "rm_serve", "best_of_n")
    # Continue a run: "latest" (the newest complete checkpoint under run.output_dir) or a checkpoint folder.
    resume: str | None = None
    # Config keys a resume may find changed (globs: faults.*; a group name covers its keys). Any other change from
    # the checkpoint's config is refused, naming it (cluster/durability/fingerprint.py, which also lists the keys
    # always accepted: display, checkpoint cadence, logging, ray).
    resume_allow_changes: list[str] = field(default_factory=list)


def register() -> None:
    ConfigStore.instance().store(name="troupe_schema", node=TroupeConfig)
