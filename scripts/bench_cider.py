"""Time pycocoevalcap's CIDEr (Java PTBTokenizer + ``Cider().compute_score``) against
``raylora.metrics.cider`` on a synthetic COCO-like set, and check that both give the same score.

The set is made from the real COCO captions in ``tests/fixtures``: every image takes the five
references of a real image, some of them spliced with another caption of that image at a word
boundary, and a candidate spliced from two of its captions, so captions look like COCO's and
the CIDEr is in the usual range.

    python scripts/bench_cider.py --images 5000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(REPO))


def real_caption_groups() -> list[list[str]]:
    """The five (or so) reference captions of each real image in the fixtures."""
    groups = [
        list(v) for v in json.loads((FIXTURES / "coco_karpathy_train_captions.json").read_text()).values()
    ]
    for name in ("coco_karpathy_val_gt_full.json", "coco_karpathy_test_gt_full.json"):
        by_image: dict[int, list[str]] = {}
        for ann in json.loads((FIXTURES / name).read_text())["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann["caption"])
        groups.extend(by_image.values())
    return [g for g in groups if len(g) >= 2]


def splice(a: str, b: str, rng: random.Random) -> str:
    """The start of caption ``a`` and the end of caption ``b``, cut at random word boundaries."""
    wa, wb = a.split(" "), b.split(" ")
    i = rng.randint(1, max(1, len(wa) - 1))
    j = rng.randint(1, max(1, len(wb) - 1))
    return " ".join(wa[:i] + wb[j:])


def synthetic_set(num_images: int, seed: int = 0) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """``gts`` (5 references per image) and ``res`` (1 candidate per image)."""
    rng = random.Random(seed)
    groups = real_caption_groups()
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for image_id in range(num_images):
        group = rng.choice(groups)
        refs = []
        for k in range(5):
            base = group[k % len(group)]
            refs.append(base if rng.random() < 0.4 else splice(base, rng.choice(group), rng))
        gts[image_id] = refs
        a, b = rng.sample(group, 2)
        res[image_id] = [splice(a, b, rng)]
    return gts, res


def pycocoevalcap_cider(gts: dict, res: dict) -> float:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    g = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
    r = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    score, _ = Cider().compute_score(g, r)
    return float(score)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the Java tokenizer)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000, help="number of images (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each side; the best counts")
    args = parser.parse_args(argv)

    from raylora import metrics

    gts, res = synthetic_set(args.images, args.seed)
    print(f"{args.images} images, {sum(map(len, gts.values()))} references, {len(res)} candidates")

    t_ours, t_warm, t_ref, cpu_ours, cpu_ref = [], [], [], [], []
    for _ in range(max(1, args.repeat)):
        metrics.clear_caches()  # cold: the lexer is built and the chunk cache filled in the timed call
        c0, t0 = cpu_seconds(), time.perf_counter()
        ours = metrics.cider(gts, res)
        t_ours.append(time.perf_counter() - t0)
        cpu_ours.append(cpu_seconds() - c0)
        t0 = time.perf_counter()
        metrics.cider(gts, res)
        t_warm.append(time.perf_counter() - t0)
        c0, t0 = cpu_seconds(), time.perf_counter()
        ref = pycocoevalcap_cider(gts, res)
        t_ref.append(time.perf_counter() - t0)
        cpu_ref.append(cpu_seconds() - c0)
    best_ours, best_ref = min(t_ours), min(t_ref)
    agree = abs(ours - ref) <= 1e-6
    print(
        f"raylora.metrics.cider is {best_ref / best_ours:.1f}x faster (pycocoevalcap {best_ref:.2f} s, "
        f"raylora {best_ours:.2f} s; {min(t_warm):.2f} s with a warm chunk cache; best of {len(t_ours)}); "
        f"scores {'agree' if agree else 'DIFFER'}: {ref:.6f} vs {ours:.6f}"
    )
    print(
        f"CPU time, Java included: pycocoevalcap {min(cpu_ref):.2f} s, raylora {min(cpu_ours):.2f} s "
        f"({min(cpu_ref) / min(cpu_ours):.1f}x)"
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
