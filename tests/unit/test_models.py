"""Model references: a missing local folder is named with its config key, a hub id passes through."""

import os

import pytest

from troupe.actors.models import resolve_model


@pytest.mark.parametrize(
    "ref",
    ["/nonexistent/troupe-model", "./no-such-model", "../no/such/model", "~/no-such-troupe-model", "a/b/c"],
)
def test_missing_local_folder_names_the_config_key_and_path(ref):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model(ref)
    assert "model.policy" in str(err.value) and ref in str(err.value)
    with pytest.raises(FileNotFoundError, match="rm.backbone"):
        resolve_model(ref, key="rm.backbone")


def test_hub_ids_and_existing_folders_resolve(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("gpt2") == "gpt2"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == os.path.abspath(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(empty))
