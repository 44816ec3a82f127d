#!/usr/bin/env bash
# The prepared GPU check (bench/device_check.py), as one command for a machine lent for minutes:
#   bench/device_check.sh OUTDIR
# Installs the project into a fresh virtualenv when none is there, then runs every step with
# its own time limit; the JSON files land in OUTDIR. Budget: under 8 minutes on one H100/H200.
set -euo pipefail
out=${1:?usage: bench/device_check.sh OUTDIR}
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -e .
fi
mkdir -p "$out"
timeout 460 .venv/bin/python -m bench.device_check "$out" "${@:2}"
