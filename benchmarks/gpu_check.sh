#!/usr/bin/env bash
# The first thing to run on a machine with a GPU: the CUDA tests and the training-step, mining and
# evaluation benchmarks on the device, in under 8 minutes, with one JSON of results (by default
# results/benchmarks/gpu_check.json). `--cpu-only` runs the same parts on the CPU at small sizes.
# Options: see benchmarks/gpu_check.py, or `bash benchmarks/gpu_check.sh --help`.
#
#   bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --cpu-only --out /tmp/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's virtual environment when there is one (scripts/setup_env.sh), else the `python`
# on PATH (an activated conda environment); $PYTHON overrides both.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
