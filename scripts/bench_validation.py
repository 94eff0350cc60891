"""Validation's cost to training: the demo trained without validation, with asynchronous validation
(the default: a Ray task captions each validated checkpoint while training goes on) and with inline
validation (the training ranks caption at the step), side by side in one run.

    python scripts/bench_validation.py [--steps 150] [--every 50]

Each variant is ``python -m raylora.train --config demo`` as a user runs it (its own local Ray cluster,
its own run folder and MLflow store), one after the other. Its time is the run's own ``seconds`` in
metrics.json: the trainer's fit, from the workers' start to the last checkpoint's validation scored
(Ray Train waits for pending validations before it returns), so a validation still running when
training ends is counted. The last line is one JSON object: ``async_vs_none`` and ``inline_vs_none``
(ratios of those times) and the raw numbers.
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

REPO = Path(__file__).resolve().parent.parent


def train(work: Path, name: str, steps: int, every: int, validation: str) -> dict:
    """One demo training in a process of its own; its metrics.json and the command's wall time."""
    out = work / name
    cmd = [sys.executable, "-m", "raylora.train", "--config", "demo", "--output", str(out)]
    cmd += [f"cluster.storage_path={work / 'runs' / name}", f"train.max_steps={steps}"]
    cmd += [f"eval.every_n_steps={every}", f"eval.validation={validation}", f"cluster.run_name={name}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / name}.db"
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    print(
        f"{name:>7}: fit {metrics['seconds']:.1f}s, command {wall:.1f}s, "
        f"evaluations {metrics['evaluations']}, adapter from step {metrics['selected']['step']}",
        flush=True,
    )
    return {
        "seconds": metrics["seconds"],
        "command_seconds": round(wall, 1),
        "evaluations": metrics["evaluations"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each run (the demo's 150)")
    p.add_argument("--every", type=int, default=50, help="validation every N steps (the demo's 50)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="raylora-bench-validation-") as tmp:
        work = Path(tmp)
        none = train(work, "none", args.steps, -1, "async")
        async_ = train(work, "async", args.steps, args.every, "async")
        inline = train(work, "inline", args.steps, args.every, "inline")
    result = {
        "steps": args.steps,
        "every_n_steps": args.every,
        "cpus": os.cpu_count(),
        "async_vs_none": round(async_["seconds"] / none["seconds"], 3),
        "inline_vs_none": round(inline["seconds"] / none["seconds"], 3),
        "none": none,
        "async": async_,
        "inline": inline,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
