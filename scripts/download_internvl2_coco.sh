#!/usr/bin/env bash
# Download what the InternVL2 COCO-caption recipe needs, laid out as in InternVL's tutorial:
#   pretrained/InternVL2-2B/                 (original checkpoint; raylora converts it once, no remote code runs)
#   data/coco/train2014/, data/coco/val2014/
#   data/coco/annotations/coco_karpathy_train_567k.jsonl
#   data/coco/annotations/coco_karpathy_{val,test}.json and *_gt.json
# Usage: bash scripts/download_internvl2_coco.sh [MODEL]   (MODEL default InternVL2-2B; also 1B, 4B, 8B)
# Needs: huggingface-cli (pip install huggingface_hub), wget, unzip; ~20 GB of disk for COCO 2014.
set -euo pipefail
MODEL=${1:-InternVL2-2B}

mkdir -p pretrained data/coco/annotations
huggingface-cli download --resume-download OpenGVLab/"$MODEL" --local-dir pretrained/"$MODEL"

cd data/coco
[ -d train2014 ] || { wget -c http://images.cocodataset.org/zips/train2014.zip && unzip -q train2014.zip && rm train2014.zip; }
[ -d val2014 ] || { wget -c http://images.cocodataset.org/zips/val2014.zip && unzip -q val2014.zip && rm val2014.zip; }
cd annotations
# Karpathy test split and its ground truth, as published with InternVL's evaluation data
wget -c https://github.com/OpenGVLab/InternVL/releases/download/data/coco_karpathy_test.json
wget -c https://github.com/OpenGVLab/InternVL/releases/download/data/coco_karpathy_test_gt.json
# the 566,747-row training annotation of the tutorial
wget -c https://github.com/OpenGVLab/InternVL/releases/download/data/coco_karpathy_train_567k.zip
unzip -o -q coco_karpathy_train_567k.zip
# Karpathy's split file, from which the validation split is derived
[ -f dataset_coco.json ] || echo "place Karpathy's dataset_coco.json here to derive the val split (see scripts/make_karpathy_val.py)"
cd ../../..
# The validation split used during training and by sweeps (Karpathy val, 5,000 images)
[ -f data/coco/annotations/dataset_coco.json ] && python scripts/make_karpathy_val.py data/coco/annotations/dataset_coco.json --out data/coco/annotations
echo "done: python -m raylora.data check data/coco/annotations/coco_karpathy_train_567k.jsonl --model pretrained/$MODEL"
