#!/usr/bin/env bash
# Regenerates requirements/cpu-lock.txt (with hashes) from pyproject.toml and requirements/cpu-pins.in with
# pip-compile: every extra CI installs (not `gpu`, which is CUDA vLLM). Run after changing a dependency;
# tests/unit/test_packaging.py fails while pyproject.toml and the lock disagree.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-$here/.venv/bin/python}
cd "$here"
"$PY" -m piptools compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
  --no-emit-find-links --extra cpu --extra lora --extra plot --extra data --extra dev --extra wandb --extra mlflow \
  --output-file requirements/cpu-lock.txt pyproject.toml requirements/cpu-pins.in
