"""Hyperparameter sweep: Ray Tune over LoRA rank, learning rate and batch size, CIDEr as the objective.

    python -m raylora.sweep --trials 16                       # the demo (or the recipe if present)
    python -m raylora.sweep --config internvl2_2b_coco --trials 32
    python -m raylora.sweep --resume                          # continue an interrupted sweep

Each trial builds and fits the same TorchTrainer as ``raylora.train`` (Train V2 pattern); the
validation CIDEr it reports reaches Tune through Ray's TuneReportCallback, and ASHA stops weak
trials at its rungs. The search space is the config's ``sweep`` section. MLflow gets a parent run
for the sweep and a child run per trial; the best trial's adapter is registered as a new version of
the registered model, and its ``champion`` alias moves only if it beats the current champion.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from raylora.config import Config, ConfigError, config_from_args, config_parser

METRIC = "val_cider"
TRIAL_FN_CPUS = 0.01  # the trial function itself (Tune + Train V2 need a non-zero reservation)


# ------------------------------------------------------------------------------------ the space


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune's search space from ``cfg.sweep`` (dotted config keys -> Tune domains)."""
    from ray import tune

    s = cfg.sweep
    space: dict[str, Any] = {}
    if s.rank:
        space["lora.rank"] = tune.choice(s.rank)
    if s.lr_min > 0 and s.lr_max > s.lr_min:
        space["train.lr"] = tune.loguniform(s.lr_min, s.lr_max)
    if s.global_batch_size:
        space["train.global_batch_size"] = tune.choice(s.global_batch_size)
    if s.per_device_batch_size:
        space["train.per_device_batch_size"] = tune.choice(s.per_device_batch_size)
    for key, choices in s.extra.items():
        space[key] = tune.choice(choices)
    if not space:
        raise ConfigError("the sweep section defines no search space (sweep.rank, sweep.lr_min/lr_max, ...)")
    return space


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters and the sweep's per-trial overrides applied."""
    from raylora.config import _apply, validate

    cfg = copy.deepcopy(base)
    for key, value in {**cfg.sweep.trial_overrides, **params}.items():
        _apply(cfg, key, value, "sweep")
    if cfg.sweep.alpha_ratio > 0:
        cfg.lora.alpha = int(round(cfg.sweep.alpha_ratio * cfg.lora.rank))
    if cfg.eval.every_n_steps > 0:  # every report carries the objective (ASHA and the searcher need it)
        cfg.train.checkpoint_every_n_steps = cfg.eval.every_n_steps
    validate(cfg)
    return cfg


def default_point(cfg: Config, space: dict[str, Any]) -> dict[str, Any]:
    """The config's own values for the searched keys: evaluated first, so the sweep never does worse."""
    flat = cfg.flat()
    return {key: flat[key] for key in space if key in flat}


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial occupies: its Train workers plus its data actors."""
    c = trial_config(cfg, {})
    cpus = c.cluster.num_workers * c.cluster.cpus_per_worker + c.data.decode_actors * c.data.decode_cpus
    need = {"CPU": round(cpus + TRIAL_FN_CPUS, 6)}
    if c.cluster.use_gpu:
        need["GPU"] = c.cluster.num_workers * c.cluster.gpus_per_worker
    return need


def max_concurrent(cfg: Config, cluster: dict[str, float]) -> int:
    """Concurrent trials the cluster can run; an error when not even one fits (never PENDING forever)."""
    need = trial_resources(cfg)
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        raise RuntimeError(
            f"one trial needs {need} but the cluster has {{'CPU': {cluster.get('CPU', 0)}, 'GPU': {cluster.get('GPU', 0)}}}: "
            "lower cluster.num_workers / cpus_per_worker / gpus_per_worker in sweep.trial_overrides, or add nodes"
        )
    return min(fits, cfg.sweep.max_concurrent) if cfg.sweep.max_concurrent > 0 else fits


# ------------------------------------------------------------------------------------- a trial


def run_trial(params: dict[str, Any], job: Any, sweep_info: dict[str, Any]) -> None:
    """One Tune trial: a TorchTrainer on the trial's config, metrics forwarded to Tune."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylora.data.pipeline import make_plan
    from raylora.train import Job, build_trainer

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = trial_config(job.cfg, params)
    plan = make_plan(
        job.prepared.rows_ok,
        cfg.train.global_batch_size,
        cfg.train.per_device_batch_size,
        cfg.cluster.num_workers,
        cfg.train.epochs,
        cfg.train.max_steps,
    )
    trial_job = Job(cfg, job.model_dir, job.prepared, plan, f"{sweep_info['storage']}/trials/{trial_id}")
    mlflow.set_tracking_uri(sweep_info["tracking_uri"])
    client = MlflowClient()
    marker = Path(trial_job.run_dir) / "mlflow_run_id"
    if marker.is_file():
        run_id = marker.read_text().strip()
    else:
        run = client.create_run(
            sweep_info["experiment_id"],
            run_name=f"trial-{trial_id}",
            tags={
                "mlflow.parentRunId": sweep_info["parent_run_id"],
                "trial_id": trial_id,
                "trial_state": "running",
                "base_model": cfg.model.path,
                "config_hash": cfg.fingerprint(),
            },
        )
        run_id = run.info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
        client.log_param(run_id, "lora.alpha", cfg.lora.alpha)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(run_id)
    trainer, _ = build_trainer(
        trial_job, run_id, sweep_info["tracking_uri"], callbacks=[TuneReportCallback()]
    )
    trainer.fit()


# ------------------------------------------------------------------------------------ the driver


def _cluster_resources() -> dict[str, float]:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def build_tuner(
    cfg: Config, job: Any, sweep_info: dict[str, Any], trials: int, concurrency: int, restore: bool
):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    storage = sweep_info["tune_storage"]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job=job, sweep_info=sweep_info), {"CPU": TRIAL_FN_CPUS}
    )
    if restore:
        return tune.Tuner.restore(
            os.path.join(storage, sweep_info["name"]),
            trainable=trainable,
            resume_unfinished=True,
            restart_errored=True,
        )
    space = search_space(cfg)
    first = [default_point(cfg, space)]
    if cfg.sweep.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(
            OptunaSearch(metric=METRIC, mode="max", points_to_evaluate=first, seed=cfg.train.seed),
            max_concurrent=concurrency,
        )
    elif cfg.sweep.searcher == "random":
        from ray.tune.search import BasicVariantGenerator

        searcher = BasicVariantGenerator(
            points_to_evaluate=first, random_state=cfg.train.seed, max_concurrent=concurrency
        )
    else:
        raise ConfigError(f"sweep.searcher must be optuna or random, got {cfg.sweep.searcher!r}")
    max_t = trial_config(cfg, {}).train.max_steps
    scheduler = ASHAScheduler(
        time_attr="step",
        metric=METRIC,
        mode="max",
        max_t=max(max_t, 1),
        grace_period=cfg.sweep.grace_period * max(trial_config(cfg, {}).eval.every_n_steps, 1),
        reduction_factor=cfg.sweep.reduction_factor,
    )
    import ray.tune

    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=trials, search_alg=searcher, scheduler=scheduler, max_concurrent_trials=concurrency
        ),
        run_config=ray.tune.RunConfig(name=sweep_info["name"], storage_path=storage, verbose=1),
    )


def trial_rows(results: Any) -> list[dict[str, Any]]:
    """One row per trial: params, last CIDEr, steps, state, checkpoint.

    State: failed, completed (reached its own last step: batch size changes the step count), or
    stopped early (by ASHA).
    """
    rows = []
    for r in results:
        m = r.metrics or {}
        steps = m.get("step", 0)
        if r.error is not None:
            state = "failed"
        else:
            state = "completed" if steps >= m.get("total_steps", steps) else "stopped early"
        rows.append(
            {
                "trial_id": m.get("trial_id") or Path(r.path).name,
                "params": {k: v for k, v in r.config.items()},
                "cider": m.get(METRIC),
                "steps": steps,
                "total_steps": m.get("total_steps", steps),
                "state": state,
                "checkpoint": m.get("checkpoint_path"),
                "history": r.metrics_dataframe[["step", METRIC]].dropna().values.tolist()
                if r.metrics_dataframe is not None and METRIC in r.metrics_dataframe
                else [],
                "path": r.path,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", *keys, "CIDEr", "steps", "state"]
    lines = [head]
    for r in sorted(rows, key=lambda r: -(r["cider"] or -1)):
        vals = [r["trial_id"]] + [
            f"{r['params'].get(k):.2e}" if isinstance(r["params"].get(k), float) else str(r["params"].get(k))
            for k in keys
        ]
        lines.append(
            vals + [f"{r['cider']:.3f}" if r["cider"] is not None else "-", str(r["steps"]), r["state"]]
        )
    widths = [max(len(str(x[i])) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(x[i]).ljust(widths[i]) for i in range(len(head))) for x in lines)


def write_report(rows: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """PNG plots (CIDEr vs lr, vs rank, learning curves) and an HTML page with the trial table."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if r["cider"] is not None]
    files = []
    for key, name, log in (("train.lr", "cider_vs_lr.png", True), ("lora.rank", "cider_vs_rank.png", True)):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        pts = [
            (r["params"].get(key), r["cider"], r["state"]) for r in done if r["params"].get(key) is not None
        ]
        for state, color in (
            ("completed", "tab:blue"),
            ("stopped early", "tab:orange"),
            ("failed", "tab:red"),
        ):
            xs = [p[0] for p in pts if p[2] == state]
            ys = [p[1] for p in pts if p[2] == state]
            if xs:
                ax.scatter(xs, ys, label=state, color=color)
        if log:
            ax.set_xscale("log", base=10 if key == "train.lr" else 2)
        ax.set_xlabel(key)
        ax.set_ylabel("val CIDEr")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(out / name)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["history"]:
            xs, ys = zip(*r["history"])
            ax.plot(xs, ys, marker="o", label=r["trial_id"][-5:])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val CIDEr")
    ax.set_title("learning curves")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)
    files.append(out / "learning_curves.png")
    table = print_table(rows)
    page = (
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><pre>{html.escape(table)}</pre>"
        + "".join(f"<img src='{f.name}' style='max-width:48%'>" for f in files)
        + "</body></html>"
    )
    (out / "report.html").write_text(page)
    (out / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    return [*files, out / "report.html", out / "trials.json"]


def run_sweep(
    cfg: Config, trials: int | None = None, resume: bool = False, output_dir: str | Path | None = None
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the summary (best trial, registry version)."""
    from mlflow.tracking import MlflowClient

    from raylora import registry, tracking
    from raylora.train import complete_adapter_dir, init_ray, prepare_job, resolve_paths

    trials = trials or cfg.sweep.trials
    output = Path(output_dir or Path(cfg.output_dir).parent / f"{cfg.name}_sweep")
    output.mkdir(parents=True, exist_ok=True)
    uri, exp_id = tracking.setup(cfg)  # fails fast when the store is unreachable
    resolve_paths(cfg)  # missing model or data: an error before the cluster starts
    init_ray(cfg)
    concurrency = max_concurrent(cfg, _cluster_resources())
    job = prepare_job(cfg, output)
    name = cfg.cluster.run_name or f"{cfg.name}_sweep"
    storage = (
        cfg.cluster.storage_path
        if "://" in cfg.cluster.storage_path
        else os.path.abspath(cfg.cluster.storage_path)
    )
    state_file = Path(storage) / name / "raylora_sweep.json"
    client = MlflowClient()
    if resume:
        if not state_file.is_file():
            raise FileNotFoundError(f"no sweep to resume at {state_file.parent}; run without --resume first")
        parent_run_id = json.loads(state_file.read_text())["parent_run_id"]
        client.set_terminated(parent_run_id, "RUNNING")
    else:
        if state_file.is_file():
            raise RuntimeError(
                f"a sweep named {name!r} exists in {state_file.parent}: use --resume, or a new cluster.run_name"
            )
        parent = client.create_run(
            exp_id,
            run_name=name,
            tags={"sweep": "true", "base_model": cfg.model.path, "git_commit": tracking.git_commit()},
        )
        parent_run_id = parent.info.run_id
        with_params = {
            f"sweep.{k}": v for k, v in cfg.flat().items() if k.startswith(("sweep.", "model.", "data.train"))
        }
        for key, value in list(with_params.items())[:100]:
            client.log_param(parent_run_id, key, str(value)[:6000])
        client.log_param(parent_run_id, "trials", trials)
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"parent_run_id": parent_run_id, "trials": trials}))
    sweep_info = {
        "name": name,
        "storage": str(Path(storage) / name),
        "tune_storage": storage,
        "tracking_uri": uri,
        "experiment_id": exp_id,
        "parent_run_id": parent_run_id,
    }
    print(
        f"[sweep] {trials} trials, up to {concurrency} at a time ({trial_resources(cfg)} each); MLflow parent run {parent_run_id}",
        flush=True,
    )
    t0 = time.time()
    tuner = build_tuner(cfg, job, sweep_info, trials, concurrency, restore=resume)
    try:
        results = tuner.fit()
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    rows = trial_rows(results)
    for row in rows:
        marker = Path(sweep_info["storage"]) / "trials" / row["trial_id"] / "mlflow_run_id"
        if marker.is_file():
            child = marker.read_text().strip()
            row["mlflow_run_id"] = child
            client.set_tag(child, "trial_state", row["state"])
            if row["cider"] is not None:
                client.log_metric(child, "final_cider", row["cider"])
            client.set_terminated(
                child, {"failed": "FAILED", "stopped early": "KILLED"}.get(row["state"], "FINISHED")
            )
    table = print_table(rows)
    print(table, flush=True)
    scored = [r for r in rows if r["cider"] is not None and r["checkpoint"]]
    if not scored:
        client.set_terminated(parent_run_id, "FAILED")
        raise RuntimeError(
            "no trial reported a validation CIDEr; see the trial logs under " + sweep_info["storage"]
        )
    best = max(scored, key=lambda r: r["cider"])
    report_files = write_report(rows, output, f"raylora sweep {name}")
    for f in report_files:
        client.log_artifact(parent_run_id, str(f), "report")
    client.log_metric(parent_run_id, "best_cider", best["cider"])
    client.set_tag(parent_run_id, "best_trial", best["trial_id"])
    best_cfg = trial_config(cfg, best["params"])
    adapter = output / "champion_adapter"  # the trial's adapter plus tokenizer, processor and raylora.json
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(_local_checkpoint(best["checkpoint"]) / "adapter", adapter)
    complete_adapter_dir(adapter, job.model_dir, best_cfg.model.template, best_cfg.model.system_message)
    best_run = best.get("mlflow_run_id")
    if best_run:
        client.log_artifacts(best_run, str(adapter), "adapter")
        source = f"{client.get_run(best_run).info.artifact_uri}/adapter"
    else:
        source = adapter.resolve().as_uri()
    model_name = tracking.registered_model_name(cfg)
    version, moved = registry.register_adapter(
        model_name,
        source,
        best_run or parent_run_id,
        tags={
            "cider": str(best["cider"]),
            "trial_id": best["trial_id"],
            "base_model": cfg.model.path,
            "config_hash": best_cfg.fingerprint(),
            "sweep": name,
        },
        metric_key="cider",
        metric_value=best["cider"],
    )
    client.set_terminated(parent_run_id, "FINISHED")
    summary = {
        "best_trial": best["trial_id"],
        "best_cider": best["cider"],
        "best_params": best["params"],
        "registered_model": model_name,
        "version": version,
        "champion_moved": moved,
        "trials": len(rows),
        "stopped_early": sum(r["state"] == "stopped early" for r in rows),
        "seconds": round(time.time() - t0, 1),
        "report": str(output / "report.html"),
        "parent_run_id": parent_run_id,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(
        f"[sweep] best trial {best['trial_id']}: CIDEr {best['cider']:.3f} with {best['params']}; "
        f"registered {model_name} v{version}"
        + (" as champion" if moved else " (champion kept: it scores higher)")
        + f"; {summary['stopped_early']} of {len(rows)} trials stopped early; report {output / 'report.html'}",
        flush=True,
    )
    return summary


def _local_checkpoint(path: str) -> Path:
    if "://" not in path:
        return Path(path)
    import tempfile

    import pyarrow.fs as pafs

    dst = Path(tempfile.mkdtemp(prefix="raylora-best-"))
    fs, base = pafs.FileSystem.from_uri(path)
    pafs.copy_files(base, str(dst), source_filesystem=fs)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python -m raylora.sweep", __doc__, "sweep.lr_max=1e-3")
    parser.add_argument("--trials", type=int, help="number of trials (default: sweep.trials)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep of the same name and storage path",
    )
    parser.add_argument(
        "--searcher", choices=["optuna", "random"], help="search algorithm (default: sweep.searcher)"
    )
    parser.add_argument("--output", help="report directory (default: outputs/<config>_sweep)")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, [f"sweep.searcher={args.searcher}"] if args.searcher else [])
        run_sweep(cfg, args.trials, args.resume, args.output)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
