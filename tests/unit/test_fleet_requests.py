"""Resize requests (cluster/fleet/requests.py): one validator for `troupe fleet` and the run; a bad fleet.json is
moved aside, logged and counted, and the run goes on."""

import json

import pytest

from tests.unit.test_elastic import _run  # the same tiny fleet of pools
from troupe.cluster.config.schema import AutoscaleConfig, PoolBounds
from troupe.cluster.fleet.elastic import FleetControl
from troupe.cluster.fleet.requests import (
    BOUNDS_FILE,
    MAX_BYTES,
    Bounds,
    FleetRequestError,
    Request,
    check_request,
    main,
    read_bounds,
    read_request_file,
)

NOW = 1_700_000_000.0
BOUNDS = {"generators": Bounds(1, 4, "autoscale.generators.min/max"), "reward.rules": Bounds(1, 2, "x")}


def _request(sizes=None, at=NOW) -> dict:
    return {"sizes": {"generators": 2} if sizes is None else sizes, "requested_at": at}


PROBES = [  # (what the file holds, the message that names what is wrong)
    ([_request()], "expected a JSON object .* got a list"),
    (_request({"generators": "4"}), r"sizes\.generators='4': expected an integer"),
    (_request({"generators": 2.0}), r"sizes\.generators=2\.0: expected an integer"),
    (_request({"generators": True}), r"sizes\.generators=True: expected an integer"),
    (_request(at="now"), r"requested_at='now': expected a unix time in seconds \(a number > 0\)"),
    (_request(at=0), r"requested_at=0: expected a unix time"),
    (_request(at=True), r"requested_at=True: expected a unix time"),
    (_request(at=NOW + 3600), r"requested_at=.*: 3600s in the future"),
    (_request({"generators": 0}), r"sizes\.generators=0: outside the pool's bounds \[1, 4\]"),
    (_request({"generators": 5}), r"sizes\.generators=5: outside the pool's bounds \[1, 4\] \(autoscale"),
    (_request({"reward.rulez": 1}), r"sizes\.reward\.rulez: this run has no such pool"),
    (_request({}), "sizes={}: expected an object"),
    ({**_request(), "priority": 1}, r"unknown keys \['priority'\]"),
    ({"sizes": {"generators": 2}}, r"missing keys \['requested_at'\]"),
]


@pytest.mark.parametrize("obj, message", PROBES)
def test_every_probe_is_refused_naming_the_field(obj, message):
    with pytest.raises(FleetRequestError, match=message):
        check_request(obj, BOUNDS, now=NOW)
    with pytest.raises(FleetRequestError, match=message):  # the same from the file's bytes
        check_request(json.dumps(obj).encode(), BOUNDS, now=NOW)


def test_bytes_that_are_not_a_request_file():
    with pytest.raises(FleetRequestError, match="not valid JSON"):
        check_request(b"{not json", BOUNDS, now=NOW)
    with pytest.raises(FleetRequestError, match="not UTF-8"):
        check_request(b'{"sizes": "\xff"}', BOUNDS, now=NOW)
    with pytest.raises(FleetRequestError, match="not valid JSON .*NaN"):
        check_request(b'{"sizes": {"generators": 2}, "requested_at": NaN}', BOUNDS, now=NOW)
    big = json.dumps({**_request(), "pad": "x" * MAX_BYTES}).encode()
    with pytest.raises(FleetRequestError, match="over 64 KiB"):
        check_request(big, BOUNDS, now=NOW)


def test_a_good_request_passes_with_or_without_bounds():
    assert check_request(_request({"generators": 4, "reward.rules": 2}), BOUNDS, now=NOW) == Request(
        {"generators": 4, "reward.rules": 2}, NOW
    )
    assert check_request(_request(at=NOW + 30), BOUNDS, now=NOW).requested_at == NOW + 30  # clock skew
    assert check_request(_request({"anything": 9}), None, now=NOW).sizes == {"anything": 9}
    with pytest.raises(FleetRequestError, match=r"sizes\.generators=0: expected an integer >= 1"):
        check_request(_request({"generators": 0}), None, now=NOW)


ISSUE_PROBES = [  # what broke runs (and every resume of them) before
    [_request()],
    _request({"generators": "4"}),
    _request(at="now"),
    _request({"generators": 0}),
    _request(at=1e12),  # far in the future whenever the test runs (a collection-time clock went stale)
    "{not json",
]


@pytest.mark.parametrize("obj", ISSUE_PROBES)
def test_the_run_moves_a_bad_file_aside_and_goes_on(tmp_path, caplog, obj):
    run, control = _run(), FleetControl(tmp_path)
    text = obj if isinstance(obj, str) else json.dumps(obj)
    (tmp_path / "fleet.json").write_text(text)
    assert control.targets(run, 0, None) == {}
    assert not (tmp_path / "fleet.json").exists()
    aside = list(tmp_path.glob("fleet.json.rejected-*"))
    assert len(aside) == 1 and aside[0].read_text() == text  # kept as it was, for the person
    assert len(caplog.records) == 1 and caplog.records[0].levelname == "WARNING"
    assert "rejected: " in caplog.text and aside[0].name in caplog.text
    assert control.step(run, 1, None)["fleet/rejected_requests"] == 1
    # a later good request is applied: nothing the bad one said blocks it
    (tmp_path / "fleet.json").write_text(json.dumps(_request({"generators": 3}, at=1.0)))
    assert control.targets(run, 2, None) == {"generators": 3}


def test_the_run_publishes_its_bounds_for_troupe_fleet(tmp_path):
    run = _run(generators=6)
    control = FleetControl(tmp_path, AutoscaleConfig(generators=PoolBounds(2, 4), reward=PoolBounds(0, 3)))
    control.publish(run)
    bounds = read_bounds(tmp_path)
    assert bounds["generators"] == Bounds(
        2, 6, "autoscale.generators.min/max"
    )  # up to the size it started at
    assert (bounds["reward.rules"].min, bounds["reward.rules"].max) == (1, 3)  # never below 1
    (tmp_path / BOUNDS_FILE).write_text("[1, 2]")
    with pytest.raises(FleetRequestError, match="fleet.pools.json is unreadable"):
        read_bounds(tmp_path)


def test_a_file_replaced_after_it_was_read_is_not_moved(tmp_path):
    """`troupe fleet` may replace a bad file between the run's read and its move: the new one stays to be read."""
    control = FleetControl(tmp_path)
    path = tmp_path / "fleet.json"
    path.write_text("{bad")
    _, inode = read_request_file(path)
    (tmp_path / "new").write_text(json.dumps(_request()))
    (tmp_path / "new").replace(path)
    control._reject(path, inode, "not valid JSON")
    assert json.loads(path.read_text()) == _request() and control.rejected == 1


def test_troupe_fleet_validates_what_it_writes(tmp_path, capsys):
    FleetControl(tmp_path, AutoscaleConfig(generators=PoolBounds(1, 4))).publish(_run())
    for args, message in (
        (["generators=9"], "sizes.generators=9: outside the pool's bounds [1, 4]"),
        (["generators=0"], "sizes.generators=0: outside the pool's bounds [1, 4]"),
        (["reward.judges=2"], "sizes.reward.judges: this run has no such pool"),
    ):
        assert main([str(tmp_path), *args]) == 2
        assert message in capsys.readouterr().out
        assert not (tmp_path / "fleet.json").exists()
    assert main([str(tmp_path), "generators=3", "reward.rules=2"]) == 0
    written = (tmp_path / "fleet.json").read_bytes()
    assert check_request(written, read_bounds(tmp_path)).sizes == {"generators": 3, "reward.rules": 2}
