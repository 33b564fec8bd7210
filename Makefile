# The README's commands. Everything runs from the project's own environment in
# .venv/, created on first use from the exact pins in requirements.lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

LLAMA_VENV := .cache/llama-venv
LLAMA_SERVER := .cache/llama-server/build/bin/llama-server
LLAMA_STAMP := $(LLAMA_VENV)/.installed

.PHONY: venv model serve triton test test-fast bench bench-engine bench-large llama-venv reliability clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; test $${PIPESTATUS[0]} -eq 0
	touch $(STAMP)

venv: $(STAMP)

## Fetch the default model (SmolLM2-135M-Instruct) and export it into model_repository/.
model: $(STAMP)
	$(PY) -m stack.default_model

## Serve the default model: tritonserver + the OpenAI adapter, until Ctrl-C.
serve: $(STAMP)
	$(PY) -m stack.serve

## tritonserver alone on model_repository/ (ports from TRITON_*_PORT), in the foreground.
triton: $(STAMP)
	$(PY) -m stack.triton

## The whole test suite (unit, in-process adapter, end to end with real tritonserver).
test: $(STAMP)
	$(PY) -m pytest -ra

## Unit and in-process tests only (no tritonserver, no default-model export).
test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not e2e and not slow"

## The reliability suite against the real stack (make serve's): load, cancellation, faults,
## schemathesis and hostile input, each part bounded; writes docs/reliability.md and
## bench/results/reliability-<time>.json (about 8 minutes here; exit 1 if a check failed).
reliability: $(STAMP)
	$(PY) -m reliability

## Benchmark (not a test): the whole stack through the OpenAI API against llama.cpp's own
## C++ server (built once from source, about 6 minutes) and transformers, in one run;
## tables, JSON and plots in docs/bench-results/.
bench: $(STAMP) $(LLAMA_SERVER)
	$(PY) -m bench.serving

$(LLAMA_SERVER): bench/llama_server.py
	$(PY) -m bench.llama_server build

## The engine alone over gRPC at several precisions, with llama-cpp-python in process
## (its own venv, compiled from source once, about 8 minutes).
bench-engine: $(STAMP) $(LLAMA_STAMP)
	$(PY) -m bench.engine --llamacpp-python $(LLAMA_VENV)/bin/python

## Cost as the model grows: a Llama-3.2-1B-shaped checkpoint with random weights (made here,
## never downloaded) exported with llm-export and decoded at 1 and 16 streams, with the KV
## budget; docs/bench-results/large-model-<time>.json, .md (about 5 minutes here).
bench-large: $(STAMP)
	$(PY) -m bench.large_model

$(LLAMA_STAMP): bench/requirements-llamacpp.txt
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements-llamacpp.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; test $${PIPESTATUS[0]} -eq 0
	touch $(LLAMA_STAMP)

llama-venv: $(LLAMA_STAMP)

clean:
	rm -rf $(VENV) build .pytest_cache
