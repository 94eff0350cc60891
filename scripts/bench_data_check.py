"""``data check`` at scale: rows/s and peak memory on a large synthetic annotation (many rows over a
few thousand real images, scripts/make_large_annotation.py), with 1 and 2 CPUs, then the same check
again (validation reused from the cache), extrapolated to the COCO tutorial's 566,747 rows.

    python scripts/bench_data_check.py [--rows 1000000] [--images ROOT]

Each run is ``python -m raylora.data check FILE --root ROOT --model <demo base> --json --workers N``
in a process of its own, pinned to N CPUs (``taskset``), N = 1 (the rows read in that process), then
2 (a local Ray cluster of 2 CPUs: the rows checked by a Ray Data job of 2 actors), each with an empty
validation cache; its wall time and peak resident memory are measured (``wait4``: the largest of the
process and the processes it waited for, the Ray cluster it started included; a maximum, not a sum). The third run repeats
the 2-CPU one with its cache: what a second ``train`` or a sweep trial pays. Extrapolation: time and
memory grow with the rows (the images are few and the same): time in proportion, memory linearly
from the floor of a 1,000-row check (imports, tokenizer) to the measured peak.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TUTORIAL_ROWS = 566_747  # coco_karpathy_train_567k.jsonl


def check(annotation: Path, root: Path, model: Path, cpus: str, cache: Path) -> dict[str, Any]:
    """One data check in its own process: wall seconds, peak RSS (MiB, the child's own from wait4),
    its JSON, whether it reused the cache."""
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "raylora.data", "check", str(annotation)]
    cmd += ["--root", str(root), "--model", str(model), "--json", "--rejects", str(cache / "rejects.jsonl")]
    cmd += ["--workers", str(len(cpus.split(",")))]  # 1: in the process; 2: a Ray Data job of 2 actors
    env = {**os.environ, "RAYLORA_CACHE": str(cache)}
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "out.txt", "w") as out, open(cache / "err.txt", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    errors = (cache / "err.txt").read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"data check failed ({cpus} CPUs): {errors[-2000:]}")
    stats = json.loads((cache / "out.txt").read_text().strip().splitlines()[-1])
    reused = "validation reused" in errors
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "stats": stats, "reused": reused}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic annotation")
    p.add_argument("--images", type=Path, help="folder of real images (default: the demo's data)")
    args = p.parse_args(argv)
    from raylora.demo import ensure_demo

    sys.path.insert(0, str(REPO / "scripts"))
    from make_large_annotation import make

    demo = ensure_demo()
    root = (args.images or demo / "data").resolve()
    work = Path(tempfile.mkdtemp(prefix="raylora-bench-check-"))
    annotation = work / "annotation.jsonl"
    made = make(annotation, args.rows, root)
    mib = made["bytes"] / 2**20
    print(f"annotation: {made['rows']:,} rows over {made['images']:,} images, {mib:.0f} MiB", flush=True)
    small = work / "small.jsonl"
    make(small, 1000, root)
    base = check(small, root, demo / "base", "0,1", work / "c0")  # the process's floor: imports, tokenizer
    runs: dict[str, Any] = {}
    plan = (("1cpu", "0", work / "c1"), ("2cpu", "0,1", work / "c2"), ("2cpu_reused", "0,1", work / "c2"))
    for name, cpus, cache in plan:
        result = check(annotation, root, demo / "base", cpus, cache)
        runs[name] = result
        print(
            f"{name}: {result['seconds']:.1f}s, {args.rows / result['seconds']:,.0f} rows/s, "
            f"peak RSS {result['peak_rss_mib']:,.0f} MiB, validation reused: {result['reused']}",
            flush=True,
        )
    one, two, again = runs["1cpu"], runs["2cpu"], runs["2cpu_reused"]
    assert one["stats"]["rows_ok"] == two["stats"]["rows_ok"] == args.rows, "rows were rejected"
    assert again["reused"] and not one["reused"] and not two["reused"], "the cache did not behave"
    summary = {
        "rows": args.rows,
        "images": made["images"],
        "rows_per_s_1cpu": round(args.rows / one["seconds"]),
        "rows_per_s_2cpu": round(args.rows / two["seconds"]),
        "seconds_1cpu": round(one["seconds"], 1),
        "seconds_2cpu": round(two["seconds"], 1),
        "seconds_reused": round(again["seconds"], 1),
        "reused_vs_first": round(again["seconds"] / two["seconds"], 3),
        "peak_rss_mib_1cpu": round(one["peak_rss_mib"]),
        "peak_rss_mib_2cpu": round(two["peak_rss_mib"]),
        "peak_rss_mib_reused": round(again["peak_rss_mib"]),
        "tutorial_rows": TUTORIAL_ROWS,
        "tutorial_seconds_2cpu_extrapolated": round(TUTORIAL_ROWS * two["seconds"] / args.rows),
        "peak_rss_mib_1000_rows": round(base["peak_rss_mib"]),
        "tutorial_peak_rss_mib_extrapolated": round(
            base["peak_rss_mib"] + (two["peak_rss_mib"] - base["peak_rss_mib"]) * TUTORIAL_ROWS / args.rows
        ),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
