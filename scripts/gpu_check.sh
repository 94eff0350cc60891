#!/usr/bin/env bash
# The GPU check: one command that gives a verdict and figures from a GPU machine's first minutes.
#
#   OUT=DIR bash scripts/gpu_check.sh [--wheels WHEELS] [--cpu-dry-run] [--out DIR] [--stages a,b]
#
# On a bare one-GPU machine without network: installs the wheels from WHEELS (default gpu_wheels/,
# made by `bash scripts/gpu_wheels.sh gpu_wheels` on a networked machine) into a private folder
# (nothing in the machine's Python changes), then runs scripts/gpu_check.py: stages that each record
# their outcome (ok, or error with its message) and rewrite DIR/gpu_check.json after every stage, so
# a killed run keeps what it found. --cpu-dry-run runs every stage on the CPU with narrow models.
# The last line names the JSON file. See BENCHMARKS.md ("The GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=gpu_wheels
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        -h|--help) sed -n "2,10p" "$0"; exec python3 scripts/gpu_check.py --help ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=${TMPDIR:-/tmp}/raylora-gpu-check-site
    echo "[gpu_check] installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl; then
        export PYTHONPATH="$SITE:$PYTHONPATH"
    else
        echo "[gpu_check] the wheels did not install: the check runs with the machine's own packages"
    fi
else
    echo "[gpu_check] no wheels in $WHEELS: the machine's own packages are used"
fi
exec python3 scripts/gpu_check.py "${ARGS[@]}"
