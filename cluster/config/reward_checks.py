"""Checks of the reward section: objective entries (rules, plug-ins, http, judges), error policies, the judge
pools, aspect selection, the objectives the aggregation names, and those that must not be weighted. Each error
names its key. Single fields (ranges, choices) are checked by their declared domains (reward_schema.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from troupe.actors.field_domains import domain_errors
from troupe.actors.reward.objective import ON_ERROR
from troupe.cluster.config.schema import TroupeConfig

OBJECTIVE_TYPES = ("rule", "http", "judge")


def check_rewards(cfg: TroupeConfig, error: type[ValueError]) -> None:
    r = cfg.reward
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
    _check_selection(r, error)
    _check_aggregated_names(r, error)
    if r.hierarchy.select == "consistency" and cfg.generator.samples_per_prompt < 2:
        raise error(
            "reward.hierarchy.select=consistency compares responses to the same prompt: it needs "
            f"generator.samples_per_prompt >= 2, got {cfg.generator.samples_per_prompt}"
        )
    _refuse_debiased_verbosity(r, error)


def _check_selection(r, error) -> None:
    h = r.hierarchy
    if h.select == "consistency":
        if r.aggregation != "hierarchy":
            raise error("reward.hierarchy.select=consistency needs reward.aggregation=hierarchy")
        if not h.aspects:
            raise error(
                "reward.hierarchy.select=consistency needs candidate aspects in reward.hierarchy.aspects"
            )


def produced_objectives(r) -> set[str] | None:
    """The objective keys the reward fleet produces: reward.objectives (rules, plug-ins, http, judges) and what
    each expert's bundle.json says its heads output. None while an expert's bundle.json cannot be read (a run
    that gets that far fails loading it, naming the folder)."""
    from troupe.actors.reward.bundle import output_names, read_info

    names = set(r.objectives)
    for expert in r.experts.values():
        if not expert.bundle or not (Path(expert.bundle) / "bundle.json").exists():
            return None
        names |= output_names(read_info(expert.bundle, allow_failed=True))
    return names


def _check_aggregated_names(r, error) -> None:
    """The objectives the aggregation reads must be produced, or the first batch fails after start-up."""
    produced = produced_objectives(r)
    if produced is None:
        return
    if r.aggregation == "weighted_sum":
        uses = {"reward.weights": set(r.weights)}
    else:
        uses = {
            "reward.hierarchy.holistic": {r.hierarchy.holistic},
            "reward.hierarchy.aspects": set(r.hierarchy.aspects),
        }
    for key, names in uses.items():
        unknown = sorted(names - produced)
        if unknown:
            raise error(
                f"{key} names {unknown}, which no reward shard produces; produced: {sorted(produced)} "
                "(reward.objectives, and the outputs of the reward.experts bundles)"
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
    wrong = domain_errors(
        s, "serve."
    )  # also here: the service starts without validate() in tests and benches
    if wrong:
        raise error("; ".join(wrong))
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
