#!/usr/bin/env bash
# The prepared GPU check (README, "GPU check"): installs recnext and the wheels carried in .whl/ beside the machine's
# own torch, in a throwaway folder, then checks doctor, ops, train/test and bench against one deadline and writes
# gpu_check.json, gpu_check.md and gpu_check.log to --out. Everything is done by benchmarks/gpu_check.py.
#   on the GPU machine:   bash benchmarks/gpu_check.sh --out "$OUT"
#   CPU rehearsal here:   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --out /tmp/gpu-check
# PYTHON: the interpreter whose torch is checked (default python3: /opt/torch/.venv's on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py run "$@"
