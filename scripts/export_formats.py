"""Export a one-caption-per-row chat JSONL (the demo's, COCO's Karpathy JSONL) to the other annotation
formats raylora reads, with the same rows in the same order:

    python scripts/export_formats.py ANNOTATION.jsonl OUT_DIR

writes ``OUT_DIR/captions.json`` (COCO captions: ``images`` + ``annotations``, file names relative to
the JSONL's image root) and ``OUT_DIR/llava.json`` (a LLaVA JSON list of the rows as they are). Train
or check them with the JSONL's image root: ``python -m raylora.data check OUT_DIR/captions.json --root
ROOT``. The last line printed is one JSON object (rows, images, files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPT = "<image>\nProvide a one-sentence caption for the provided image."  # raylora's COCO rows ask this


def export(annotation: Path, out_dir: Path) -> dict[str, object]:
    """Write the COCO captions and LLaVA versions of ``annotation``; rows with another question, or
    with several images or answers, are refused (COCO JSON holds only captions)."""
    rows = [json.loads(line) for line in annotation.read_text(encoding="utf-8").splitlines() if line.strip()]
    images: dict[str, int] = {}
    annotations = []
    for n, row in enumerate(rows, 1):
        image = row["image"]
        turns = row["conversations"]
        if not isinstance(image, str) or len(turns) != 2 or turns[0]["value"] != PROMPT:
            raise ValueError(
                f"{annotation}:{n}: COCO captions hold one image and its caption of {PROMPT!r}; this row has more"
            )
        image_id = images.setdefault(image, len(images) + 1)
        annotations.append({"id": row.get("id", n), "image_id": image_id, "caption": turns[1]["value"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    coco = {
        "images": [{"id": i, "file_name": name} for name, i in images.items()],
        "annotations": annotations,
    }
    (out_dir / "captions.json").write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    (out_dir / "llava.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return {"rows": len(rows), "images": len(images), "files": ["captions.json", "llava.json"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotation", type=Path, help="a chat JSONL, one caption per row")
    p.add_argument("out_dir", type=Path, help="where captions.json and llava.json go")
    args = p.parse_args(argv)
    print(json.dumps(export(args.annotation, args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
