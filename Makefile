# Two commands: `make demo` (set up, train the default task, draw it) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/topotorch train independence --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

bench: $(STAMP)
	$(PY) benchmarks/bench_relocation.py --json runs/bench_relocation.json
	$(PY) benchmarks/bench_wiring_overhead.py --json runs/bench_wiring_overhead.json
	$(PY) benchmarks/bench_runs.py --json runs/bench_runs.json

clean:
	rm -rf runs .pytest_cache
