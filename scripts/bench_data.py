"""Decode + tile throughput on real COCO images: raylora against transformers' own InternVL image
processors and the floor (decode + one resize), then the Ray Data pipeline's micro-batches/s with
1 and 2 CPUs.

    python scripts/bench_data.py [--images 100] [--repeat 3] [--ray-batches 80] [--ray-repeat 2]

Images: the JPEGs under $RAYLORA_BENCH_IMAGES (searched recursively) if it is set, else the real
COCO images in tests/fixtures/coco (cycled up to --images). Every side decodes the file itself
(PIL), in this one process, at equal threads: torch.set_num_threads(1); PIL's decoder and resize
run on the calling thread. The sides are timed in turns, 10 images at a time, --repeat times; each
10-image chunk counts its fastest turn, so load from other processes on a shared machine inflates
no side more than another. Images/s of CPU time are printed beside the wall-clock ones.

Sides:
  raylora         ImageSettings.image_input(path): decode, grid tiles + thumbnail, uint8 (N, 3, 448, 448)
  hf_default      transformers' GotOcr2ImageProcessor (torchvision), crop_to_patches, max 6 + thumbnail,
                  rescaled and normalised to float (what it does by default)
  hf_pil          the same processor's PIL variant
  floor           decode + one PIL bicubic resize to the grid (no thumbnail, no tiles)
  decode          decode alone

Also: the largest pixel difference of raylora's and transformers' tiles from a direct PIL
implementation of InternVL's dynamic_preprocess (which the checkpoints were trained on).

Ray: a small dataset of the same images with real COCO captions (one row per caption), planned in
micro-batches of 4 and streamed by raylora.data.pipeline.rank_dataset + iter_rank_batches with
ray.init(num_cpus=1) (one decode actor), then num_cpus=2 (two), each in a cluster of its own, in
turns (1, 2, 1, 2, ...: --ray-repeat rounds, the fastest run of each counts); micro-batches/s at
steady state (the first few micro-batches, start-up included, are not counted).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(REPO))

IMAGE_SIZE = 448
MAX_TILES = 6
CAPTIONS_PER_IMAGE = 5  # COCO
CHUNK = 10
PROMPT = "<image>\nProvide a one-sentence caption for the provided image."


def bench_images(count: int) -> tuple[Path, list[Path], int]:
    """(root, ``count`` image paths cycled from the distinct ones, number of distinct images)."""
    env = os.environ.get("RAYLORA_BENCH_IMAGES")
    root = Path(env) if env else FIXTURES / "coco"
    distinct = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not distinct:
        raise SystemExit(f"no JPEG images under {root}")
    distinct = distinct[:count]
    return root, list(itertools.islice(itertools.cycle(distinct), count)), len(distinct)


# ------------------------------------------------------------------------------------ the sides


def hf_processor_classes() -> tuple[type, type]:
    """(torchvision processor, PIL processor) of the installed transformers."""
    try:  # transformers 5: the default class is the torchvision one, the PIL one has its own name
        from transformers import GotOcr2ImageProcessor, GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessor, GotOcr2ImageProcessorPil
    except ImportError:  # transformers 4: the default class is the PIL one, the fast one is separate
        from transformers import GotOcr2ImageProcessor, GotOcr2ImageProcessorFast

        return GotOcr2ImageProcessorFast, GotOcr2ImageProcessor


def hf_processor(cls: type, normalise: bool = True) -> Any:
    """InternVL's configuration (:func:`raylora.families.internvl.image_processor_for`) in processor ``cls``."""
    from raylora.families.internvl import image_processor_for as internvl_image_processor

    return internvl_image_processor(IMAGE_SIZE, MAX_TILES, cls, do_rescale=normalise, do_normalize=normalise)


def sides(settings: Any) -> dict[str, Callable[[str], Any]]:
    from PIL import Image

    from raylora.data.records import load_rgb
    from raylora.families.internvl import image_processor_for as internvl_image_processor
    from raylora.families.internvl.tiling import choose_grid

    tv_cls, pil_cls = hf_processor_classes()
    hf_default = internvl_image_processor(IMAGE_SIZE, MAX_TILES)
    if not isinstance(hf_default, tv_cls):  # transformers 4: its default class is the PIL one
        hf_default = hf_processor(tv_cls)
    hf_pil = hf_processor(pil_cls)

    def floor(path: str) -> Any:
        image = load_rgb(path)
        cols, rows = choose_grid(*image.size, IMAGE_SIZE, 1, MAX_TILES)
        return image.resize((IMAGE_SIZE * cols, IMAGE_SIZE * rows), Image.BICUBIC)

    return {
        "raylora": lambda p: settings.image_input(p).pixels,
        "hf_default": lambda p: hf_default(images=load_rgb(p), return_tensors="pt")["pixel_values"],
        "hf_pil": lambda p: hf_pil(images=load_rgb(p), return_tensors="np")["pixel_values"],
        "floor": floor,
        "decode": lambda p: load_rgb(p).load(),
    }


def time_sides(fns: dict[str, Callable[[str], Any]], paths: list[str], repeat: int) -> dict[str, dict]:
    """Images/s of each side: the sides take turns, CHUNK images at a time; each chunk counts its
    fastest of ``repeat`` turns (wall clock, and CPU time of this process)."""
    for fn in fns.values():  # warm-up: imports, caches, first-call set-up
        for p in paths[:2]:
            fn(p)
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    wall = {k: [float("inf")] * len(chunks) for k in fns}
    cpu = {k: [float("inf")] * len(chunks) for k in fns}
    for _ in range(repeat):
        for c, chunk in enumerate(chunks):
            for name, fn in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                for p in chunk:
                    fn(p)
                wall[name][c] = min(wall[name][c], time.perf_counter() - w0)
                cpu[name][c] = min(cpu[name][c], time.process_time() - c0)
    return {k: {"img_s": len(paths) / sum(wall[k]), "cpu_img_s": len(paths) / sum(cpu[k])} for k in fns}


# --------------------------------------------------------------------------------- pixel check


def internvl_reference(image: Any, image_size: int = IMAGE_SIZE, max_num: int = MAX_TILES) -> Any:
    """InternVL's ``dynamic_preprocess`` (use_thumbnail=True) in PIL, as uint8 (N, 3, S, S)."""
    import numpy as np
    from PIL import Image

    width, height = image.size
    aspect, area = width / height, width * height
    ratios = sorted(
        {
            (i, j)
            for n in range(1, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if i * j <= max_num
        },
        key=lambda r: r[0] * r[1],
    )
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    cols, rows = best
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return np.stack([np.asarray(t) for t in tiles]).transpose(0, 3, 1, 2)


def pixel_differences(paths: list[str], settings: Any) -> dict[str, int]:
    """Largest |tile - reference| over the images, in grey levels, of raylora and transformers."""
    import numpy as np

    from raylora.data.records import load_rgb

    tv_cls, pil_cls = hf_processor_classes()
    hf = {
        "hf_default": hf_processor(tv_cls, normalise=False),
        "hf_pil": hf_processor(pil_cls, normalise=False),
    }
    worst = {"raylora": 0, "hf_default": 0, "hf_pil": 0}
    for path in dict.fromkeys(paths):
        image = load_rgb(path)
        ref = internvl_reference(image).astype(np.int16)
        got = {"raylora": settings.image_input(path).pixels}
        for name, proc in hf.items():
            got[name] = np.asarray(proc(images=image, return_tensors="np")["pixel_values"])
        for name, tiles in got.items():
            if tiles.shape != ref.shape:
                raise SystemExit(f"{name}: {tiles.shape} tiles for {path}, the reference has {ref.shape}")
            worst[name] = max(worst[name], int(np.abs(tiles.astype(np.int16) - ref).max()))
    return worst


# ----------------------------------------------------------------------------------------- Ray


def caption_pool() -> list[str]:
    """Real COCO captions (the test fixtures'), in a fixed order."""
    captions = json.loads((FIXTURES / "coco_karpathy_train_captions.json").read_text())
    return [c for group in captions.values() for c in group]


def write_rows(root: Path, paths: list[str], rows: int, out: Path) -> None:
    """``rows`` InternVL chat rows (one caption each) over the images, cycled, as JSONL."""
    captions = itertools.cycle(caption_pool())
    images = itertools.cycle(dict.fromkeys(paths))
    with out.open("w") as f:
        for i in range(rows):
            rel = Path(next(images)).relative_to(root).as_posix()
            conv = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": next(captions)}]
            f.write(json.dumps({"id": i, "image": rel, "conversations": conv}) + "\n")


def ray_rate(records: Any, planned: Any, settings: Any, cpus: int, warmup: int) -> dict[str, float]:
    """Micro-batches/s of one rank's stream with ``cpus`` CPUs (one decode actor per CPU), counted
    from micro-batch ``warmup`` on; the cluster is started and shut down here."""
    import ray

    from raylora.cluster import runtime_env
    from raylora.data.pipeline import iter_rank_batches, rank_dataset

    env = runtime_env()
    # the Ray workers import raylora from this checkout, like this process
    env["env_vars"]["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    ray.init(
        num_cpus=cpus,
        object_store_memory=1 << 30,
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        ds = rank_dataset(records, planned, 0, 1, 0, settings, actors=cpus, cpus_per_actor=1.0)
        arrivals = [time.perf_counter() for _ in iter_rank_batches(ds, 0, 1)]
    finally:
        ray.shutdown()
    counted = len(arrivals) - 1 - warmup
    if counted < 1:
        raise SystemExit(f"only {len(arrivals)} micro-batches: raise --ray-batches above {warmup + 1}")
    return {
        "mb_s": counted / (arrivals[-1] - arrivals[warmup]),
        "first_batch_s": arrivals[0] - t0,
        "batches": len(arrivals),
    }


def ray_pipeline(root: Path, paths: list[str], settings: Any, batches: int, repeat: int) -> dict[str, Any]:
    from raylora.data.plan import make_plan, plan_microbatches
    from raylora.data.prepare import prepare

    per_batch = 4
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.jsonl"
        write_rows(root, paths, batches * per_batch, rows)
        prepared = prepare(rows, root, settings, use_ray=False)
    if prepared.rejects:
        raise SystemExit(f"rejected rows: {prepared.rejects[0].message()}")
    plan = make_plan(prepared.rows_ok, per_batch, per_batch, 1, epochs=1)
    planned = plan_microbatches(prepared.table, plan, seed=0)
    tiles = sum(sum(t) for t in prepared.table.column("tiles").to_pylist())
    out: dict[str, Any] = {"micro_batch": per_batch, "tiles_per_sample": tiles / prepared.rows_ok}
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(repeat):
        for cpus in (1, 2):
            runs[cpus].append(ray_rate(prepared.table, planned, settings, cpus, warmup=max(4, 2 * cpus)))
    for cpus, rs in runs.items():
        out[cpus] = max(rs, key=lambda r: r["mb_s"])
        out[cpus]["all_mb_s"] = [r["mb_s"] for r in rs]
    return out


# ---------------------------------------------------------------------------------------- main


def bench_settings() -> Any:
    """InternVL2's tiling (448 px tiles, 1..6 + thumbnail, 256 tokens a tile) with the demo tokenizer."""
    from raylora.data.settings import ImageSettings
    from raylora.demo import SYSTEM_MESSAGE, build_tokenizer, demo_dir, demo_template
    from raylora.families.internvl import InternVL

    tok = demo_dir() / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        tok = Path(tempfile.mkdtemp(prefix="bench-data-tokenizer-"))
        build_tokenizer(tok)
    return ImageSettings(
        tokenizer_path=str(tok),
        template=demo_template(),
        family=InternVL(image_size=IMAGE_SIZE, tokens_per_tile=256),
        system_message=SYSTEM_MESSAGE,
        max_num=MAX_TILES,
        max_seq_length=4096,
    )


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    return [rounded(v) for v in value] if isinstance(value, list) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100, help="images per timed pass (default 100)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed turns per 10-image chunk; the fastest counts"
    )
    parser.add_argument("--ray-batches", type=int, default=80, help="micro-batches per Ray run (default 80)")
    parser.add_argument(
        "--ray-repeat", type=int, default=2, help="Ray runs per CPU count, in turns; the fastest counts"
    )
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data part")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import PIL
    import torch
    import transformers

    torch.set_num_threads(1)
    started = time.perf_counter()
    root, paths, distinct = bench_images(args.images)
    paths = [str(p) for p in paths]
    settings = bench_settings()
    print(
        f"{len(paths)} decodes of {distinct} real COCO images ({root.name}/); torch threads "
        f"{torch.get_num_threads()}, PIL single-threaded; {os.cpu_count()} cores; Pillow {PIL.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    speed = time_sides(sides(settings), paths, max(1, args.repeat))
    diff = pixel_differences(paths, settings)
    tv_cls, pil_cls = hf_processor_classes()
    label = {
        "raylora": "raylora ImageSettings.tile (uint8)",
        "hf_default": f"transformers {tv_cls.__name__} (float)",
        "hf_pil": f"transformers {pil_cls.__name__} (float)",
        "floor": "floor: decode + one PIL resize to the grid",
        "decode": "decode alone",
    }
    print(f"\n{'side':<52} {'img/s':>7} {'img/s CPU':>10} {'max |diff| vs PIL':>18}")
    for name, s in speed.items():
        d = diff.get(name)
        print(f"{label[name]:<52} {s['img_s']:>7.1f} {s['cpu_img_s']:>10.1f} {'' if d is None else d:>18}")
    img_s = speed["raylora"]["img_s"]
    print(f"\n{'layout (raylora decode + tile)':<52} {'images/s':>9} {'captions/s':>11}")
    print(f"{'one row per caption (each caption decodes its image)':<52} {img_s:>9.1f} {img_s:>11.1f}")
    grouped = f"grouped by image ({CAPTIONS_PER_IMAGE} captions, one decode)"
    print(f"{grouped:<52} {img_s:>9.1f} {CAPTIONS_PER_IMAGE * img_s:>11.1f}")

    result: dict[str, Any] = {
        "vs_hf_default": img_s / speed["hf_default"]["img_s"],
        "vs_hf_pil": img_s / speed["hf_pil"]["img_s"],
        "vs_floor": img_s / speed["floor"]["img_s"],
        "vs_hf_default_cpu": speed["raylora"]["cpu_img_s"] / speed["hf_default"]["cpu_img_s"],
        "vs_floor_cpu": speed["raylora"]["cpu_img_s"] / speed["floor"]["cpu_img_s"],
    }
    for name, s in speed.items():
        result[f"{name}_img_s"] = s["img_s"]
        result[f"{name}_cpu_img_s"] = s["cpu_img_s"]
    for name, d in diff.items():
        result[f"{name}_max_abs_diff"] = d
    result.update(
        ungrouped_images_s=img_s,
        ungrouped_captions_s=img_s,
        grouped_images_s=img_s,
        grouped_captions_s=CAPTIONS_PER_IMAGE * img_s,
    )
    if not args.no_ray:
        ray = ray_pipeline(root, paths, settings, args.ray_batches, max(1, args.ray_repeat))
        print(
            f"\nRay Data pipeline: micro-batches of {ray['micro_batch']} samples, "
            f"{ray['tiles_per_sample']:.1f} tiles a sample, tokenized"
        )
        print(
            f"{'CPUs (decode actors)':<22} {'micro-batches/s':>16} {'images/s':>9} {'first batch after':>18}"
            f"  all runs (micro-batches/s)"
        )
        for cpus in (1, 2):
            r = ray[cpus]
            print(
                f"{cpus:<22} {r['mb_s']:>16.2f} {r['mb_s'] * ray['micro_batch']:>9.1f} "
                f"{r['first_batch_s']:>16.1f} s  {', '.join(f'{x:.2f}' for x in r['all_mb_s'])}"
            )
        scaling = ray[2]["mb_s"] / ray[1]["mb_s"]
        print(f"scaling 1 -> 2 CPUs: {scaling:.2f}x")
        result.update(
            ray_1cpu_mb_s=ray[1]["mb_s"],
            ray_2cpu_mb_s=ray[2]["mb_s"],
            ray_scaling_1_to_2=scaling,
            ray_1cpu_runs_mb_s=ray[1]["all_mb_s"],
            ray_2cpu_runs_mb_s=ray[2]["all_mb_s"],
            ray_micro_batch=ray["micro_batch"],
            ray_batches=args.ray_batches,
        )
    result.update(
        images=len(paths),
        distinct_images=distinct,
        torch_threads=torch.get_num_threads(),
        cores=os.cpu_count(),
        machine=platform.machine(),
        date=datetime.date.today().isoformat(),
        seconds=time.perf_counter() - started,
    )
    print(json.dumps({k: rounded(v) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
