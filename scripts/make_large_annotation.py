"""Write a large synthetic chat JSONL: many rows pointing at a few thousand real images, to measure
``data check`` and validation at the COCO tutorial's scale (566,747 rows) and beyond.

    python scripts/make_large_annotation.py OUT.jsonl [--rows 1000000] [--images ROOT]

Images: every JPEG/PNG under ROOT (default: the demo's data folder, built on first use), cycled;
each row asks the COCO prompt and answers one of a few thousand generated captions (varied words
and lengths, so the tokenizer does real work). Rows go to OUT.jsonl with image paths relative to
ROOT: check it with ``python -m raylora.data check OUT.jsonl --root ROOT``. The last line printed is
one JSON object (rows, images, root, bytes).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

PROMPT = "<image>\nProvide a one-sentence caption for the provided image."
WORDS = (
    "a man woman child dog cat bus train plate of food red blue green small large wooden old new "
    "sitting standing walking next to on top of near in front behind street table field beach kitchen "
    "with two three several people group holding riding looking at the an under over room city park"
).split()


def make(out: Path, rows: int, root: Path, seed: int = 0) -> dict[str, object]:
    images = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    if not images:
        raise SystemExit(f"no JPEG or PNG images under {root}")
    rng = random.Random(seed)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(4096)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i in range(rows):
            row = {
                "id": i,
                "image": images[i % len(images)],
                "conversations": [
                    {"from": "human", "value": PROMPT},
                    {"from": "gpt", "value": captions[(i * 7919) % len(captions)]},
                ],
            }
            f.write(json.dumps(row) + "\n")
    return {"rows": rows, "images": len(images), "root": str(root), "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the JSONL to write")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows to write (default 1,000,000)")
    p.add_argument("--images", type=Path, help="folder of images (default: the demo's data folder)")
    args = p.parse_args(argv)
    root = args.images
    if root is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from raylora.demo import ensure_demo

        root = ensure_demo() / "data"
    print(json.dumps(make(args.out, args.rows, root.resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
