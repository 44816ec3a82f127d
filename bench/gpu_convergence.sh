#!/usr/bin/env bash
# The prepared device command for the convergence bench at its GPU scale (one H100/H200).
#
#   bench/gpu_convergence.sh OUT_DIR [more `locoswarm bench convergence` flags]
#
# Writes OUT_DIR/results.jsonl (one JSON object per run), OUT_DIR/summary.json (means and
# spreads over 2 seeds, SparseLoCo vs the best DiLoCo per H, the goal checks),
# OUT_DIR/convergence.png, OUT_DIR/log.txt and OUT_DIR/gpu.txt. Sized to finish in under
# 8 minutes: no run starts after BUDGET_S seconds (default 300), and the summary lists any
# run that was left out. The payload signature needs `cryptography`, which the device image
# lacks: carry its wheels in .whl/ (docs/convergence.md, "GPU scale", says how).
set -euo pipefail
out=$(realpath -m "${1:?usage: bench/gpu_convergence.sh OUT_DIR [flags]}")
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ! python3 -c "import cryptography" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_convergence.sh: python3 lacks cryptography and .whl/ holds no wheels for it" >&2
        exit 2
    fi
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; python3 -c "import torch; print('torch', torch.__version__)"; } >"$out/gpu.txt" 2>&1
python3 -m locoswarm.cli bench convergence --scale gpu --device cuda --workers "${WORKERS:-8}" \
    --budget-s "${BUDGET_S:-300}" --json --out-dir "$out" "$@" 2>&1 | tee "$out/log.txt"
