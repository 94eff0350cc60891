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
import html
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raylora import registry, tracking
from raylora.cli import config_from_args, config_parser
from raylora.cluster import init_ray
from raylora.config import Config, ConfigError, apply_override, validate
from raylora.console import run_command
from raylora.files import absolute, is_remote
from raylora.sources import complete_adapter_dir
from raylora.train import (
    ValidationSet,
    build_trainer,
    check_paths,
    checkpoint_state,
    make_job,
    prepare_data,
    validation_set,
)

# ray (Tune) and mlflow are imported inside the functions that use them: --help and config errors stay fast.

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
        if not choices:
            raise ConfigError(f"sweep.extra: {key} has no choices")
        for choice in choices:  # a bad choice is an error now, not in a trial hours into the sweep
            try:
                trial_config(cfg, {key: choice})
            except ConfigError as e:
                raise ConfigError(f"sweep.extra: {key}={choice!r}: {e}") from None
        space[key] = tune.choice(choices)
    if not space:
        raise ConfigError("the sweep section defines no search space (sweep.rank, sweep.lr_min/lr_max, ...)")
    return space


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters and the sweep's per-trial overrides applied."""
    cfg = copy.deepcopy(base)
    for key, value in {**cfg.sweep.trial_overrides, **params}.items():
        apply_override(cfg, key, value, "sweep")
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
    per_worker = (
        c.cluster.cpus_per_worker + c.data.decode_actors * c.data.decode_cpus
    )  # its own decode actors
    cpus = c.cluster.num_workers * per_worker
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


@dataclass(frozen=True)
class Sweep:
    """What every trial shares, resolved once by the sweep driver."""

    cfg: Config
    name: str
    model_dir: Path
    records: Any  # ObjectRef of the validated records
    num_records: int
    validation: ValidationSet | None
    storage: str  # <storage_path>/<sweep name>: Tune's experiment dir, trials under trials/
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def trial_mlflow_run(sweep: Sweep, cfg: Config, trial_id: str, params: dict[str, Any], run_dir: str) -> str:
    """The trial's child run: the one it started before (a resumed sweep), or a new one."""
    marker = Path(run_dir) / "mlflow_run_id"
    if marker.is_file():
        return marker.read_text().strip()
    run_id = tracking.create_run(
        sweep.experiment_id,
        f"trial-{trial_id}",
        tags={
            "trial_id": trial_id,
            "trial_state": "running",
            "base_model": cfg.model.path,
            "config_hash": cfg.fingerprint(),
        },
        params={**params, "lora.alpha": cfg.lora.alpha},
        parent_run_id=sweep.parent_run_id,
        uri=sweep.tracking_uri,
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)
    return run_id


def run_trial(params: dict[str, Any], sweep: Sweep) -> None:
    """One Tune trial: the training job of the trial's config; its reports reach Tune.

    A trial whose run already reached its last step (a sweep driver killed after the trial's final
    checkpoint) reports that checkpoint's metrics instead of training again.
    """
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(sweep.cfg, params)
    run_dir = f"{sweep.storage}/trials/{trial_id}"
    run_id = trial_mlflow_run(sweep, cfg, trial_id, params, run_dir)
    job = make_job(
        cfg,
        sweep.model_dir,
        sweep.records,
        sweep.num_records,
        run_dir,
        sweep.validation,
        sweep.tracking_uri,
        run_id,
    )
    if job.finished:
        state = checkpoint_state(ray.train.Checkpoint(job.resume_from))
        tune.report({**state, "checkpoint_path": job.resume_from})
        return
    build_trainer(job, callbacks=[TuneReportCallback()]).fit()


# ------------------------------------------------------------------------------------ the driver


def _cluster_resources() -> dict[str, float]:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def build_tuner(sweep: Sweep, trials: int, concurrency: int, restore: bool) -> Any:
    """Tune's Tuner over :func:`run_trial`: the searcher (config point first), ASHA on val CIDEr."""
    import ray.tune
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg = sweep.cfg
    tune_storage, name = sweep.storage.rstrip("/").rsplit("/", 1)
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"CPU": TRIAL_FN_CPUS})
    if restore:
        return tune.Tuner.restore(
            sweep.storage, trainable=trainable, resume_unfinished=True, restart_errored=True
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
    trial_defaults = trial_config(cfg, {})
    scheduler = ASHAScheduler(
        time_attr="step",
        metric=METRIC,
        mode="max",
        max_t=max(trial_defaults.train.max_steps, 1),
        grace_period=cfg.sweep.grace_period * max(trial_defaults.eval.every_n_steps, 1),
        reduction_factor=cfg.sweep.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=trials, search_alg=searcher, scheduler=scheduler, max_concurrent_trials=concurrency
        ),
        run_config=ray.tune.RunConfig(name=name, storage_path=tune_storage, verbose=1),
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


def open_parent_run(cfg: Config, storage: str, name: str, trials: int, resume: bool) -> tuple[str, str, str]:
    """(tracking uri, experiment id, parent run id): the sweep's MLflow parent run, new or resumed.

    The parent run id is kept in ``<storage>/raylora_sweep.json``, so ``--resume`` continues it.
    """
    uri, exp_id = tracking.setup(cfg)
    state_file = Path(storage) / "raylora_sweep.json"
    if resume:
        if not state_file.is_file():
            raise FileNotFoundError(f"no sweep to resume at {storage}; run without --resume first")
        parent_run_id = json.loads(state_file.read_text())["parent_run_id"]
        tracking.reopen_run(parent_run_id, uri)
        return uri, exp_id, parent_run_id
    if state_file.is_file():
        raise RuntimeError(
            f"a sweep named {name!r} exists in {storage}: use --resume, or a new cluster.run_name"
        )
    params = {
        f"sweep.{k}": v for k, v in cfg.flat().items() if k.startswith(("sweep.", "model.", "data.train"))
    }
    parent_run_id = tracking.create_run(
        exp_id,
        name,
        tags={"sweep": "true", "base_model": cfg.model.path, "git_commit": tracking.git_commit()},
        params={**dict(list(params.items())[:100]), "trials": trials},
        uri=uri,
    )
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": parent_run_id, "trials": trials}))
    return uri, exp_id, parent_run_id


def close_trial_runs(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """Each trial's child run gets its final state (tag and status) and final CIDEr."""
    c = tracking.client(sweep.tracking_uri)
    for row in rows:
        marker = Path(sweep.storage) / "trials" / row["trial_id"] / "mlflow_run_id"
        if not marker.is_file():
            continue
        child = marker.read_text().strip()
        row["mlflow_run_id"] = child
        c.set_tag(child, "trial_state", row["state"])
        if row["cider"] is not None:
            c.log_metric(child, "final_cider", row["cider"])
        status = {"failed": "FAILED", "stopped early": "KILLED"}.get(row["state"], "FINISHED")
        tracking.end_run(child, status, sweep.tracking_uri)


def register_champion(sweep: Sweep, best: dict[str, Any], output: Path) -> tuple[str, int, bool]:
    """The best trial's adapter (plus tokenizer, processor, raylora.json) as a new registry version;
    ``champion`` moves to it if it beats the current one. Returns (name, version, moved)."""
    best_cfg = trial_config(sweep.cfg, best["params"])
    adapter = output / "champion_adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(_local_checkpoint(best["checkpoint"]) / "adapter", adapter)
    complete_adapter_dir(adapter, sweep.model_dir, best_cfg.model.template, best_cfg.model.system_message)
    best_run = best.get("mlflow_run_id")
    if best_run:
        tracking.log_artifacts(best_run, adapter, "adapter", sweep.tracking_uri)
        source = tracking.artifact_uri(best_run, "adapter", sweep.tracking_uri)
    else:
        source = adapter.resolve().as_uri()
    model_name = tracking.registered_model_name(sweep.cfg)
    version, moved = registry.register_version(
        model_name,
        source,
        best_run or sweep.parent_run_id,
        tags={
            "trial_id": best["trial_id"],
            "base_model": sweep.cfg.model.path,
            "config_hash": best_cfg.fingerprint(),
            "sweep": sweep.name,
        },
        metric_key="cider",
        metric_value=best["cider"],
        tracking_uri=sweep.tracking_uri,
    )
    return model_name, version, moved


def run_sweep(
    cfg: Config, trials: int | None = None, resume: bool = False, output_dir: str | Path | None = None
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the summary (best trial, registry version)."""
    trials = trials or cfg.sweep.trials
    output = Path(output_dir or Path(cfg.output_dir).parent / f"{cfg.name}_sweep")
    output.mkdir(parents=True, exist_ok=True)
    sweep, concurrency = start_sweep(cfg, trials, resume, output)
    print(
        f"[sweep] {trials} trials, up to {concurrency} at a time ({trial_resources(cfg)} each); "
        f"MLflow parent run {sweep.parent_run_id}",
        flush=True,
    )
    t0 = time.time()
    try:
        results = build_tuner(sweep, trials, concurrency, restore=resume).fit()
    except BaseException:
        tracking.end_run(sweep.parent_run_id, "FAILED", sweep.tracking_uri)
        raise
    return finish_sweep(sweep, trial_rows(results), output, time.time() - t0)


def start_sweep(cfg: Config, trials: int, resume: bool, output: Path) -> tuple[Sweep, int]:
    """Checks, the cluster, validated data and the parent run: what every trial shares; concurrency."""
    import ray

    tracking.check_tracking(tracking.tracking_uri(cfg))  # fails fast when the store is unreachable
    model_dir = check_paths(cfg)  # missing model or data: an error before the cluster starts
    init_ray(cfg)
    concurrency = max_concurrent(cfg, _cluster_resources())
    name = cfg.cluster.run_name or f"{cfg.name}_sweep"
    storage = f"{absolute(cfg.cluster.storage_path).rstrip('/')}/{name}"
    prepared = prepare_data(cfg, model_dir, output)
    uri, exp_id, parent_run_id = open_parent_run(cfg, storage, name, trials, resume)
    records = ray.put(prepared.table)
    validation = validation_set(cfg, model_dir)
    sweep = Sweep(
        cfg, name, model_dir, records, prepared.rows_ok, validation, storage, uri, exp_id, parent_run_id
    )
    return sweep, concurrency


def finish_sweep(sweep: Sweep, rows: list[dict[str, Any]], output: Path, seconds: float) -> dict[str, Any]:
    """Trial states to MLflow, the report, the champion into the registry; the summary."""
    uri, parent = sweep.tracking_uri, sweep.parent_run_id
    close_trial_runs(sweep, rows)
    print(print_table(rows), flush=True)
    scored = [r for r in rows if r["cider"] is not None and r["checkpoint"]]
    if not scored:
        tracking.end_run(parent, "FAILED", uri)
        raise RuntimeError(f"no trial reported a validation CIDEr; see the trial logs under {sweep.storage}")
    best = max(scored, key=lambda r: r["cider"])
    for f in write_report(rows, output, f"raylora sweep {sweep.name}"):
        tracking.log_artifacts(parent, f, "report", uri)
    c = tracking.client(uri)
    c.log_metric(parent, "best_cider", best["cider"])
    c.set_tag(parent, "best_trial", best["trial_id"])
    model_name, version, moved = register_champion(sweep, best, output)
    tracking.end_run(parent, "FINISHED", uri)
    summary = {
        "best_trial": best["trial_id"],
        "best_cider": best["cider"],
        "best_params": best["params"],
        "registered_model": model_name,
        "version": version,
        "champion_moved": moved,
        "trials": len(rows),
        "stopped_early": sum(r["state"] == "stopped early" for r in rows),
        "seconds": round(seconds, 1),
        "report": str(output / "report.html"),
        "parent_run_id": parent,
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
    if not is_remote(path):
        return Path(path)
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
    extra = [f"sweep.searcher={args.searcher}"] if args.searcher else []
    return run_command(
        lambda: run_sweep(config_from_args(args, extra), args.trials, args.resume, args.output)
    )


if __name__ == "__main__":
    sys.exit(main())
