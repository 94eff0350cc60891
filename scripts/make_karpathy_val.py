"""Derive the Karpathy val split files raylora validates on from Karpathy's ``dataset_coco.json``.

Writes ``coco_karpathy_val.json`` (``[{"image", "caption", "image_id"}]``, the layout of the
tutorial's test file) and ``coco_karpathy_val_gt.json`` (COCO caption format for pycocoevalcap).

    python scripts/make_karpathy_val.py data/coco/annotations/dataset_coco.json --out data/coco/annotations
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_coco", help="Karpathy's dataset_coco.json")
    p.add_argument("--out", default="data/coco/annotations", help="output folder")
    p.add_argument("--split", default="val", help="split to export (val or test)")
    args = p.parse_args()
    data = json.loads(Path(args.dataset_coco).read_text())
    items, images, anns = [], [], []
    for img in data["images"]:
        if img["split"] != args.split:
            continue
        rel = f"{img['filepath']}/{img['filename']}"
        caps = [s["raw"].strip() for s in img["sentences"]]
        items.append({"image": rel, "caption": caps, "image_id": img["cocoid"]})
        images.append({"id": img["cocoid"], "file_name": rel})
        anns += [
            {"image_id": img["cocoid"], "id": len(anns) + 1 + i, "caption": c} for i, c in enumerate(caps)
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"coco_karpathy_{args.split}.json").write_text(json.dumps(items))
    gt = {"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": anns}
    (out / f"coco_karpathy_{args.split}_gt.json").write_text(json.dumps(gt))
    print(f"{len(items)} images, {len(anns)} captions -> {out}")


if __name__ == "__main__":
    main()
