#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): kernel tests at real sizes, the engine against its exact reference on
# CUDA, and the benchmark cases that decide the performance goals; about 8 minutes on one H100/H200.
# Runs from the checkout without installing ghostdp (PYTHONPATH=.); packages the machine lacks are installed
# from the wheels in .whl/ (`make gpu-wheels` fetches them where pip can reach PyPI). Options: --help.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
