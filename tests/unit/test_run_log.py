"""Driver log routing: the Ray session link in a run folder that nothing else created yet."""

import types

import ray

from troupe.cluster.observe.run_log import link_ray_logs


def test_ray_log_link_made_in_a_fresh_run_folder(tmp_path, monkeypatch):
    session_logs = tmp_path / "session" / "logs"
    session_logs.mkdir(parents=True)
    node = types.SimpleNamespace(get_logs_dir_path=lambda: str(session_logs))
    monkeypatch.setattr(ray._private.worker, "_global_node", node)
    log_dir = tmp_path / "outputs" / "demo" / "logs"  # logging.quiet=false: no driver.log made it
    link = link_ray_logs(log_dir)
    assert link == log_dir / "ray" and link.resolve() == session_logs.resolve()
    assert link_ray_logs(log_dir).resolve() == session_logs.resolve()  # a resumed run relinks


def test_no_link_without_a_local_session(tmp_path, monkeypatch):
    monkeypatch.setattr(ray._private.worker, "_global_node", None)
    assert link_ray_logs(tmp_path / "logs") is None
    assert not (tmp_path / "logs" / "ray").exists()
