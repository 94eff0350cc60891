"""Hyperparameter sweep: Ray Tune over LoRA rank, learning rate and batch size, CIDEr as the objective.

    python -m raylora.sweep --trials 16                       # the demo (or the recipe if present)
    python -m raylora.sweep --config internvl2_2b_coco --trials 32
    python -m raylora.sweep --resume                          # continue an interrupted sweep

Each trial builds and fits the same TorchTrainer as ``raylora.train`` (Train V2 pattern). Each
validation score of the trial reaches Tune, while the trial trains on, as a result at the validated
checkpoint's step, from the trial's score channel; ASHA stops weak trials at its rungs on
the rung's score. A trial is scored by its best validation, and the champion is the best checkpoint
of the best trial: that checkpoint's adapter is registered (its step a tag) as a new version of the
registered model, and its ``champion`` alias moves only if it beats the current champion. The search
space is the config's ``sweep`` section. MLflow gets a parent run for the sweep and a child run per
trial.

The final task (unless ``--no-merge``): the champion adapter is merged into a plain checkpoint by a
Ray task with ``sweep.merge_resources`` (``raylora.merge``: verified, then registered as
``<name>-merged``, an MLflow Model that ``mlflow models serve`` takes). With ``sweep.final_train``
the champion's configuration is first trained for the full schedule (the trial overrides that
truncate a trial dropped, :func:`final_config`), that adapter registered and merged instead.
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

from raylora import console, registry, runs, tracking
from raylora.cli import config_from_args, config_parser
from raylora.cluster import alive_nodes, init_ray, job_resources, preflight
from raylora.config import MERGE_RESOURCES, Config, ConfigError, apply_override, validate
from raylora.console import run_command
from raylora.driver import (
    async_validation,
    build_trainer,
    check_paths,
    make_job,
    prepare_data,
    train_settings,
)
from raylora.driver import run as train_run
from raylora.files import absolute, is_remote, join_uri, read_text, redact, write_text
from raylora.merge import merge_adapter
from raylora.pages import save_screenshot
from raylora.runs import best_checkpoint, validations
from raylora.sources import complete_adapter_dir
from raylora.validation import ValidationSet, validation_set

# ray (Tune) and mlflow are imported inside the functions that use them: --help and config errors stay fast.

METRIC = "val_cider"
TRIAL_FN_CPUS = 0.01  # the trial function itself (Tune + Train V2 need a non-zero reservation)
# sweep.trial_overrides that shape a trial rather than the model it trains; the final training
# (sweep.final_train) goes back to the base config's values for these, keeps the other overrides.
TRIAL_ONLY_KEYS = (
    "train.max_steps",  # the truncated schedule (the learning-rate schedule follows it)
    "train.epochs",
    "eval.every_n_steps",  # the ASHA rungs of the truncated schedule, and the cadences tied to them
    "train.checkpoint_every_n_steps",
    "train.log_every_n_steps",
    "train.per_device_batch_size",  # a trial's share of the cluster (the global batch is kept)
    "data.decode_actors",
    "data.decode_cpus",
)
TRIAL_ONLY_SECTIONS = ("cluster",)


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


def with_params(base: Config, params: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The base config with ``overrides``, then a trial's parameters (lora.alpha from the rank)."""
    cfg = copy.deepcopy(base)
    for key, value in {**overrides, **params}.items():
        apply_override(cfg, key, value, "sweep")
    if cfg.sweep.alpha_ratio > 0:
        cfg.lora.alpha = int(round(cfg.sweep.alpha_ratio * cfg.lora.rank))
    return cfg


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters and the sweep's per-trial overrides applied."""
    cfg = with_params(base, params, base.sweep.trial_overrides)
    if cfg.eval.every_n_steps > 0:  # every report carries the objective (ASHA and the searcher need it)
        cfg.train.checkpoint_every_n_steps = cfg.eval.every_n_steps
    validate(cfg)
    return cfg


def _trial_only(key: str) -> bool:
    return key in TRIAL_ONLY_KEYS or key.split(".", 1)[0] in TRIAL_ONLY_SECTIONS


def final_config(base: Config, params: dict[str, Any], run_name: str) -> Config:
    """The champion's configuration for the full schedule (``sweep.final_train``): its trial config
    with the overrides that truncate a trial or size it to share the cluster back at the base
    config's values (TRIAL_ONLY_KEYS, ``cluster.*``). The other overrides stay, since the champion
    was selected with them (e.g. the validation set, tiling, the caption protocol), and so do the
    searched parameters. Its own ``cluster.run_name``: a run dir of its own, resumable."""
    overrides: dict[str, Any] = {}
    for key, value in base.sweep.trial_overrides.items():  # a whole section maps to its dotted keys
        section = "." not in key and isinstance(value, dict)
        overrides.update({f"{key}.{k}": v for k, v in value.items()} if section else {key: value})
    cfg = with_params(base, params, {k: v for k, v in overrides.items() if not _trial_only(k)})
    cfg.cluster.run_name = run_name
    validate(cfg)
    return cfg


def default_point(cfg: Config, space: dict[str, Any]) -> dict[str, Any]:
    """The config's own values for the searched keys: evaluated first, so the sweep never does worse."""
    flat = cfg.flat()
    return {key: flat[key] for key in space if key in flat}


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial occupies: its Train workers, their data actors and its validation task."""
    _, total = job_resources(trial_config(cfg, {}))
    need = {"CPU": round(total["CPU"] + TRIAL_FN_CPUS, 6)}
    if total["GPU"]:
        need["GPU"] = total["GPU"]
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


def merge_need(cfg: Config) -> dict[str, float]:
    """Ray resources of the final merge task (``sweep.merge_resources``; memory in bytes)."""
    r = {**MERGE_RESOURCES, **cfg.sweep.merge_resources}
    return {"CPU": r["CPU"], "GPU": r["GPU"], "memory": r["memory_gb"] * 2**30}


def check_merge_fits(cfg: Config, nodes: list[dict[str, float]]) -> None:
    """An error before the sweep starts when no node has what the final merge task asks for."""
    need = {k: v for k, v in merge_need(cfg).items() if v > 0}
    if not cfg.sweep.merge or any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for n in nodes):
        return
    have = [{k: round(n.get(k, 0.0) / (2**30 if k == "memory" else 1), 1) for k in need} for n in nodes]
    raise RuntimeError(
        f"the final merge needs {cfg.sweep.merge_resources} on one node but the nodes have {have} "
        "(memory in GB): lower sweep.merge_resources, add a node, or skip the merge with --no-merge"
    )


# ------------------------------------------------------------------------------------- a trial


@dataclass(frozen=True)
class Sweep:
    """What every trial shares, resolved once by the sweep driver."""

    cfg: Config
    name: str
    model_dir: Path
    records: Any  # ObjectRef of the validated records
    validation: ValidationSet | None
    storage: str  # <storage_path>/<sweep name>: Tune's experiment dir, trials under trials/
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def trial_mlflow_run(sweep: Sweep, cfg: Config, trial_id: str, params: dict[str, Any], run_dir: str) -> str:
    """The trial's child run: the one it started before (a resumed sweep), or a new one."""
    marker = join_uri(run_dir, "mlflow_run_id")
    if (known := read_text(marker)) is not None:
        return known.strip()
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
    write_text(marker, run_id)
    return run_id


def run_trial(params: dict[str, Any], sweep: Sweep) -> None:
    """One Tune trial: the training job of the trial's config, fitted in a thread; each validation
    score it sends on its score channel (a Ray queue) is reported to Tune from here, as a result at
    its step (``step``, ``total_steps``, ``val_cider``): ASHA's rung decisions wait for the rung's
    score, while training goes on.

    A resumed trial (a sweep driver killed mid-trial) first reports the validations its run folder
    holds (Tune may not have received the last one); a trial whose run already ended reports them
    and does not train again.
    """
    import threading

    from ray import tune
    from ray.util.queue import Empty, Queue

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(sweep.cfg, params)
    run_dir = f"{sweep.storage}/trials/{trial_id}"
    run_id = trial_mlflow_run(sweep, cfg, trial_id, params, run_dir)
    job = make_job(cfg, sweep.model_dir, sweep.records, run_dir, sweep.validation, sweep.tracking_uri, run_id)
    for step, cider in validations(run_dir) if job.start_step else []:
        tune.report({"step": step, "total_steps": job.plan.total_steps, METRIC: cider})
    if job.finished:
        return
    job.scores = Queue(actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            with async_validation(job) as validation:
                build_trainer(job, validation=validation).fit()
        except BaseException as e:  # raised again in the trial's own thread
            failure.append(e)

    trainer = threading.Thread(target=fit, name="raylora-trial-fit", daemon=True)
    trainer.start()
    while trainer.is_alive() or not job.scores.empty():
        try:
            tune.report(job.scores.get(timeout=1))
        except Empty:
            continue
    if failure:
        raise failure[0]


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

        if not console.verbose():  # Optuna's "A new study created in memory ..." INFO line
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)

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
        # a trial at max_t is at its last step and ends by itself: Tune does not kill it there, so
        # its Train run ends FINISHED on the dashboard (a trial a rung stops shows ABORTED)
        stop_last_trials=False,
    )
    # the searcher limits concurrency itself (Tune would warn that max_concurrent_trials is ignored)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(num_samples=trials, search_alg=searcher, scheduler=scheduler),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=tune_storage,
            verbose=1 if console.verbose() else 0,
            callbacks=[trial_board()],
        ),
    )


class TrialBoard:
    """The trials as the console shows them, in place of Tune's status tables and per-trial boxes:
    one line per trial event (started, scored, stopped early, completed, failed); ``finish_sweep``
    prints the one table, at the end. Lines rather than a table redrawn in place: they stay readable
    in a log, and other output (a Ray warning) cannot garble them."""

    def __init__(self, echo: Any = None) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.echo = echo  # None: print, looked up when called (Tune pickles the board with its config,
        # and Ray's progress bars may have replaced builtins.print by then)

    def event(self, trial_id: str, params: dict[str, Any], update: dict[str, Any], text: str | None) -> None:
        """A trial's new state (``update``: state, step, total, cider) and what happened, if worth a line."""
        row = self.rows.setdefault(
            trial_id, {"params": dict(params), "state": "pending", "step": 0, "total": None, "cider": None}
        )
        row.update({k: v for k, v in update.items() if v is not None})
        if text is not None:
            (self.echo or print)(f"[sweep] trial {trial_id} {text}", flush=True)

    def started(self, trial_id: str, params: dict[str, Any]) -> None:
        self.event(trial_id, params, {"state": "running"}, f"started: {_short_params(params)}")

    def result(self, trial_id: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        update = {"step": result.get("step"), "total": result.get("total_steps"), "cider": result.get(METRIC)}
        scored = update["cider"] is not None
        text = f"step {update['step']}/{update['total']}: val CIDEr {update['cider']:.3f}" if scored else None
        self.event(trial_id, params, update, text)

    def complete(self, trial_id: str, params: dict[str, Any]) -> None:
        row = self.rows.get(trial_id, {"step": 0, "total": None})
        state = "completed" if row["total"] is not None and row["step"] >= row["total"] else "stopped early"
        self.event(trial_id, params, {"state": state}, f"{state} at step {row['step']}")

    def failed(self, trial_id: str, params: dict[str, Any], why: str) -> None:
        self.event(trial_id, params, {"state": "failed"}, f"failed: {why}")


def trial_board() -> Any:
    """A Tune callback (on the driver) feeding a :class:`TrialBoard`."""
    from ray.tune import Callback

    class TrialBoardCallback(Callback):
        def __init__(self) -> None:
            self.board = TrialBoard()

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.board.started(trial.trial_id, trial.config)

        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
        ) -> None:
            self.board.result(trial.trial_id, trial.config, result)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.board.complete(trial.trial_id, trial.config)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            try:
                error = trial.get_pickled_error()
                why = console.headline(error, typed=True) if error is not None else f"see {trial.error_file}"
            except Exception:
                why = f"see {trial.error_file}"
            self.board.failed(trial.trial_id, trial.config, why)

    return TrialBoardCallback()


def trial_rows(results: Any, sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial: params, best CIDEr and its step and checkpoint (from the trial's run
    folder), steps, state, the CIDEr history.

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
        trial_id = m.get("trial_id") or Path(r.path).name
        workers = trial_config(sweep.cfg, dict(r.config)).cluster.num_workers
        best = best_checkpoint(f"{sweep.storage}/trials/{trial_id}", workers)
        rows.append(
            {
                "trial_id": trial_id,
                "params": {k: v for k, v in r.config.items()},
                "cider": best.val_cider if best else None,  # the trial's best validation
                "best_step": best.step if best else None,
                "steps": steps,
                "total_steps": m.get("total_steps", steps),
                "state": state,
                "checkpoint": best.path if best else None,
                "history": r.metrics_dataframe[["step", METRIC]].dropna().values.tolist()
                if r.metrics_dataframe is not None and METRIC in r.metrics_dataframe
                else [],
                "path": r.path,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", *keys, "best CIDEr", "at step", "steps", "state"]
    lines = [head]
    for r in sorted(rows, key=lambda r: -(r["cider"] or -1)):
        vals = [r["trial_id"]] + [
            f"{r['params'].get(k):.2e}" if isinstance(r["params"].get(k), float) else str(r["params"].get(k))
            for k in keys
        ]
        best = [f"{r['cider']:.3f}" if r["cider"] is not None else "-", str(r.get("best_step") or "-")]
        lines.append(vals + [*best, str(r["steps"]), r["state"]])
    widths = [max(len(str(x[i])) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(x[i]).ljust(widths[i]) for i in range(len(head))) for x in lines)


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The champion of a sweep: the highest CIDEr among trials with a checkpoint; None if none scored."""
    scored = [r for r in rows if r["cider"] is not None and r["checkpoint"]]
    return max(scored, key=lambda r: r["cider"]) if scored else None


STATE_COLORS = {"completed": "tab:blue", "stopped early": "tab:orange", "failed": "tab:red"}
PARAM_NAMES = {
    "lora.rank": "rank",
    "train.lr": "lr",
    "train.global_batch_size": "batch",
    "train.per_device_batch_size": "per device",
}


def _value(v: Any) -> str:
    return f"{v:.2e}" if isinstance(v, float) else str(v)


def _short_params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{PARAM_NAMES.get(k, k.rsplit('.', 1)[-1])} {_value(v)}" for k, v in sorted(params.items())
    )


def _batch_size(row: dict[str, Any], default: int | None) -> int | None:
    """The trial's global batch size: its searched value, else the sweep's."""
    return row["params"].get("train.global_batch_size", default)


def _finish_axes(ax: Any, has_data: bool, **legend: Any) -> None:
    """Grid and legend, or a plain "no scored trials" panel (no made-up axes) when nothing to plot."""
    if has_data:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, **legend)
        return
    ax.set_xticks([], minor=False)
    ax.set_xticks([], minor=True)
    ax.set_yticks([])
    ax.text(0.5, 0.5, "no scored trials", transform=ax.transAxes, ha="center", va="center", color="gray")


def _scatter_plot(plt: Any, rows: list[dict[str, Any]], key: str, best: dict | None, png: Path) -> None:
    """Final CIDEr against one parameter (log axis), colour by state, the champion starred."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    pts = [r for r in rows if r["cider"] is not None and r["params"].get(key) is not None]
    for state, color in STATE_COLORS.items():
        mine = [r for r in pts if r["state"] == state]
        if mine:
            ax.scatter([r["params"][key] for r in mine], [r["cider"] for r in mine], label=state, color=color)
    if best is not None and best["params"].get(key) is not None:
        star = {"marker": "*", "s": 260, "facecolor": "none", "edgecolor": "black"}
        ax.scatter([best["params"][key]], [best["cider"]], label="best trial", **star)
    ax.set_xscale("log", base=10 if key == "train.lr" else 2)
    values = sorted({r["params"][key] for r in pts})
    if key == "train.lr":
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.0e}"))
    elif values:
        ax.set_xticks(values)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(key)
    ax.set_ylabel("final val CIDEr")
    ax.margins(0.08)
    _finish_axes(ax, bool(pts))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _curves_plot(
    plt: Any, rows: list[dict[str, Any]], batch: int | None, best: dict | None, png: Path
) -> str:
    """Validation CIDEr against samples seen (step x the trial's global batch size); the x label."""
    from matplotlib.ticker import EngFormatter

    by_samples = all(_batch_size(r, batch) for r in rows if r["history"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in rows:
        if r["history"]:
            scale = _batch_size(r, batch) if by_samples else 1
            xs, ys = zip(*((step * scale, c) for step, c in r["history"]))
            is_best = best is not None and r["trial_id"] == best["trial_id"]
            label = f"{r['trial_id'][-5:]}: {_short_params(r['params'])}" + (" (best)" if is_best else "")
            (line,) = ax.plot(
                xs, ys, marker="o", label=label, linewidth=3 if is_best else 1.5, zorder=3 if is_best else 2
            )
            if r.get("best_step") is not None:  # the trial's best validation: its checkpoint competes
                ax.plot(
                    r["best_step"] * scale,
                    r["cider"],
                    marker="*",
                    markersize=16,
                    color=line.get_color(),
                    markeredgecolor="black",
                    zorder=4,
                    linestyle="none",
                )
    xlabel = (
        "samples seen (optimizer steps x the trial's global batch size)" if by_samples else "optimizer step"
    )
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_ylabel("val CIDEr")
    _finish_axes(ax, any(r["history"] for r in rows), loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return xlabel


REPORT_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#f6f8fa}
main{max-width:1240px}h1{font-size:22px;margin:0 0 10px}h2{font-size:17px;margin:24px 0 8px}
p{margin:4px 0;font-size:14px}code{font-size:12px;background:#eaeef2;padding:1px 4px;border-radius:4px}
.champion{background:#fff8c5;border:1px solid #d4a72c;border-radius:8px;padding:10px 14px;margin:10px 0}
table{border-collapse:collapse;background:#fff;font-size:13px;border:1px solid #d0d7de}
th,td{padding:5px 10px;border-bottom:1px solid #d0d7de;text-align:left;white-space:nowrap}
th{background:#eaeef2}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#fff8c5;font-weight:600}
.state{border-radius:10px;padding:1px 8px;color:#fff;font-size:12px}
.completed{background:#0969da}.stopped{background:#bc4c00}.failed{background:#cf222e}
.badge{background:#1a7f37;color:#fff;border-radius:10px;padding:1px 7px;font-size:11px;margin-left:6px}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0;background:#fff;border:1px solid #d0d7de;padding:6px}
.plots img{display:block;max-width:100%}figcaption{font-size:12px;color:#57606a;max-width:640px}
"""


def _registry_line(registered: tuple[str, int, bool] | None) -> str:
    if registered is None:
        return ""
    name, version, moved = registered
    where = f"registered as <code>{html.escape(name)}</code> version {version}"
    if moved:
        return f" It is {where} and is now the registry's <b>champion</b>."
    return f" It is {where}; the registry's champion stays on an earlier version that scores higher."


def _run_cell(row: dict[str, Any], uri: str | None, experiment_id: str | None) -> str:
    run_id = row.get("mlflow_run_id")
    if not run_id:
        return "-"
    url = tracking.run_web_url(uri, experiment_id or "0", run_id) if uri else None
    if url:
        return f"<a href='{html.escape(url)}'>{html.escape(run_id[:8])}</a>"
    return f"<code>{html.escape(run_id)}</code>"


def _trial_table(rows: list[dict[str, Any]], best: dict | None, batch: int | None, run_cell: Any) -> str:
    """The HTML trial table, best CIDEr first: params, CIDEr, steps, samples seen, state, MLflow run."""
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", *keys, "best val CIDEr", "at step", "steps", "samples seen", "state", "MLflow run"]
    lines = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in sorted(rows, key=lambda r: -(r["cider"] if r["cider"] is not None else -1)):
        is_best = best is not None and r["trial_id"] == best["trial_id"]
        gbs = _batch_size(r, batch)
        numbers = [
            *(html.escape(_value(r["params"].get(k, "-"))) for k in keys),
            f"{r['cider']:.3f}" if r["cider"] is not None else "-",
            str(r["best_step"]) if r.get("best_step") is not None else "-",
            f"{r['steps']} / {r['total_steps']}",
            f"{int(r['steps'] * gbs):,}" if gbs else "-",
        ]
        lines += [
            "<tr class='best'>" if is_best else "<tr>",
            f"<td>{html.escape(r['trial_id'])}{'<span class=badge>best</span>' if is_best else ''}</td>",
            *(f"<td class='num'>{n}</td>" for n in numbers),
            f"<td><span class='state {r['state'].split()[0]}'>{html.escape(r['state'])}</span></td>",
            f"<td>{run_cell(r)}</td></tr>",
        ]
    return "".join(lines) + "</tbody></table>"


def _report_header(
    rows: list[dict[str, Any]], best: dict | None, registered: tuple[str, int, bool] | None, uri: str | None
) -> str:
    """Trial counts, the champion and the registry's outcome, how to browse a local MLflow store."""
    counts = ", ".join(f"{sum(r['state'] == s for r in rows)} {s}" for s in STATE_COLORS)
    out = f"<p>{len(rows)} trial{'s' * (len(rows) != 1)}: {counts}.</p>"
    if best is None:
        out += "<p class='champion'>No trial reported a validation CIDEr.</p>"
    else:
        out += (
            f"<div class='champion'><p><b>Best trial {html.escape(best['trial_id'])}</b>: val CIDEr "
            f"{best['cider']:.3f} at step {best.get('best_step')} with "
            f"{html.escape(_short_params(best['params']))}; that checkpoint's adapter is the champion."
            f"{_registry_line(registered)}</p></div>"
        )
    if uri and not tracking.is_server(uri):
        command = html.escape(tracking.ui_command(uri))
        out += f"<p>MLflow runs are in a local store; browse them with <code>{command}</code>.</p>"
    return out


def write_report(
    rows: list[dict[str, Any]],
    out: Path,
    title: str,
    *,
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
    global_batch_size: int | None = None,
    registered: tuple[str, int, bool] | None = None,
) -> list[Path]:
    """PNG plots (CIDEr vs lr, vs rank, learning curves vs samples seen), ``trials.json`` and
    ``report.html``: the champion, the trial table with each trial's MLflow run, the plots.

    ``global_batch_size`` is the trials' batch size when it was not searched; ``registered`` is
    (registered model, version, whether the champion alias moved to it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    best = best_trial(rows)
    _scatter_plot(plt, rows, "train.lr", best, out / "cider_vs_lr.png")
    _scatter_plot(plt, rows, "lora.rank", best, out / "cider_vs_rank.png")
    xlabel = _curves_plot(plt, rows, global_batch_size, best, out / "learning_curves.png")
    pngs = [out / "cider_vs_lr.png", out / "cider_vs_rank.png", out / "learning_curves.png"]
    header = _report_header(rows, best, registered, tracking_uri)
    captions = [
        "Each trial's best validation CIDEr against the learning rate.",
        "Each trial's best validation CIDEr against the LoRA rank.",
        f"Validation CIDEr during training against {xlabel}; a star marks each trial's best checkpoint "
        "(the one it competes with). Trials with different batch sizes take different numbers of steps, "
        "so steps do not compare.",
    ]
    figures = "".join(
        f"<figure><img src='{p.name}' alt='{p.stem}'><figcaption>{html.escape(c)}</figcaption></figure>"
        for p, c in zip(pngs, captions)
    )
    table = _trial_table(rows, best, global_batch_size, lambda r: _run_cell(r, tracking_uri, experiment_id))
    (out / "report.html").write_text(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>{header}"
        f"<h2>Trials</h2>{table}<h2>Plots</h2><div class='plots'>{figures}</div></main></body></html>",
        encoding="utf-8",
    )
    (out / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    return [*pngs, out / "report.html", out / "trials.json"]


def open_parent_run(cfg: Config, storage: str, name: str, trials: int, resume: bool) -> tuple[str, str, str]:
    """(tracking uri, experiment id, parent run id): the sweep's MLflow parent run, new or resumed.

    The parent run id is kept in ``<storage>/raylora_sweep.json``, so ``--resume`` continues it.
    """
    uri, exp_id = tracking.setup(cfg)
    state_file = join_uri(storage, "raylora_sweep.json")
    state = read_text(state_file)
    if resume:
        if state is None:
            raise FileNotFoundError(f"no sweep to resume at {redact(storage)}; run without --resume first")
        parent_run_id = json.loads(state)["parent_run_id"]
        tracking.reopen_run(parent_run_id, uri)
        return uri, exp_id, parent_run_id
    if state is not None:
        raise RuntimeError(
            f"a sweep named {name!r} exists in {redact(storage)}: use --resume, or a new cluster.run_name"
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
    write_text(state_file, json.dumps({"parent_run_id": parent_run_id, "trials": trials}))
    return uri, exp_id, parent_run_id


def close_trial_runs(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """Each trial's child run gets its final state (tag and status) and its best CIDEr (at its step)."""
    c = tracking.client(sweep.tracking_uri)
    for row in rows:
        child = read_text(join_uri(sweep.storage, "trials", row["trial_id"], "mlflow_run_id"))
        if child is None:
            continue
        child = child.strip()
        row["mlflow_run_id"] = child
        c.set_tag(child, "trial_state", row["state"])
        if row["cider"] is not None:
            c.log_metric(child, "best_cider", row["cider"], step=row["best_step"] or 0)
        status = {"failed": "FAILED", "stopped early": "KILLED"}.get(row["state"], "FINISHED")
        tracking.end_run(child, status, sweep.tracking_uri)


def register_champion(sweep: Sweep, best: dict[str, Any], output: Path) -> tuple[str, int, bool]:
    """The adapter of the best trial's best checkpoint (plus tokenizer, processor, raylora.json) as a
    new registry version, its step a tag; ``champion`` moves to it if it beats the current one.
    Returns (name, version, moved)."""
    best_cfg = trial_config(sweep.cfg, best["params"])
    adapter = output / "champion_adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(runs.adapter_dir(_local_checkpoint(best["checkpoint"])), adapter)
    complete_adapter_dir(adapter, sweep.model_dir, train_settings(best_cfg, sweep.model_dir))
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
            "step": str(best["best_step"]),  # the trial's checkpoint registered: its best validation
            "base_model": sweep.cfg.model.path,
            "config_hash": best_cfg.fingerprint(),
            "sweep": sweep.name,
        },
        metric_key="cider",
        metric_value=best["cider"],
        tracking_uri=sweep.tracking_uri,
    )
    return model_name, version, moved


# ------------------------------------------------------------------------------ the final task


def merge_task(
    spec: str, output: str, name: str, tracking_uri: str, dtype: str, verify_images: list[str] | None
) -> dict[str, Any]:
    """(A Ray task.) ``raylora.merge`` of the adapter ``spec``: merged, verified, registered as
    ``<name>-merged`` with the caption pyfunc flavour; returns merge_adapter's report."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return merge_adapter(
        spec, output, dtype, overwrite=True, verify_images=verify_images, register=True, name=name
    )


def merge_on_cluster(sweep: Sweep, spec: str, name: str, output: Path) -> dict[str, Any]:
    """:func:`merge_task` on a node with ``sweep.merge_resources`` (a new worker process, which exits
    after it: a large model's memory goes back to the node); verified on two validation images."""
    import ray

    need = merge_need(sweep.cfg)
    options: dict[str, Any] = {"num_cpus": need["CPU"], "num_gpus": need["GPU"]}
    if need["memory"] > 0:
        options["memory"] = int(need["memory"])
    images = [item.image for item in sweep.validation.items[:2]] if sweep.validation else None
    print(f"[sweep] merging {spec} into {output} (a Ray task: {sweep.cfg.sweep.merge_resources})", flush=True)
    task = ray.remote(max_calls=1)(merge_task).options(**options)  # a fresh process, exits after
    dtype = sweep.cfg.sweep.merge_dtype
    return ray.get(task.remote(spec, str(output), name, sweep.tracking_uri, dtype, images))


def train_final(sweep: Sweep, summary: dict[str, Any], output: Path) -> dict[str, Any]:
    """``sweep.final_train``: the champion's configuration for the full schedule (:func:`final_config`,
    ``raylora.train``), its adapter registered as a new version (tags as the champion's, plus
    ``final_train``); the run's numbers and that version."""
    cfg = final_config(sweep.cfg, summary["best_params"], f"{sweep.name}_final")
    print(f"[sweep] training the champion's configuration for the full schedule ({cfg.cluster.run_name})")
    result = train_run(cfg, output / "final")
    run_id = result["mlflow_run_id"]
    version, moved = registry.register_version(
        summary["registered_model"],
        tracking.artifact_uri(run_id, "adapter", sweep.tracking_uri),
        run_id,
        tags={
            "trial_id": summary["best_trial"],
            "base_model": cfg.model.path,
            "config_hash": cfg.fingerprint(),
            "sweep": sweep.name,
            "final_train": "true",
        },
        metric_key="cider",
        metric_value=result.get("val_cider"),
        tracking_uri=sweep.tracking_uri,
    )
    keys = ("steps", "val_cider", "mlflow_run_id")
    return {**{k: result.get(k) for k in keys}, "version": version, "champion_moved": moved}


def final_task(sweep: Sweep, summary: dict[str, Any], output: Path) -> dict[str, Any]:
    """The sweep's last task (``sweep.merge``): the champion adapter, or with ``sweep.final_train``
    the adapter of its configuration trained for the full schedule, merged on the cluster and
    registered as ``<name>-merged``, a servable MLflow Model. Returns the summary's additions."""
    name, version = summary["registered_model"], summary["version"]
    added: dict[str, Any] = {}
    if sweep.cfg.sweep.final_train:
        added["final_train"] = train_final(sweep, summary, output)
        version = added["final_train"]["version"]
    report = merge_on_cluster(sweep, f"models:/{name}/{version}", name, output / "merged")
    reg = report["registered"]
    tracking.client(sweep.tracking_uri).set_tag(
        sweep.parent_run_id, "merged_model", f"{reg['name']}/{reg['version']}"
    )
    print(
        f"[sweep] merged {name} v{version} into {output / 'merged'}; registered {reg['name']} "
        f"v{reg['version']}"
        + (" as champion" if reg["alias_moved"] else " (champion kept: it scores higher)"),
        flush=True,
    )
    return {
        **added,
        "merged_model": reg["name"],
        "merged_version": reg["version"],
        "merged_champion_moved": reg["alias_moved"],
        "merged_from_version": version,
        "merged_dir": str(output / "merged"),
    }


# ------------------------------------------------------------------------------------- the run


def sweep_output(cfg: Config, output_dir: str | Path | None = None) -> Path:
    """The sweep's report folder: ``--output``, else ``<output_dir's parent>/<config name>_sweep``."""
    return Path(output_dir or Path(cfg.output_dir).parent / f"{cfg.name}_sweep")


def run_sweep(
    cfg: Config, trials: int | None = None, resume: bool = False, output_dir: str | Path | None = None
) -> dict[str, Any]:
    """Run (or resume) a sweep, then its final task (:func:`final_task`, unless ``sweep.merge`` is
    off); returns the summary (best trial, registry versions), also in ``summary.json``."""
    trials = trials or cfg.sweep.trials
    output = sweep_output(cfg, output_dir)
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
    summary = finish_sweep(sweep, trial_rows(results, sweep), output, time.time() - t0)
    if cfg.sweep.merge:
        summary.update(final_task(sweep, summary, output))
        (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def start_sweep(cfg: Config, trials: int, resume: bool, output: Path) -> tuple[Sweep, int]:
    """Checks, the cluster, validated data and the parent run: what every trial shares; concurrency."""
    import ray

    tracking.check_tracking(tracking.tracking_uri(cfg))  # fails fast when the store is unreachable
    model_dir = check_paths(cfg)  # missing model or data: an error before the cluster starts
    init_ray(cfg)
    name = cfg.cluster.run_name or f"{cfg.name}_sweep"
    storage = f"{absolute(cfg.cluster.storage_path).rstrip('/')}/{name}"
    concurrency = max_concurrent(cfg, _cluster_resources())  # one trial must fit: before the checks below
    check_merge_fits(cfg, [n["Resources"] for n in alive_nodes()])
    preflight(trial_config(cfg, {}), absolute(cfg.cluster.storage_path), tracking.tracking_uri(cfg))
    prepared = prepare_data(cfg, model_dir, output)
    uri, exp_id, parent_run_id = open_parent_run(cfg, storage, name, trials, resume)
    records = ray.put(prepared.table)
    validation = validation_set(cfg, model_dir)
    sweep = Sweep(cfg, name, model_dir, records, validation, storage, uri, exp_id, parent_run_id)
    return sweep, concurrency


def sweep_report(
    sweep: Sweep, rows: list[dict[str, Any]], output: Path, registered: tuple[str, int, bool] | None
) -> None:
    """The report (``report.html``, its plots, ``trials.json``, a screenshot) into ``output`` and into
    the parent run's ``report`` artifacts."""
    files = write_report(
        rows,
        output,
        f"raylora sweep {sweep.name}",
        tracking_uri=sweep.tracking_uri,
        experiment_id=sweep.experiment_id,
        global_batch_size=trial_config(sweep.cfg, {}).train.global_batch_size,
        registered=registered,
    )
    png = save_screenshot(output / "report.html", "sweep")
    for f in [*files, *([png] if png else [])]:
        tracking.log_artifacts(sweep.parent_run_id, f, "report", sweep.tracking_uri)


def finish_sweep(sweep: Sweep, rows: list[dict[str, Any]], output: Path, seconds: float) -> dict[str, Any]:
    """Trial states to MLflow, the champion into the registry, the report; the summary."""
    uri, parent = sweep.tracking_uri, sweep.parent_run_id
    close_trial_runs(sweep, rows)
    print(print_table(rows), flush=True)
    best = best_trial(rows)
    if best is None:
        sweep_report(sweep, rows, output, None)
        tracking.end_run(parent, "FAILED", uri)
        raise RuntimeError(
            f"no trial reported a validation CIDEr; see the trial logs under {redact(sweep.storage)}"
        )
    c = tracking.client(uri)
    c.log_metric(parent, "best_cider", best["cider"])
    c.set_tag(parent, "best_trial", best["trial_id"])
    registered = None
    try:
        registered = register_champion(sweep, best, output)
    finally:  # the report is written even when registration fails (then without the registry's outcome)
        sweep_report(sweep, rows, output, registered)
    model_name, version, moved = registered
    tracking.end_run(parent, "FINISHED", uri)
    summary = {
        "best_trial": best["trial_id"],
        "best_cider": best["cider"],
        "best_step": best["best_step"],
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
        f"[sweep] best trial {best['trial_id']}: CIDEr {best['cider']:.3f} at step {best['best_step']} "
        f"with {best['params']}; "
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
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="skip the final task: merging the champion and registering it as <name>-merged (sweep.merge)",
    )
    args = parser.parse_args(argv)
    extra = [f"sweep.searcher={args.searcher}"] if args.searcher else []
    extra += ["sweep.merge=false"] if args.no_merge else []

    def body() -> dict[str, Any]:
        cfg = config_from_args(args, extra)
        console.log_errors_to(sweep_output(cfg, args.output))
        return run_sweep(cfg, args.trials, args.resume, args.output)

    return run_command(body, command="sweep", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
