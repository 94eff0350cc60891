"""``python -m raylora.data check ANNOTATION``: a pre-flight report on a caption dataset.

Validates every row and image exactly as training does: rows ok / rejected by reason, the
image units (tiles) and image tokens per image, and token length percentiles. Rejected rows go to ``--rejects``.
Rows that reuse an earlier row's id are kept and counted (a line appears when there are any).
With ``--json`` the last line printed is one JSON object with the same numbers.
Exit status: 0, or 1 when ``--strict`` met a bad row (it names file, line and reason).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from raylora.cli import DEMO, RECIPE_PATHS, model_spec
from raylora.cluster import console_options
from raylora.config import DataConfig, ModelConfig
from raylora.console import add_verbose_flag, run_command
from raylora.data.prepare import PARALLEL_BYTES, prepare
from raylora.data.records import SHARD_SUFFIXES, DataError
from raylora.files import file_entry, is_remote, list_files
from raylora.sources import image_settings, resolve_source

DATA_DEFAULTS, MODEL_DEFAULTS = DataConfig(), ModelConfig()


def check(args: argparse.Namespace) -> int:
    default_model = RECIPE_PATHS[0] if (Path(RECIPE_PATHS[0]) / "config.json").is_file() else DEMO
    source = resolve_source(model_spec(args.model or default_model))
    data = DataConfig(
        image_size=args.image_size,
        min_num=args.min_num,
        max_num=args.max_num,
        use_thumbnail=not args.no_thumbnail,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    settings = image_settings(
        source.base_dir,
        args.template or source.template,
        source.system_message,
        data,
        max_seq_length=args.max_seq_length,
        tokenizer_dir=source.tokenizer_dir,
    )
    root = args.root
    if root is None and args.annotation.endswith(".jsonl"):  # the tutorial's data/coco/annotations layout
        if is_remote(args.annotation):
            root = args.annotation.rsplit("/", 2)[0]
        else:
            root = str(Path(args.annotation).resolve().parent.parent)
    rejects = Path(args.rejects) if args.rejects else default_rejects_path(args.annotation)
    rejects.parent.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare(
            args.annotation,
            root,
            settings,
            strict=args.strict,
            progress=True,
            fmt=args.format,
            use_ray=start_workers(args.annotation, args.workers),
            ledger=rejects,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats = prepared.stats()
    prepared.write_rejects(rejects)
    print(
        f"annotation: {args.annotation} "
        + (f"(images under {root})" if root else "(images where it names them)")
    )
    print(settings.describe())
    print(f"rows: {stats['rows_total']} total, {stats['rows_ok']} ok, {stats['rows_rejected']} rejected")
    for reason, n in stats["rejects"].items():
        print(f"  rejected {reason}: {n}")
    if prepared.rejects:
        print(f"rejected rows written to {rejects}; first: {prepared.rejects[0].message()}")
    if stats["duplicate_ids"]:
        print(
            f"duplicate ids: {stats['duplicate_ids']} rows reuse an earlier row's id (rows kept, ids "
            f"are not used in training); first: {prepared.duplicate_ids()[0].message()}"
        )
    if len(stats["tiles"]) <= 12:  # tiles (a few values); image tokens of pixel-bounded families vary widely
        print("image units per image: " + ", ".join(f"{k}: {v}" for k, v in stats["tiles"].items()))
    i = stats["image_tokens"]
    print(f"image tokens per image: p50 {i['p50']}, p95 {i['p95']}, max {i['max']}")
    t = stats["tokens"]
    print(
        f"tokens per row: p50 {t['p50']}, p95 {t['p95']}, max {t['max']} (max_seq_length {args.max_seq_length})"
    )
    g = stats["groups"]
    per_image = ", ".join(f"{k}: {v}" for k, v in g["captions_per_image"].items())
    t = g["tokens_per_sequence"]
    print(
        f"grouped by image: {g['images']} images (data.group_by_image=true trains each as one sequence); "
        f"captions per image {per_image}; tokens per sequence p50 {t['p50']}, p95 {t['p95']}, max {t['max']}"
    )
    if args.json:
        print(json.dumps(stats))
    return 0


def start_workers(annotation: str, workers: int | None) -> bool:
    """Whether the check runs as a Ray Data job: ``--workers`` over 1, or by default a JSONL of
    :data:`PARALLEL_BYTES` or more (then one worker per CPU); a local Ray cluster of that many CPUs is
    started unless one is up."""
    import ray

    if ray.is_initialized():
        return True
    if workers is None:
        workers = (os.cpu_count() or 1) if _checked_bytes(annotation) >= PARALLEL_BYTES else 1
    if workers <= 1:
        return False
    print(
        f"[data] starting a local Ray cluster of {workers} CPUs for the check ...",
        file=sys.stderr,
        flush=True,
    )
    ray.init(num_cpus=workers, include_dashboard=False, **console_options())
    return True


def _checked_bytes(annotation: str) -> int:
    """The size of what a Ray Data job would check: a JSONL file, or a folder's Parquet files or tar
    shards (0 for the JSON formats, which the driver reads)."""
    if annotation.endswith(".jsonl"):
        entry = file_entry(annotation)
        return entry.size if entry is not None else 0
    return max(sum(f.size for f in list_files(annotation, suffixes)) for suffixes in SHARD_SUFFIXES.values())


def default_rejects_path(annotation: str) -> Path:
    """Beside a local annotation file (``X.rejects.jsonl``); in the current folder for a folder of
    shards or a remote URI (``<its name>.rejects.jsonl``)."""
    if not is_remote(annotation) and not Path(annotation).is_dir():
        return Path(annotation).with_suffix(".rejects.jsonl")
    return Path(annotation.rstrip("/").rsplit("/", 1)[-1] + ".rejects.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raylora.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "check",
        help="validate an annotation file and report on it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "annotation",
        help="chat-format JSONL (image + conversations per line), COCO captions JSON (captions_*.json), "
        "a LLaVA JSON list, a Parquet/Arrow file or folder (image + caption or sentences), a WebDataset "
        ".tar or folder of shards, or a meta JSON listing several; local or a URI (s3://bucket/prefix)",
    )
    c.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "coco", "llava", "parquet", "webdataset", "meta"],
        help="the annotation's format (default: told from the file or folder)",
    )
    c.add_argument(
        "--root",
        help="image root (default: for a JSONL the folder above the annotation's folder; a COCO file's "
        "images are looked for in its split's folder beside it or one level up; a LLaVA list's in its folder)",
    )
    c.add_argument(
        "--model",
        help=f"checkpoint whose tokenizer counts tokens (default: {RECIPE_PATHS[0]} if present, else the demo's)",
    )
    c.add_argument("--template", help="chat template (default: the model's)")
    c.add_argument("--image-size", type=int, help="tile side in px (default: the model's)")
    c.add_argument(
        "--min-num",
        type=int,
        default=DATA_DEFAULTS.min_num,
        help="minimum tiles per image (default %(default)s)",
    )
    c.add_argument(
        "--max-num",
        type=int,
        default=DATA_DEFAULTS.max_num,
        help="maximum tiles per image (default %(default)s)",
    )
    c.add_argument("--no-thumbnail", action="store_true", help="no thumbnail tile after a multi-tile grid")
    c.add_argument("--min-pixels", type=int, help="pixel-bounded families: min pixels (default: the model's)")
    c.add_argument("--max-pixels", type=int, help="pixel-bounded families: max pixels (default: the model's)")
    c.add_argument(
        "--max-seq-length",
        type=int,
        default=MODEL_DEFAULTS.max_seq_length,
        help="token budget per row incl. image tokens (default %(default)s)",
    )
    c.add_argument("--rejects", help="where rejected rows go (default: ANNOTATION with .rejects.jsonl)")
    c.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad row (exit 1), naming file, line and reason",
    )
    c.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    c.add_argument(
        "--workers",
        type=int,
        help="check the rows in this many Ray Data actors (a local Ray cluster of that many CPUs; default: "
        "one per CPU for a JSONL, or a folder of Parquet files or tar shards, of 16 MiB or more; else 1: in "
        "this process)",
    )
    add_verbose_flag(c)
    args = parser.parse_args(argv)
    return run_command(lambda: check(args), command="data-check", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
