"""Checks of the reward section: objective entries (rules, plug-ins, http, judges), error policies, the judge
pools, aspect selection, and the objectives that must not be weighted. Each error names its key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from troupe.actors.reward.objective import ON_ERROR
from troupe.cluster.config.schema import TroupeConfig

OBJECTIVE_TYPES = ("rule", "http", "judge")


def check_rewards(cfg: TroupeConfig, error: type[ValueError]) -> None:
    r = cfg.reward
    if r.on_error not in ON_ERROR:
        raise error(f"reward.on_error must be one of {list(ON_ERROR)}, got {r.on_error!r}")
    if not r.timeout_s > 0:
        raise error(f"reward.timeout_s must be > 0, got {r.timeout_s}")
    for name, params in r.objectives.items():
        key = f"reward.objectives.{name}"
        if not isinstance(params, Mapping):
            raise error(f"{key}: expected a mapping of parameters, got {type(params).__name__}")
        kind = params.get("type", "rule")
        if kind not in OBJECTIVE_TYPES:
            raise error(f"{key}.type must be one of {list(OBJECTIVE_TYPES)}, got {kind!r}")
        if params.get("on_error", r.on_error) not in ON_ERROR:
            raise error(f"{key}.on_error must be one of {list(ON_ERROR)}, got {params['on_error']!r}")
        timeout = params.get("timeout_s", r.timeout_s)
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise error(f"{key}.timeout_s must be a number > 0, got {timeout!r}")
        if kind == "http":
            _check_http(key, name, params, timeout, error)
        if kind == "judge":
            pool = params.get("pool", "judge")
            if pool not in r.judges:
                raise error(
                    f"{key}.pool={pool!r}: no such judge pool; define reward.judges.{pool}.model (known: "
                    f"{sorted(r.judges)})"
                )
        target = params.get("target")
        if target is not None and not (callable(target) or isinstance(target, str)):
            raise error(f"{key}.target: expected an import path or a function, got {type(target).__name__}")
    for name, judge in r.judges.items():
        if not judge.model:
            raise error(f"reward.judges.{name}.model: name the judge's chat model (a path or builtin:...)")
        if judge.replicas < 1:
            raise error(f"reward.judges.{name}.replicas must be >= 1, got {judge.replicas}")
    _check_selection(r, error)
    if r.hierarchy.select == "consistency" and cfg.generator.samples_per_prompt < 2:
        raise error(
            "reward.hierarchy.select=consistency compares responses to the same prompt: it needs "
            f"generator.samples_per_prompt >= 2, got {cfg.generator.samples_per_prompt}"
        )
    _refuse_debiased_verbosity(r, error)
    if not 0.0 <= cfg.logging.rollouts <= 1.0:
        raise error(f"logging.rollouts must be a share in [0, 1], got {cfg.logging.rollouts}")


def _check_selection(r, error) -> None:
    h = r.hierarchy
    if h.select not in ("none", "consistency"):
        raise error(f"reward.hierarchy.select must be none or consistency, got {h.select!r}")
    if h.select == "consistency":
        if r.aggregation != "hierarchy":
            raise error("reward.hierarchy.select=consistency needs reward.aggregation=hierarchy")
        if not 0.0 <= h.min_agreement <= 1.0:
            raise error(f"reward.hierarchy.min_agreement must be in [0, 1], got {h.min_agreement}")
        if not h.aspects:
            raise error(
                "reward.hierarchy.select=consistency needs candidate aspects in reward.hierarchy.aspects"
            )


def _refuse_debiased_verbosity(r, error) -> None:
    """ArmoRM's per-objective outputs are debiased against verbosity, so its own verbosity output is the
    verbosity left after removing verbosity: 0 for every sample. Weighting it does nothing; say so."""
    from troupe.actors.reward.bundle import read_info

    for expert in r.experts.values():
        if not expert.bundle or not (Path(expert.bundle) / "bundle.json").exists():
            continue  # a missing bundle is reported by its own check
        info = read_info(expert.bundle, allow_failed=True)
        if not info.verbosity:
            continue
        name = f"{info.name}/{info.verbosity}"
        uses = {
            "reward.weights": name in r.weights,
            "reward.hierarchy.aspects": r.aggregation == "hierarchy" and name in r.hierarchy.aspects,
            "reward.hierarchy.holistic": r.aggregation == "hierarchy" and r.hierarchy.holistic == name,
        }
        for key, used in uses.items():
            if used:
                raise error(
                    f"{key} uses {name!r}, the verbosity output of the ArmoRM bundle {expert.bundle}: ArmoRM "
                    "debiases every objective against verbosity, so this one is always 0 and weighting it does "
                    "nothing. Penalise length with a rule objective (reward.objectives.length) instead"
                )


def _check_http(key: str, name: str, params: Mapping, timeout: float, error) -> None:
    from troupe.actors.reward.remote_rm import HttpObjective

    if not params.get("url"):
        raise error(f"{key}: an http objective needs url (the reward service, e.g. http://host:8008)")
    try:
        http = HttpObjective.from_params(name, dict(params))
    except (TypeError, ValueError) as e:
        raise error(str(e)) from e
    # every attempt may take request_timeout_s, and the backoff doubles (with up to 100% jitter) between them
    worst = (http.retries + 1) * http.request_timeout_s + sum(
        2 * http.backoff_s * 2**k for k in range(http.retries)
    )
    if worst > timeout:
        raise error(
            f"{key}: {http.retries + 1} attempts of request_timeout_s={http.request_timeout_s} plus backoff may take "
            f"{worst:.0f} s, over the objective's timeout_s={timeout}: lower retries or request_timeout_s, or raise "
            "timeout_s"
        )


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_serve(s, error) -> None:
    """`troupe rm serve`'s limits, and no listening beyond this machine without a bearer token."""
    for key in (
        "max_items",
        "max_body_mb",
        "max_batch_items",
        "max_connections",
        "workers",
        "max_header_kb",
        "max_json_depth",
    ):
        if getattr(s, key) < 1:
            raise error(f"serve.{key} must be >= 1, got {getattr(s, key)}")
    if s.batch_wait_ms < 0 or s.retries < 0:
        raise error("serve.batch_wait_ms and serve.retries must be >= 0")
    for key in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
        if not getattr(s, key) > 0:
            raise error(f"serve.{key} must be > 0 seconds, got {getattr(s, key)}")
    if s.max_queued < s.max_items:
        raise error(
            f"serve.max_queued ({s.max_queued}) must be >= serve.max_items ({s.max_items}): a full request "
            "must fit in the queue"
        )
    if s.host not in LOOPBACK and not s.token_env:
        raise error(
            f"serve.host={s.host} listens beyond this machine: set serve.token_env to the name of an environment "
            f"variable holding a bearer token that clients must send, or bind to loopback ({', '.join(LOOPBACK)})"
        )
