#!/usr/bin/env bash
# Download what a COCO-caption recipe needs (a model from the hub and COCO with the Karpathy splits),
# laid out as in InternVL's tutorial, relative to the current directory:
#   pretrained/<MODEL>/                      (e.g. InternVL2-2B, an original checkpoint raylora converts once,
#                                             or a transformers-native one: InternVL3_5-1B-HF, Qwen2.5-VL-3B-Instruct)
#   data/coco/train2014/, data/coco/val2014/
#   data/coco/annotations/coco_karpathy_train_567k.jsonl
#   data/coco/annotations/coco_karpathy_{val,test}.json and *_gt.json
# Run with --help for usage; --dry-run (or DRY_RUN=1) prints the plan and checks the tools offline.
set -euo pipefail

# (help and dry run use only bash builtins and python, hence read and printf rather than cat)
read -r -d '' USAGE <<'EOF' || true
Usage: bash scripts/download_coco.sh [--dry-run] [MODEL]

Downloads the hub model MODEL into pretrained/<its name>/ and COCO 2014 with the Karpathy
caption splits into data/coco/, relative to the current directory. Items already in place are
skipped and interrupted downloads resume, so after a failure just run it again.

  MODEL        ORG/NAME, or a NAME under OpenGVLab/; the recipes' models:
               InternVL2-2B (default), InternVL2-1B, InternVL2-4B, InternVL2-8B, InternVL2-26B,
               InternVL3_5-1B-HF, InternVL3_5-2B-HF, Qwen/Qwen2.5-VL-3B-Instruct,
               Qwen/Qwen3-VL-2B-Instruct
  --dry-run    no network access, nothing written: print each source (hub repo or URL) and
               its target path, check the needed tools, exit non-zero naming any missing one
               (same as DRY_RUN=1)
  -h, --help   this message

Needs: python with huggingface_hub (set PYTHON to choose the interpreter), wget or curl,
unzip; ~20 GB of disk for COCO 2014 (13 GB more while train2014.zip is unpacked).
HF_TOKEN and HF_ENDPOINT are honoured by huggingface_hub.
EOF
usage() { printf '%s\n' "$USAGE"; }

die() {
    echo "error: $*" >&2
    exit 1
}

DRY_RUN=${DRY_RUN:-0}
MODEL=
while [ $# -gt 0 ]; do
    case $1 in
        -n | --dry-run) DRY_RUN=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            usage >&2
            echo "error: unknown option: $1" >&2
            exit 2
            ;;
        *)
            [ -z "$MODEL" ] || {
                usage >&2
                echo "error: more than one MODEL given: $MODEL $1" >&2
                exit 2
            }
            MODEL=$1
            ;;
    esac
    shift
done
MODEL=${MODEL:-InternVL2-2B}
case $DRY_RUN in 0 | '' | false | no) DRY_RUN=0 ;; *) DRY_RUN=1 ;; esac
case $MODEL in
    */*/* | .* | */.* | */ | /*) die "MODEL is ORG/NAME or a NAME under OpenGVLab/ (such as InternVL2-2B or Qwen/Qwen2.5-VL-3B-Instruct), got: $MODEL" ;;
    */*) ;;
    *) MODEL=OpenGVLab/$MODEL ;;
esac

HERE=${BASH_SOURCE[0]%/*}
[ "$HERE" != "${BASH_SOURCE[0]}" ] || HERE=.
REPO_ID=$MODEL
MODEL_DIR=pretrained/${MODEL#*/}
COCO=data/coco
ANN=$COCO/annotations
COCO_ZIPS=http://images.cocodataset.org/zips
INTERNVL_DATA=https://github.com/OpenGVLab/InternVL/releases/download/data

# ---- tools ------------------------------------------------------------------------------------
# The model is fetched with huggingface_hub.snapshot_download(repo_id, local_dir=...) run by python,
# not with a hub CLI: that call has kept its signature across huggingface_hub 0.x to 2.x and resumes
# by default, whereas the CLI was renamed (huggingface-cli -> hf) and lost options on the way
# (--resume-download, --local-dir-use-symlinks). It also uses the hub library of the very
# interpreter raylora runs in, where a CLI on PATH may belong to another environment.
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
FETCHER=
if command -v wget >/dev/null 2>&1; then
    FETCHER=wget
elif command -v curl >/dev/null 2>&1; then
    FETCHER=curl
fi

missing=()
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    missing+=("python (no '$PYTHON' on PATH; install Python 3 or set PYTHON)")
elif ! HUB_VERSION=$("$PYTHON" -c 'import huggingface_hub; print(huggingface_hub.__version__)' 2>/dev/null); then
    missing+=("huggingface_hub (not importable by '$PYTHON'; pip install huggingface_hub)")
fi
[ -n "$FETCHER" ] || missing+=("wget or curl (neither is on PATH)")
command -v unzip >/dev/null 2>&1 || missing+=("unzip (not on PATH)")

if [ ${#missing[@]} -gt 0 ]; then
    for m in "${missing[@]}"; do echo "error: missing tool: $m" >&2; done
    exit 1
fi

# ---- steps ------------------------------------------------------------------------------------
# In a dry run each step prints its plan line and returns; nothing is created or fetched.

plan() { echo "$*"; }

# fetch URL DEST: download to DEST.part (resuming it), then rename, so DEST only ever exists complete.
fetch() {
    local url=$1 dest=$2 part=$2.part
    echo "fetching $url -> $dest"
    mkdir -p "$(dirname "$dest")" || die "cannot create the folder of $dest"
    case $FETCHER in
        wget) wget -c -O "$part" "$url" ;;
        curl) curl -fL --retry 3 -C - -o "$part" "$url" ;;
    esac || die "download of $url failed (partial file kept as $part); run the script again to resume"
    mv "$part" "$dest" || die "cannot rename $part to $dest"
}

# extract ZIP DIR: unzip into DIR, then delete the zip (a zip still present means extraction is unfinished).
extract() {
    local zip=$1 dir=$2
    echo "unzipping $zip -> $dir/"
    unzip -q -o "$zip" -d "$dir" ||
        die "unzip of $zip failed; if the zip is damaged delete it and run the script again"
    rm -f "$zip"
}

model() {
    if [ -f "$MODEL_DIR/config.json" ]; then
        plan "model   hub $REPO_ID -> $MODEL_DIR/ (present; the hub fetches only missing or changed files)"
    else
        plan "model   hub $REPO_ID -> $MODEL_DIR/"
    fi
    [ "$DRY_RUN" = 1 ] && return
    echo "fetching $REPO_ID with huggingface_hub $HUB_VERSION"
    mkdir -p "$MODEL_DIR" || die "cannot create $MODEL_DIR"
    "$PYTHON" -c 'import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], local_dir=sys.argv[2])' \
        "$REPO_ID" "$MODEL_DIR" ||
        die "download of hub repo $REPO_ID into $MODEL_DIR failed (check the name and the network; set HF_TOKEN if access is restricted); run the script again to resume"
}

# images NAME: COCO's NAME.zip extracted to data/coco/NAME/
images() {
    local name=$1 url=$COCO_ZIPS/$1.zip zip=$COCO/$1.zip
    if [ -d "$COCO/$name" ] && [ ! -f "$zip" ]; then
        plan "images  $url -> $COCO/$name/ (present, skipped)"
        return
    fi
    plan "images  $url -> $COCO/$name/ (via $zip)"
    [ "$DRY_RUN" = 1 ] && return
    [ -f "$zip" ] || fetch "$url" "$zip"
    extract "$zip" "$COCO"
    [ -d "$COCO/$name" ] || die "$zip did not contain $name/; delete $COCO/$name* and run the script again"
}

# annotation FILE: a file of InternVL's evaluation data, as is
annotation() {
    local url=$INTERNVL_DATA/$1 dest=$ANN/$1
    if [ -f "$dest" ]; then
        plan "annot.  $url -> $dest (present, skipped)"
        return
    fi
    plan "annot.  $url -> $dest"
    [ "$DRY_RUN" = 1 ] && return
    fetch "$url" "$dest"
}

train_annotation() {
    local url=$INTERNVL_DATA/coco_karpathy_train_567k.zip zip=$ANN/coco_karpathy_train_567k.zip
    local dest=$ANN/coco_karpathy_train_567k.jsonl
    if [ -f "$dest" ] && [ ! -f "$zip" ]; then
        plan "annot.  $url -> $dest (present, skipped)"
        return
    fi
    plan "annot.  $url -> $dest (via $zip)"
    [ "$DRY_RUN" = 1 ] && return
    [ -f "$zip" ] || fetch "$url" "$zip"
    extract "$zip" "$ANN"
    [ -f "$dest" ] || die "$url did not contain coco_karpathy_train_567k.jsonl"
}

# The validation split used during training and by sweeps (Karpathy val, 5,000 images) is derived
# from Karpathy's dataset_coco.json, which this script does not download.
VAL_READY=1
val_split() {
    local src=$ANN/dataset_coco.json
    local outs="$ANN/coco_karpathy_val.json and $ANN/coco_karpathy_val_gt.json"
    if [ -f "$ANN/coco_karpathy_val.json" ] && [ -f "$ANN/coco_karpathy_val_gt.json" ]; then
        plan "val     $outs (present, skipped)"
    elif [ -f "$src" ]; then
        plan "val     $src -> $outs (python $HERE/make_karpathy_val.py)"
        [ "$DRY_RUN" = 1 ] && return
        "$PYTHON" "$HERE/make_karpathy_val.py" "$src" --out "$ANN" ||
            die "deriving the val split from $src failed"
    else
        VAL_READY=0
        plan "val     $outs: not downloadable here; place Karpathy's dataset_coco.json at $src and run the script again (or: python $HERE/make_karpathy_val.py $src --out $ANN)"
    fi
}

if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: nothing is downloaded or written; tools: $PYTHON (huggingface_hub $HUB_VERSION), $FETCHER, unzip"
fi
model
images train2014
images val2014
# Karpathy test split and its ground truth, as published with InternVL's evaluation data
annotation coco_karpathy_test.json
annotation coco_karpathy_test_gt.json
# the 566,747-row training annotation of the tutorial
train_annotation
val_split

[ "$DRY_RUN" = 1 ] && exit 0
if [ "$VAL_READY" = 1 ]; then
    echo "done"
else
    echo "done, except the val split (see the 'val' line above)"
fi
echo "next: python -m raylora.data check $ANN/coco_karpathy_train_567k.jsonl --model $MODEL_DIR"
