# Two commands: `make demo` (set up, train the default task, draw it) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP) browser

# Headless Chromium for the report's browser test (tests/test_report.py); never fails the build:
# installs Debian's `chromium` when missing and we are root with apt-get, otherwise says why it could not.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get) for the browser test"; \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
	    || echo "note: apt-get install chromium failed; the browser test will be skipped"; \
	else echo "note: chromium not found and cannot install it (needs root and apt-get); the browser test will be skipped"; fi

demo: $(STAMP)
	$(VENV)/bin/topotorch train independence --out runs/demo --overwrite

test: setup
	$(PY) -m pytest -q -n 2

# The house habits (configured in pyproject.toml; .pre-commit-config.yaml runs the same on each commit).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_relocation.py --json runs/bench_relocation.json
	$(PY) benchmarks/bench_wiring_overhead.py --json runs/bench_wiring_overhead.json
	$(PY) benchmarks/bench_runs.py --json runs/bench_runs.json
	$(PY) benchmarks/bench_ddp.py --json runs/bench_ddp.json
	$(PY) benchmarks/bench_compact.py --json runs/bench_compact.json
	$(PY) benchmarks/bench_shrink.py --json runs/bench_shrink.json

clean:
	rm -rf runs .pytest_cache
