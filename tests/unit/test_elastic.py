"""Elastic fleets without actors: the autoscaling rule, resize requests (`troupe fleet`), and which pools change."""

import json
from types import SimpleNamespace

import pytest

from troupe.cluster.fleet.elastic import AutoscaleConfig, FleetControl, PoolBounds, decide
from troupe.cluster.fleet.pool import Health, Member, Pool
from troupe.cluster.fleet.requests import FleetRequestError, main, parse_sizes, request_resize
from troupe.cluster.fleet.reward_pools import RewardFleet


def _run(generators=1, rules=1):
    def pool(role, n):
        p = Pool(role, factory=None, timeout_s=1)
        p.members = [Member(i, handle=None, health=Health.HEALTHY) for i in range(n)]
        return p

    return SimpleNamespace(
        generators=pool("generator", generators), rewards=RewardFleet({"rules": pool("reward", rules)})
    )


def test_decide_grows_on_backlog_shrinks_when_idle_within_bounds():
    b = PoolBounds(min=1, max=3)
    assert decide(1, 0.5, b, 0.3, 0.05) == 2
    assert decide(3, 0.9, b, 0.3, 0.05) == 3  # at max
    assert decide(2, 0.01, b, 0.3, 0.05) == 1
    assert decide(1, 0.0, b, 0.3, 0.05) == 1  # at min
    assert decide(2, 0.1, b, 0.3, 0.05) == 2  # between the thresholds: stay
    assert decide(5, 0.1, b, 0.3, 0.05) == 3  # outside the bounds: back inside


def test_parse_sizes_names_a_bad_argument():
    assert parse_sizes(["generators=4", "reward.rules=2"]) == {"generators": 4, "reward.rules": 2}
    for bad in (["generators"], ["generators=four"], ["generators=-1"]):
        with pytest.raises(FleetRequestError, match="expected <pool>=<size>"):
            parse_sizes(bad)


def test_request_is_applied_once_and_keeps_the_autoscaler_off_its_pools(tmp_path):
    run = _run()
    control = FleetControl(tmp_path, AutoscaleConfig(enabled=True, cooldown=0))
    busy = {"time/iteration": 1.0, "time/generate": 0.9, "time/score": 0.9}
    assert control.targets(run, 0, busy) == {"generators": 2, "reward.rules": 2}  # autoscaler alone
    request_resize(tmp_path, {"generators": 3})
    assert control.targets(run, 1, busy) == {"generators": 3, "reward.rules": 2}
    # The request was read once; the generators stay the person's (the autoscaler does not touch them).
    assert control.targets(run, 2, busy) == {"reward.rules": 2}
    run.generators.members.pop()  # a member lost: the target is the live count, so nothing to do
    assert "generators" not in control.targets(run, 3, {"time/iteration": 1.0})


def test_autoscaler_respects_its_cooldown(tmp_path):
    run = _run()
    control = FleetControl(tmp_path, AutoscaleConfig(enabled=True, cooldown=2))
    busy = {"time/iteration": 1.0, "time/generate": 0.9, "time/score": 0.0}
    control._changed_at["generators"] = 5
    assert "generators" not in control.targets(run, 6, busy)
    assert control.targets(run, 7, busy)["generators"] == 2


def test_unknown_pools_and_bad_files_are_moved_aside_without_resizing(tmp_path, caplog):
    run = _run()
    control = FleetControl(tmp_path)
    (tmp_path / "fleet.json").write_text(json.dumps({"sizes": {"generatorz": 2}, "requested_at": 1.0}))
    assert control.targets(run, 0, None) == {}
    assert "sizes.generatorz: this run has no such pool" in caplog.text
    (tmp_path / "fleet.json").write_text("{not json")
    assert control.targets(run, 1, None) == {}
    assert not (tmp_path / "fleet.json").exists() and len(list(tmp_path.glob("fleet.json.rejected-*"))) == 2
    assert control.step(run, 2, None)["fleet/rejected_requests"] == 2
    with pytest.raises(FleetRequestError, match="not a run folder"):
        request_resize(tmp_path / "missing", {"generators": 2})
    with pytest.raises(FleetRequestError, match="outside the pool's bounds"):
        request_resize(tmp_path, {"generators": 0})  # the run published its bounds when it first read


def test_fixed_pools_are_left_alone_by_requests_and_the_autoscaler(tmp_path, caplog):
    """Colocated generators live in the learner ranks' bundles: neither a request nor the policy resizes them."""
    run = _run()
    control = FleetControl(tmp_path, AutoscaleConfig(enabled=True, cooldown=0), fixed={"generators"})
    (tmp_path / "fleet.json").write_text(json.dumps({"sizes": {"generators": 3}, "requested_at": 1.0}))
    busy = {"time/iteration": 1.0, "time/generate": 0.9, "time/score": 0.9}
    assert control.targets(run, 0, busy) == {"reward.rules": 2}
    assert "placement.layout=colocated" in caplog.text
    with pytest.raises(FleetRequestError, match=r"sizes.generators=3: outside the pool's bounds \[1, 1\]"):
        request_resize(tmp_path, {"generators": 3})


def test_troupe_fleet_command_writes_the_request(tmp_path, capsys):
    assert main([str(tmp_path), "generators=2"]) == 0
    assert json.loads((tmp_path / "fleet.json").read_text())["sizes"] == {"generators": 2}
    assert main([str(tmp_path), "generators=x"]) == 2
    assert "expected <pool>=<size>" in capsys.readouterr().out
