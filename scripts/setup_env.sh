#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the pinned packages.
# torch is pinned to the CPU wheel 2.13.0; on a GPU machine install the matching CUDA build first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r envs/requirements.txt
echo "environment ready: source .venv/bin/activate"
