#!/usr/bin/env bash
# The GPU check of issue 7 on one CUDA GPU, without Ray (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine, from anywhere
#   OUT=/dir bash benchmarks/gpu_check.sh            # the log also goes to /dir/gpu_check.log
#   bash benchmarks/gpu_check.sh --device cpu --quick   # extra arguments go to gpu_check.py
#
# Installs the wheels in .whl/ (benchmarks/gpu_wheels.sh fills it where pip reaches a
# registry) into /tmp/site when there are any, puts platform/ on PYTHONPATH and runs
# gpu_check.py --device cuda, unbuffered, stopped after GPU_CHECK_TIMEOUT seconds (default
# 420: the check must stay within 8 minutes on one GPU). Exits with gpu_check.py's status.
# Environment: PYTHON (default python3), GPU_CHECK_WHEELS (default .whl), GPU_CHECK_SITE
# (default /tmp/site), OUT.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${PYTHON:-python3}
wheels=${GPU_CHECK_WHEELS:-.whl}
site=${GPU_CHECK_SITE:-/tmp/site}
log=/dev/null
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    log=$OUT/gpu_check.log
fi

{
    echo "gpu_check.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit" \
         "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    shopt -s nullglob
    found=("$wheels"/*.whl)
    if ((${#found[@]})); then
        start=$SECONDS
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${found[@]}"
        echo "gpu_check.sh: installed ${#found[@]} wheels from $wheels into $site" \
             "in $((SECONDS - start)) s"
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$repo/platform${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    timeout "${GPU_CHECK_TIMEOUT:-420}" "$py" benchmarks/gpu_check.py --device cuda "$@"
} 2>&1 | tee "$log"
