# Two entry points (see README): `make demo` runs the whole path on the embedded model,
# `make test` runs the test suite. Both create/update the project venv from constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clt-lens-installed

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,dashboard]"
	# sae-dashboard pins versions that conflict with circuit-tracer, so it goes in without deps.
	$(BIN)/python -m pip install -q --no-deps sae-dashboard==0.8.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# d3/plotly/dagre/pako for pages that open offline (pinned, from npm; kept once present)
	$(BIN)/clt-lens serve --install-js || echo "warning: page scripts not installed; the demo skips its dashboards"
	$(BIN)/clt-lens demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check clt_lens tests benchmarks tutorials scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
