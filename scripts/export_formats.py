"""Export a one-caption-per-row chat JSONL (the demo's, COCO's Karpathy JSONL) to the other annotation
formats raylora reads, with the same rows in the same order:

    python scripts/export_formats.py ANNOTATION.jsonl OUT_DIR [--root IMAGE_ROOT]

writes ``OUT_DIR/captions.json`` (COCO captions: ``images`` + ``annotations``, file names relative to
the JSONL's image root), ``OUT_DIR/llava.json`` (a LLaVA JSON list of the rows as they are),
``OUT_DIR/parquet/`` (Parquet shards, one row per image: ``image`` as ``{bytes, path}`` like a Hugging
Face dataset, its captions in ``sentences``) and ``OUT_DIR/webdataset/`` (tar shards, one sample per
image: ``KEY.jpg`` and ``KEY.json`` with ``caption``, a list). The captions of an image must be
consecutive rows (as in COCO's Karpathy JSONL) for the shards to keep the rows' order. Train or check
the JSON files with the JSONL's image root (``python -m raylora.data check OUT_DIR/captions.json --root
ROOT``), the shards as they are (``python -m raylora.data check OUT_DIR/parquet``). ``IMAGE_ROOT``
defaults to the tutorial layout's (the folder above the annotation's). The last line printed is one
JSON object (rows, images, files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPT = "<image>\nProvide a one-sentence caption for the provided image."  # raylora's COCO rows ask this


SHARDS = 2  # Parquet files and tar shards written (images split evenly, in order)


def export(annotation: Path, out_dir: Path, root: Path | None = None) -> dict[str, object]:
    """Write the COCO captions, LLaVA, Parquet and WebDataset versions of ``annotation``; rows with
    another question, or with several images or answers, are refused (COCO JSON holds only captions)."""
    root = root or annotation.resolve().parent.parent
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
    order = list(images)
    captions: dict[str, list[str]] = {name: [] for name in order}
    for row in rows:
        captions[row["image"]].append(row["conversations"][1]["value"])
    if [row["image"] for row in rows] != [name for name in order for _ in captions[name]]:
        raise ValueError(
            f"{annotation}: the captions of an image are not consecutive rows; shards would reorder them"
        )
    per = -(-len(order) // SHARDS)
    for part, start in enumerate(range(0, len(order), per)):
        names = order[start : start + per]
        _write_parquet(out_dir / "parquet" / f"part-{part:05d}.parquet", names, captions, root)
        _write_tar(out_dir / "webdataset" / f"shard-{part:05d}.tar", names, captions, root)
    files = ["captions.json", "llava.json", "parquet", "webdataset"]
    return {"rows": len(rows), "images": len(images), "files": files}


def _write_parquet(path: Path, names: list[str], captions: dict[str, list[str]], root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": (root / n).read_bytes(), "path": Path(n).name} for n in names], image_type
            ),
            "sentences": pa.array([captions[n] for n in names], pa.list_(pa.string())),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _write_tar(path: Path, names: list[str], captions: dict[str, list[str]], root: Path) -> None:
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for n in names:
            key = Path(n).stem
            for member, data in (
                (f"{key}.jpg", (root / n).read_bytes()),
                (f"{key}.json", json.dumps({"caption": captions[n]}, ensure_ascii=False).encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotation", type=Path, help="a chat JSONL, one caption per row")
    p.add_argument("out_dir", type=Path, help="where captions.json, llava.json, parquet/ and webdataset/ go")
    p.add_argument("--root", type=Path, help="the JSONL's image root (default: the folder above its folder)")
    args = p.parse_args(argv)
    print(json.dumps(export(args.annotation, args.out_dir, args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
