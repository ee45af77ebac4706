#!/usr/bin/env bash
# `make gpu-check`, on a CUDA host in one command: the official vllm venv (`make setup-vllm` takes vllm where
# nvidia-smi sees a GPU), the vLLM-backend tests (tests/vllm with the openai client, the GPU test in
# tests/unit), then the serving benchmark's vLLM rows (slimserve --backend vllm beside vLLM's own server),
# written to docs/BENCHMARKS.md as the section serve-bench-gpu. Commit that section with the GPU's name.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! nvidia-smi -L; then
    echo "make gpu-check needs a CUDA GPU (nvidia-smi sees none); on a CPU host use make test-vllm" >&2
    exit 1
fi
make setup setup-vllm
.venv-vllm/bin/python -c "from slimserve.server.vllm_engine import vllm_platform as p; assert p() == 'cuda', p()"
.venv-vllm/bin/python -m pytest -m "vllm or gpu" tests/vllm tests/unit/test_vllm_backend.py
.venv/bin/python benchmarks/serve_bench.py --vllm-python .venv-vllm/bin/python --servers slimserve-vllm vllm-server \
    --concurrency 1 8 16 64 --max-batch 256 --section serve-bench-gpu --write docs/BENCHMARKS.md
