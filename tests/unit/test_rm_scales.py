"""Rating scales for ArmoRM stage 1: `rm.scales={...}` overrides without a `+`, `rm.scales_path` reads a YAML file,
bad scales fail naming the key or file, and rated records that cannot be used are skipped and counted."""

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from troupe.cluster.config.checks import validate
from troupe.cluster.config.compose import CONF_DIR
from troupe.cluster.config.schema import register
from troupe.cluster.data.ratings import load_ratings, resolve_scales

register()


def _cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def test_dict_keys_override_without_plus():
    cfg = _cfg(
        "job=rm_train", "rm.ratings_path=r.jsonl", "rm.scales={helpfulness: [0, 4], verbosity: [0, 4]}"
    )
    validate(cfg)
    assert cfg.rm.scales == {"helpfulness": [0, 4], "verbosity": [0, 4]}
    assert _cfg("+rm.scales={a: [1, 5]}").rm.scales == {"a": [1, 5]}  # the old spelling still works
    assert _cfg("rm.sections={chat: [alpacaeval], math: [prm]}").rm.sections == {
        "chat": ["alpacaeval"],
        "math": ["prm"],
    }
    assert _cfg().rm.scales is None


def test_scales_path_alone_passes_validation_and_inline_wins(tmp_path):
    path = tmp_path / "scales.yaml"
    path.write_text("helpfulness: [0, 4]\nverbosity: [1, 5]\n")
    validate(_cfg("job=rm_train", "rm.ratings_path=r.jsonl", f"rm.scales_path={path}"))
    assert resolve_scales(None, str(path)) == {"helpfulness": (0.0, 4.0), "verbosity": (1.0, 5.0)}
    merged = resolve_scales({"verbosity": [0, 10]}, str(path))
    assert merged == {"helpfulness": (0.0, 4.0), "verbosity": (0.0, 10.0)}


def test_bad_scales_name_the_key_or_file(tmp_path):
    with pytest.raises(ValueError, match=r"rm\.scales\.helpfulness must be \[lo, hi\]"):
        resolve_scales({"helpfulness": [4, 0]}, None)
    with pytest.raises(ValueError, match=r"rm\.scales\.x must be"):
        resolve_scales({"x": "0-4"}, None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("helpfulness: [0]\n")
    with pytest.raises(ValueError, match=r"bad\.yaml\.helpfulness"):
        resolve_scales(None, str(bad))
    with pytest.raises(FileNotFoundError, match="rm.scales_path"):
        resolve_scales(None, str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="no rating scales"):
        resolve_scales(None, None)


def test_unusable_records_are_skipped_and_counted(tmp_path):
    rows = [
        {"prompt": "a", "response": "fine", "helpfulness": 3},
        {"prompt": "b", "response": "   ", "helpfulness": 2},  # empty response
        {"prompt": "c", "response": "no rating here"},  # no objective rated
        {"prompt": "d", "response": "ok", "helpfulness": 1},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ratings = load_ratings(str(path), {"helpfulness": (0, 4)})
    assert ratings.responses == ["fine", "ok"]
    assert ratings.skipped == {"empty_response": 1, "no_rating": 1}
    assert ratings.sources == [f"{path}:1", f"{path}:4"]
    assert ratings.labels[:, 0].tolist() == [0.75, 0.25]
