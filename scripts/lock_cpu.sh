#!/usr/bin/env bash
# Regenerates requirements/cpu-lock.txt (exact versions with hashes) from pyproject.toml and
# requirements/cpu-pins.in with uv: every extra CI installs (not `gpu`, which is CUDA vLLM). Versions already in the
# lock are kept where they still fit (uv reads the output file as preferences); add --upgrade to move them.
# Run after changing a dependency: tests/unit/test_packaging.py fails while pyproject.toml and the lock disagree.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
UV=${UV:-$here/.venv/bin/uv}
# torch 2.13.0+cpu: from a local wheel folder where the machine has one (TORCH_WHEELS, default /opt/wheels), else
# from the PyTorch CPU index
wheels=${TORCH_WHEELS:-/opt/wheels}
if compgen -G "$wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
  torch_source=(--find-links "$wheels")
else
  torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
"$UV" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
  "${torch_source[@]}" --no-emit-index-url --no-emit-find-links \
  --extra cpu --extra lora --extra plot --extra data --extra dev --extra wandb --extra mlflow \
  --output-file requirements/cpu-lock.txt "$@" pyproject.toml requirements/cpu-pins.in
