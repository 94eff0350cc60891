"""Captioning throughput: batch 16 against batch 1, side by side in one run, on the demo model (CPU).

    python scripts/bench_generate.py [--images 64] [--batch-size 16] [--repeats 2]

Prints images/s for both and their ratio; also checks that both produce the same captions.
"""

from __future__ import annotations

import argparse
import time

import torch

from raylora.data.records import read_karpathy
from raylora.demo import demo_image_settings, ensure_demo
from raylora.generation import GenerationSettings, generate_captions
from raylora.model import load_base_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="alternating timed rounds per setting (best kept)")
    args = p.parse_args()
    root = ensure_demo()
    settings = demo_image_settings(root / "base")
    model = load_base_model(root / "base").eval()
    ct = settings.conversation_tokenizer()
    items = read_karpathy(root / "data/annotations/demo_test.json", root / "data", limit=args.images)
    paths = [i.image for i in items]
    print(f"torch threads: {torch.get_num_threads()}, {len(paths)} images, demo model")
    best: dict[int, float] = {}
    captions: dict[int, list[str]] = {}
    for _ in range(args.repeats):
        for bs in (1, args.batch_size):  # alternate, so drift in machine load hits both
            t0 = time.perf_counter()
            captions[bs] = generate_captions(model, ct, settings, paths, GenerationSettings(batch_size=bs))
            best[bs] = min(best.get(bs, float("inf")), time.perf_counter() - t0)
    one, many = len(paths) / best[1], len(paths) / best[args.batch_size]
    same = captions[1] == captions[args.batch_size]
    print(f"batch 1: {one:.1f} images/s; batch {args.batch_size}: {many:.1f} images/s")
    print(f"batch {args.batch_size} is {many / one:.1f}x batch 1; identical captions: {same}")


if __name__ == "__main__":
    main()
