#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs on a bare GPU machine without network (Python 3.12, CUDA
# torch, transformers 5.17; no Ray, MLflow or DeepSpeed): run this on a machine with network, then
# copy DIR with the project's tree and run `bash scripts/gpu_check.sh --wheels DIR` there.
#
#   bash scripts/gpu_wheels.sh DIR      # downloads into DIR, prints the total size (<= 48 MiB)
#
# What travels and why: transformers 5.21 (raylora's floor: 2-D logits_to_keep; it works with the
# machine's huggingface-hub 1.33 and tokenizers 0.23), peft, DeepSpeed (no binary wheel on the
# registry: built here as a pure-Python wheel, DS_BUILD_OPS=0, which needs torch installed here) and
# DeepSpeed's requirements that such a machine lacks (hjson, pydantic and its own). torch is the
# machine's own. Binary wheels are CPython 3.12 manylinux x86-64.
set -euo pipefail
DIR=${1:?usage: bash scripts/gpu_wheels.sh DIR}
mkdir -p "$DIR"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
WHEELS=(
    transformers==5.21.0
    peft==0.21.2
    hjson==3.1.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
)
echo "[gpu_wheels] downloading ${WHEELS[*]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" --platform any -d "$DIR" "${WHEELS[@]}"
if ! ls "$DIR"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    echo "[gpu_wheels] building deepspeed 0.19.8 as a pure-Python wheel (DS_BUILD_OPS=0)"
    python3 -c "import torch" 2>/dev/null || { echo "error: building the DeepSpeed wheel needs torch installed here" >&2; exit 2; }
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DIR"
fi
ls -1 "$DIR"/*.whl
BYTES=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
MIB=$(python3 -c "print(f'{$BYTES / 2**20:.1f}')")
echo "[gpu_wheels] $(ls "$DIR"/*.whl | wc -l) wheels, ${MIB} MiB in all (limit 48 MiB): $DIR"
python3 -c "import sys; sys.exit(0 if $BYTES <= 48 * 2**20 else 1)" || { echo "error: over 48 MiB" >&2; exit 1; }
