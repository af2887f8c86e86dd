# Every target sets itself up on a fresh machine: a local .venv, CPU torch first, then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# AdapterHub's `adapters` 1.3.0 pins transformers ~= 4.57.6: its test oracle lives in a venv of its own.
AH_VENV := .venv-adapterhub
AH_STAMP := $(AH_VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-llm test $(AH_VENV) lint format docs bench clean

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

$(AH_STAMP):
	@echo "setup: creating $(AH_VENV) (AdapterHub's adapters 1.3.0 on transformers 4.57.6: the test oracle)"
	@$(PY) -m venv $(AH_VENV)
	@$(AH_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(AH_VENV)/bin/python -c "import torch" 2>/dev/null || $(AH_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	@$(AH_VENV)/bin/python -m pip install -q --disable-pip-version-check transformers==4.57.6 adapters==1.3.0 safetensors
	@touch $(AH_STAMP)

$(AH_VENV): $(AH_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# SmolLM2-135M-Instruct (prepared once from a pinned wheel) learns SST-2 as a chat task with LoRA
demo-llm: $(STAMP)
	$(BIN)/python examples/demo_llm.py

test: $(STAMP) $(AH_STAMP)
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
	rm -rf $(VENV) $(AH_VENV) site lightning_logs outputs
