"""The feature cache keyed by fingerprint: one root serves different data side by side (stage 1's ratings, stage
2's pairs, an evaluation set), a rerun reads from disk, an interrupted extraction resumes, cut rows are remembered,
and the progress bar goes to stderr. Tiny local model, no Ray."""

import pytest
import torch

from troupe.actors.models import resolve_model
from troupe.actors.reward.backbone import RewardBackbone
from troupe.actors.reward.feature_cache import cached_features


@pytest.fixture(scope="module")
def backbone():
    return RewardBackbone(
        resolve_model("builtin:tiny-llama"), max_length=96
    )  # room for SmolLM2's default system block


def _rows(tag: str, n: int = 5):
    return [[{"role": "user", "content": f"{tag} Q{i}"}] for i in range(n)], [
        f"{tag} answer {i}" for i in range(n)
    ]


def test_different_data_share_one_root(backbone, tmp_path):
    first = cached_features(backbone, *_rows("ratings"), tmp_path, shard_size=2)
    second = cached_features(backbone, *_rows("pairs"), tmp_path, shard_size=2)
    assert first.stats["folder"] != second.stats["folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.stats["folder"].rsplit("/", 1)[1], second.stats["folder"].rsplit("/", 1)[1]]
    )
    again = cached_features(
        backbone, *_rows("ratings"), tmp_path, shard_size=2
    )  # stage 1 rerun after stage 2
    assert again.stats["computed"] == 0 and again.stats["reused"] == 3
    torch.testing.assert_close(again.response, first.response)
    direct, _ = backbone.features(*_rows("ratings"))
    torch.testing.assert_close(first.response, direct, rtol=1e-4, atol=1e-4)


def test_interrupted_extraction_resumes(backbone, tmp_path):
    first = cached_features(backbone, *_rows("x"), tmp_path, shard_size=2)
    assert first.stats["computed"] == 3
    (tmp_path / first.stats["folder"].rsplit("/", 1)[1] / "shard-00001.safetensors").unlink()
    resumed = cached_features(backbone, *_rows("x"), tmp_path, shard_size=2)
    assert resumed.stats["computed"] == 1 and resumed.stats["reused"] == 2
    torch.testing.assert_close(resumed.response, first.response)
    torch.testing.assert_close(resumed.prompt, first.prompt)


def test_cut_rows_are_stored_and_progress_goes_to_stderr(backbone, tmp_path, capsys):
    prompts, responses = _rows("c", 3)
    responses[1] = "long " * 100  # over max_length: cut
    fresh = cached_features(backbone, prompts, responses, tmp_path, shard_size=2, progress=True)
    assert fresh.cut.tolist() == [False, True, False] and fresh.stats["rows_cut"] == 1
    assert "features" in capsys.readouterr().err
    reused = cached_features(backbone, prompts, responses, tmp_path, shard_size=2)
    assert reused.stats["computed"] == 0 and reused.cut.tolist() == [False, True, False]
    assert capsys.readouterr().err == ""  # progress=False: silent
