"""Training throughput: Ray Train + DeepSpeed (1 worker, ZeRO-1 and ZeRO-2) against a plain
single-process torch loop over the same model, micro-batches and optimizer, in one run.

    python scripts/bench_train.py [--steps 40] [--threads 1]

The plain loop is the floor of overhead: pre-built micro-batches, ``forward_loss`` / backward /
clip / AdamW, nothing else. The Ray side is ``python -m raylora.train`` as users run it (its own
Ray Data decode actor, DeepSpeed engine, MLflow logging, a checkpoint at the end); its samples/s is
the mean of its logged windows in the second half of the run (start-up and the decode actor's
initial burst excluded), and the plain loop's is timed over the same second half. Both train the demo base with
the demo's LoRA on the demo rows in the tutorial layout (32 rows a step) with the same torch threads.
The last line is one JSON object: ``zero1_vs_plain``, ``zero2_vs_plain`` and the raw samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from raylora.cli import load
from raylora.data.pipeline import iter_microbatches
from raylora.data.plan import make_plan, plan_microbatches
from raylora.data.prepare import prepare
from raylora.demo import demo_image_settings, ensure_demo
from raylora.loss import forward_loss
from raylora.model import apply_lora, load_base_model

ROWS = (
    32  # rows per step (and per micro-batch: one worker, no accumulation), the demo's tutorial-layout batch
)


def plain_loop(root: Path, steps: int, cfg) -> float:
    """Samples/s of a bare torch loop over the same micro-batches (built before the clock starts)."""
    settings = demo_image_settings(root / "base")
    records = prepare(
        root / "data/annotations/demo_train.jsonl", root / "data", settings, use_ray=False
    ).table
    plan = make_plan(records.num_rows, ROWS, ROWS, 1, epochs=1, max_steps=steps)
    planned = plan_microbatches(records, plan, cfg.train.seed, cfg.train.group_by_length)
    batches = [
        {k: torch.as_tensor(v) for k, v in b.items()} for b in iter_microbatches(records, planned, settings)
    ]
    torch.manual_seed(cfg.train.seed)
    model = apply_lora(load_base_model(root / "base"), cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    start, done = None, 0
    for i, batch in enumerate(batches):
        if i == len(batches) // 2:  # the second half: steady state, as on the Ray side
            start, done = time.perf_counter(), 0
        loss_sum, tokens = forward_loss(model, batch, torch.float32)
        (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done += int(batch["samples"])
    return done / (time.perf_counter() - start)


def ray_run(stage: int, steps: int, threads: int, work: Path, tracking_uri: str) -> float:
    """Samples/s of ``raylora.train`` with one worker at ZeRO ``stage`` (its logged windows, the first dropped)."""
    from mlflow.tracking import MlflowClient

    from raylora.driver import run

    cfg = load(
        "demo",
        [
            f"train.zero_stage={stage}",
            f"train.max_steps={steps}",
            f"train.global_batch_size={ROWS}",
            f"train.per_device_batch_size={ROWS}",
            "data.group_by_image=false",
            "data.max_packed_tokens=0",
            "train.log_every_n_steps=5",
            f"train.checkpoint_every_n_steps={steps}",
            "eval.every_n_steps=-1",
            "cluster.num_workers=1",
            f"cluster.cpus_per_worker={threads}",
            "data.decode_cpus=0.5",
            f"cluster.storage_path={work / f'runs{stage}'}",
            f"cluster.run_name=bench-zero{stage}",
            f"output_dir={work / f'out{stage}'}",
            f"tracking.uri={tracking_uri}",
        ],
    )
    summary = run(cfg)
    history = MlflowClient(tracking_uri).get_metric_history(summary["mlflow_run_id"], "samples_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > steps // 2]  # steady state
    return sum(rates) / len(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--steps", type=int, default=120, help="optimizer steps per side (the second half is timed)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (= the worker's CPUs)")
    args = p.parse_args()
    import ray

    from raylora.cluster import runtime_env

    torch.set_num_threads(args.threads)
    root = ensure_demo()
    cfg = load("demo")
    ray.init(
        num_cpus=2,
        object_store_memory=1 << 30,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env(),
        log_to_driver=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        result = {"plain": plain_loop(root, args.steps, cfg)}
        for stage in (1, 2):
            result[f"zero{stage}"] = ray_run(stage, args.steps, args.threads, work, uri)
        result["plain_again"] = plain_loop(root, args.steps, cfg)  # drift check: load changes hit both
    ray.shutdown()
    plain = (result["plain"] + result["plain_again"]) / 2
    print(f"torch threads {args.threads}, {ROWS} rows a step, {args.steps} steps a side")
    for name in ("plain", "zero1", "zero2", "plain_again"):
        print(f"  {name:12s} {result[name]:7.1f} samples/s")
    out = {
        "zero1_vs_plain": round(result["zero1"] / plain, 3),
        "zero2_vs_plain": round(result["zero2"] / plain, 3),
        "samples_per_s": {k: round(v, 2) for k, v in result.items()},
        "threads": args.threads,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
