"""The driver of a training run: the job functions that :mod:`raylora.train` and :mod:`raylora.sweep`
share.

:func:`make_job` validates nothing itself but plans every micro-batch and decides, once, whether the
run starts or resumes (and from which checkpoint); :func:`run` validates the data, opens the MLflow
run, fits the TorchTrainer around :func:`raylora.recipe.train_func` (or, for a finished run, only
writes its outputs) and writes the adapter of the checkpoint ``train.select`` picks (the best
validation CIDEr; checkpoints are validated as :mod:`raylora.validation` says). Running the same
command again resumes from the latest checkpoint; ``cluster.max_failures`` restarts crashed workers
from it within a run.

The same recipe runs without Ray (:func:`run_local`): under ``torchrun`` (one process per GPU,
``RANK``/``WORLD_SIZE`` from the launcher) or as one plain process (``--no-ray``). Rank 0 does the
driver's checks and planning and hands the job to the others; every rank builds its own micro-batches
in-process with the same builder; checkpoints go to the same run folder (so either path resumes the
other's run); MLflow logs from rank 0 when ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` is set. Ray stays
the path for clusters, sweeps and fault tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from raylora import console, runs, tracking
from raylora.cluster import init_ray, preflight
from raylora.config import Config, save_config
from raylora.console import send
from raylora.data.plan import BatchPlan, make_plan, plan_microbatches, plan_units, unit_lengths
from raylora.data.prepare import Prepared, prepare
from raylora.data.settings import ImageSettings
from raylora.files import absolute, atomic_dir, file_entry, is_dir, is_remote, redact, tree_size, writes_to
from raylora.monitoring import enable_train_state_tracking

# torch, deepspeed, ray and transformers are imported inside the functions that run on the workers
# or fit the trainer: the driver's checks (config, paths, tracking store) answer in a second.
from raylora.recipe import (
    LocalRuntime,
    TrainJob,
    barrier,
    checkpoint_directory,
    resolve,
    run_recipe,
    scored,
    train_func,
)
from raylora.sources import complete_adapter_dir, image_settings, resolve_model_dir
from raylora.validation import (
    SCORE,
    ValidationSet,
    start_validator,
    validation_actor,
    validation_set,
)


def validates_async(cfg: Config, validation: ValidationSet | None) -> bool:
    return validation is not None and cfg.eval.validation == "async"


def async_validation(job: TrainJob, validator: Any = None) -> Any:
    """A context giving the ValidationConfig of a job whose validation is asynchronous (its
    validator actor, ``validator`` if started already, runs while the context is open), else None."""
    if not validates_async(job.cfg, job.validation):
        return nullcontext(None)
    return validation_actor(job.validation, job.model_dir, job.cfg, scored(job, job.run_name), validator)


def check_paths(cfg: Config) -> Path:
    """The model's native checkpoint dir; an error naming the key when model or data do not exist."""
    model_dir = resolve_model_dir(cfg.model.path)
    keys = ("train", "val", "val_gt") if cfg.eval.every_n_steps >= 0 else ("train",)  # val: only if used
    for key in keys:
        value = getattr(cfg.data, key)
        if value and file_entry(value) is None and not is_dir(value):
            raise FileNotFoundError(f"data.{key} = {value!r} does not exist")
    return model_dir


def rejects_path(cfg: Config, output_dir: Path) -> Path:
    """Where a run's rejected rows go: ``data.rejects`` or <output>/rejects.jsonl."""
    return Path(cfg.data.rejects or output_dir / "rejects.jsonl")


def prepare_data(
    cfg: Config, model_dir: Path, output_dir: Path, log: Any = print, use_ray: bool | None = None
) -> Prepared:
    """Validate every row and image once. The rejects are written by the caller (``write_rejects``)
    once every check has passed: a refused run writes nothing."""
    t0 = time.time()
    settings = train_settings(cfg, model_dir)
    prepared = prepare(
        cfg.data.train,
        cfg.data.root,
        settings,
        strict=cfg.data.strict,
        seed=cfg.data.shuffle_seed,
        progress=True,
        use_ray=use_ray,
        fmt=cfg.data.format,
        prompt=cfg.eval.prompt,
    )
    stats = prepared.stats()
    log(
        f"[data] {stats['rows_ok']} rows ok, {stats['rows_rejected']} rejected {stats['rejects'] or ''} "
        f"(rejects: {rejects_path(cfg, output_dir)}); tokens p50 {stats['tokens']['p50']} p95 {stats['tokens']['p95']} "
        f"max {stats['tokens']['max']} ({time.time() - t0:.1f}s)"
    )
    return prepared


def train_settings(cfg: Config, model_dir: Path) -> ImageSettings:
    return image_settings(
        model_dir,
        cfg.model.template,
        cfg.model.system_message,
        cfg.data,
        max_seq_length=cfg.model.max_seq_length,
    )


def make_job(
    cfg: Config,
    model_dir: Path,
    records: Any,
    run_dir: str,
    validation: ValidationSet | None,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    identity: dict[str, Any] | None = None,
) -> TrainJob:
    """Plan every micro-batch and find where the run stands; ``records`` is the ObjectRef of the
    validated records (shared by the trials of a sweep), or the table itself without Ray."""
    table = resolve(records)
    units = plan_units(table, cfg.data.group_by_image)
    check_packing(cfg, table, units)
    plan = make_plan(
        len(units),
        cfg.train.global_batch_size,
        cfg.train.per_device_batch_size,
        cfg.cluster.num_workers,
        cfg.train.epochs,
        cfg.train.max_steps,
    )
    planned = plan_microbatches(table, plan, cfg.train.seed, cfg.train.group_by_length, units=units)
    start_step, resume_from = runs.latest_checkpoint(run_dir, cfg.cluster.num_workers)
    fail_at = os.environ.get("RAYLORA_FAIL_AT_STEP")
    return TrainJob(
        cfg=cfg,
        plan=plan,
        model_dir=str(model_dir),
        settings=train_settings(cfg, model_dir),
        records=records,
        planned=planned if table is records else ray_put(planned),
        run_dir=run_dir,
        start_step=start_step,
        resume_from=resume_from,
        validation=validation,
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        fail_at_step=int(fail_at) if fail_at else None,
        identity=identity if identity is not None else runs.identity(cfg, model_dir),
        early_stop=runs.early_stop(run_dir) if resume_from else None,
    )


def ray_put(value: Any) -> Any:
    import ray

    return ray.put(value)


def check_packing(cfg: Config, records: Any, units: list[list[int]]) -> None:
    """A packing budget below the longest sequence is an error here, not in a worker mid-run."""
    budget = cfg.data.max_packed_tokens
    if budget <= 0:
        return
    lengths, _ = unit_lengths(records, units)
    longest = max(lengths)
    if longest > budget:
        what = "image with all its captions" if cfg.data.group_by_image else "row"
        raise ValueError(
            f"data.max_packed_tokens={budget} is below the longest sequence ({longest} tokens, one {what}); "
            f"set data.max_packed_tokens to at least {longest}"
        )


def worker_failure_notice(queue: Any, max_failures: int) -> Any:
    """A Ray Train callback (on the controller) that tells the driver's console which worker failed
    and why when FailureConfig restarts the workers from the latest checkpoint (a failure past
    ``cluster.max_failures`` fails the run: the driver's error line says it)."""
    from ray.train import UserCallback

    class WorkerFailureNotice(UserCallback):
        failures = 0

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            self.failures += 1
            if 0 <= max_failures < self.failures:
                return
            for rank, error in sorted(worker_exceptions.items()):
                why = console.headline(error, typed=True)
                line = f"[train] worker rank {rank} failed ({why}): restarting from the latest checkpoint"
                send(queue, {"line": line})

    return WorkerFailureNotice()


def build_trainer(job: TrainJob, callbacks: list[Any] | None = None, validation: Any = None) -> Any:
    """The TorchTrainer of a job: scaling, storage, checkpoints (the best kept by validation score),
    failure handling; ``validation``: the ValidationConfig of :func:`async_validation`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = job.cfg
    enable_train_state_tracking()  # the dashboard's Train view: read when the trainer is built
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    storage = job.run_dir.rstrip("/").rsplit("/", 1)[0]
    return TorchTrainer(
        train_func,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            callbacks=callbacks,
        ),
        validation_config=validation,
    )


def open_mlflow_run(cfg: Config, plan: BatchPlan, run_dir: str) -> tuple[str, str, str]:
    """(tracking uri, experiment id, run id): the run this run dir started before, or a new one."""
    uri, exp_id = tracking.setup(cfg)
    known = runs.read_text(f"{run_dir}/mlflow_run_id")
    if known and tracking.reopen_run(known.strip(), uri):
        return uri, exp_id, known.strip()
    params = {
        **cfg.flat(),
        "trainable.grad_accum": plan.grad_accum,
        "trainable.total_steps": plan.total_steps,
    }
    run_id = tracking.create_run(
        exp_id,
        Path(run_dir).name,
        tags={
            "base_model": cfg.model.path,
            "dataset": cfg.tracking.dataset,
            "train_annotation": cfg.data.train,
            "git_commit": tracking.git_commit(),
            "config_hash": cfg.fingerprint(),
            "run_dir": run_dir,
        },
        params=params,
        uri=uri,
    )
    runs.write_text(f"{run_dir}/mlflow_run_id", run_id)
    return uri, exp_id, run_id


def run(cfg: Config, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one job end to end; returns the summary written to metrics.json.

    Every check comes first and writes nothing (config, paths, the tracking store, the run folder's
    identity, the cluster's size and storage, the data, the plan); only then the output folder, the
    run's MLflow run and the run folder's record appear. The MLflow run ends FAILED on any error after
    that, KILLED on Ctrl-C or SIGTERM.
    """
    import ray

    target = str(output_dir or cfg.output_dir)
    if is_remote(target):  # object storage: the outputs are made in a temporary folder, then copied
        return run_to_remote(cfg, target)
    output_dir = Path(target)
    tracking.check_tracking(tracking.tracking_uri(cfg))  # before any heavy work
    model_dir = check_paths(cfg)  # missing model or data: an error before the cluster starts
    identity = runs.identity(cfg, model_dir)
    run_dir = runs.run_dir(cfg, identity)
    runs.check_claim(run_dir, identity)  # another config's run is never resumed
    init_ray(cfg)
    preflight(cfg, absolute(cfg.cluster.storage_path), tracking.tracking_uri(cfg))
    validation = validation_set(cfg, model_dir)
    validator = start_validator(validation, str(model_dir), cfg) if validates_async(cfg, validation) else None
    try:
        return prepare_and_fit(cfg, model_dir, output_dir, run_dir, identity, validation, validator)
    finally:
        if validator is not None:
            ray.kill(validator)


def run_to_remote(cfg: Config, target: str) -> dict[str, Any]:
    """:func:`run` with ``output_dir`` in object storage (``s3://...``): the outputs (adapter,
    metrics, config, rejects, logs) are written to a temporary folder and copied to ``target`` when
    the run ends, whether it succeeds or fails. The folder is removed after a success; after a
    failure it stays (the error line names the log in it)."""
    import tempfile

    import pyarrow.fs as pafs

    from raylora.files import filesystem

    local = tempfile.mkdtemp(prefix="raylora-output-")
    ok = False
    try:
        summary = run(cfg, local)
        ok = True
        return summary
    finally:
        if any(Path(local).iterdir()):
            fs, path = filesystem(target)
            pafs.copy_files(local, path, destination_filesystem=fs)
            print(f"[done] outputs copied to {redact(target)}", flush=True)
        if ok:
            shutil.rmtree(local, ignore_errors=True)


def prepare_and_fit(
    cfg: Config,
    model_dir: Path,
    output_dir: Path,
    run_dir: str,
    identity: dict[str, Any],
    validation: ValidationSet | None,
    validator: Any,
) -> dict[str, Any]:
    """:func:`run` from the data check on."""
    import ray

    prepared = prepare_data(cfg, model_dir, output_dir)
    job = make_job(cfg, model_dir, ray.put(prepared.table), run_dir, validation, identity=identity)
    output_dir.mkdir(parents=True, exist_ok=True)  # after every check: a refused run writes nothing
    console.log_errors_to(output_dir)
    prepared.write_rejects(rejects_path(cfg, output_dir))
    uri, exp_id, run_id = open_mlflow_run(cfg, job.plan, run_dir)
    job.tracking_uri, job.mlflow_run_id = uri, run_id
    print(f"[mlflow] {tracking.run_url(uri, exp_id, run_id)}", flush=True)
    with tracking.ends_on_error(run_id, uri):
        return fit(job, output_dir, prepared, exp_id, validator)


def finished_line(job: TrainJob) -> str:
    return f"[train] {redact(job.run_dir)} already finished ({job.start_step} steps); writing its outputs"


def fit(
    job: TrainJob, output_dir: Path, prepared: Prepared, exp_id: str, validator: Any = None
) -> dict[str, Any]:
    """Run the job's TorchTrainer (or, for a finished run, only write its outputs)."""

    cfg, plan = job.cfg, job.plan
    if job.finished:
        print(finished_line(job), flush=True)
        return finish(job, output_dir, prepared, exp_id, 0.0)
    print(
        f"[train] {plan.total_steps} optimizer steps of {cfg.train.global_batch_size} samples "
        f"({cfg.cluster.num_workers} workers x {cfg.train.per_device_batch_size} x {plan.grad_accum} accumulation)"
        + (f", resuming at step {job.start_step}" if job.start_step else "")
        + f"; outputs: {output_dir}",
        flush=True,
    )
    t0 = time.time()
    with console.step_progress(plan.total_steps) as channel:
        job.progress = channel.queue
        notice = worker_failure_notice(channel.queue, cfg.cluster.max_failures)
        with async_validation(job, validator) as validation:
            result = build_trainer(job, [notice], validation).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint; see the logs under {redact(job.run_dir)}")
    return finish(job, output_dir, prepared, exp_id, time.time() - t0)


def write_outputs(job: TrainJob, checkpoint_dir: Path, output_dir: Path, summary: dict[str, Any]) -> None:
    """<output>/adapter (PEFT + tokenizer + processor files), config.yaml, metrics.json."""
    cfg = job.cfg
    needed = tree_size(runs.adapter_dir(checkpoint_dir)) + (1 << 20)  # + tokenizer/processor files, config
    with writes_to(output_dir, needed):  # a full disk: one line, the old adapter kept whole
        with atomic_dir(runs.adapter_dir(output_dir), overwrite=True) as adapter:
            shutil.copytree(runs.adapter_dir(checkpoint_dir), adapter, dirs_exist_ok=True)
            complete_adapter_dir(adapter, Path(job.model_dir), job.settings)
        save_config(cfg, output_dir / "config.yaml")
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))


def finish(
    job: TrainJob, output_dir: Path, prepared: Prepared, exp_id: str | None, seconds: float
) -> dict[str, Any]:
    """Outputs from the selected checkpoint (``train.select``: the best val CIDEr, or the latest),
    artifacts to MLflow, the summary line."""
    cfg, uri, run_id = job.cfg, job.tracking_uri, job.mlflow_run_id
    found = runs.checkpoints(job.run_dir, cfg.cluster.num_workers)
    if not found:
        raise RuntimeError(f"training ended without a checkpoint under {redact(job.run_dir)}")
    latest, chosen = found[-1], runs.choose(found, cfg.train.select)
    per_step = job.plan.microbatches_per_step
    samples = resolve(job.planned).column("samples").to_numpy()  # records (captions) per micro-batch
    with checkpoint_directory(latest.path) as d:
        state = runs.read_state(d)
    steps_run = state["step"] - job.start_step if seconds else 0
    samples_run = int(samples[job.start_step * per_step : state["step"] * per_step].sum())
    evaluations = [list(v) for v in runs.validations(job.run_dir)]
    summary = {
        "final_loss": state.get("loss"),
        "steps": state["step"],
        "steps_this_run": steps_run,
        "samples": int(samples[: state["step"] * per_step].sum()),
        "samples_per_s": samples_run / seconds if steps_run else 0.0,
        "seconds": round(seconds, 1),
        # the adapter's checkpoint: its step and val CIDEr, and how it was chosen
        "val_cider": chosen.val_cider,
        "selected": {"by": cfg.train.select, "step": chosen.step, "val_cider": chosen.val_cider},
        "evaluations": evaluations,  # [step, val CIDEr] of every validation of the run
        "early_stop": runs.early_stop(job.run_dir),
        "rows_ok": prepared.rows_ok,
        "rows_rejected": len(prepared.rejects),
        "mlflow_run_id": run_id,
        "checkpoint": chosen.path,
    }
    history = tracking.metric_history(run_id, "tokens_per_s", uri) if run_id else []
    if history:
        summary["tokens_per_s"] = sum(m.value for m in history) / len(history)
    with checkpoint_directory(chosen.path) as d:
        write_outputs(job, Path(d), output_dir, summary)
    mlflow_text = log_outputs(job, output_dir, summary, exp_id) if run_id else ""
    print(
        f"[done] {summary['steps']} steps, final loss {summary['final_loss']:.4f}, {seconds:.0f}s; "
        f"adapter: {output_dir / 'adapter'} ({selection_text(chosen, evaluations, cfg.train.select)})"
        f"{mlflow_text}",
        flush=True,
    )
    return summary


def log_outputs(job: TrainJob, output_dir: Path, summary: dict[str, Any], exp_id: str | None) -> str:
    """The selection (tags, ``selected_val_cider``), the outputs as artifacts, the run FINISHED; the
    summary line's MLflow part."""
    uri, run_id, selected = job.tracking_uri, job.mlflow_run_id, summary["selected"]
    tags = {"selected_by": selected["by"], "selected_step": str(selected["step"])}
    if summary["early_stop"]:
        tags["early_stopped_at_step"] = str(summary["early_stop"]["step"])
    tracking.set_tags(run_id, tags, uri)
    if selected["val_cider"] is not None:
        tracking.MetricLogger(uri, run_id).log(
            {"selected_val_cider": selected["val_cider"]}, selected["step"]
        )
    tracking.log_artifacts(run_id, runs.adapter_dir(output_dir), runs.ADAPTER, uri)
    for name in ("metrics.json", "config.yaml", "rejects.jsonl"):
        if (output_dir / name).is_file():
            tracking.log_artifacts(run_id, output_dir / name, None, uri)
    tracking.end_run(run_id, "FINISHED", uri)
    return f"; MLflow {tracking.run_url(uri, exp_id, run_id)}"


def selection_text(chosen: runs.CheckpointInfo, evaluations: list, select: str) -> str:
    """Which checkpoint the adapter is, for the summary line."""
    if chosen.val_cider is None:
        return f"step {chosen.step}, not validated"
    text = f"step {chosen.step}, val CIDEr {chosen.val_cider:.3f}"
    if select == "best" and len(evaluations) > 1:
        text += f", the best of {len(evaluations)} evaluations"
    last_step, last = evaluations[-1]
    return text if last_step == chosen.step else f"{text}; the last, step {last_step}: {last:.3f}"


# ============================================================================ without Ray (torchrun)


def launched_by_torchrun() -> bool:
    """Whether this process is one of ``torchrun``'s (it sets TORCHELASTIC_RUN_ID and the ranks)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def tracking_configured(cfg: Config) -> bool:
    """Without Ray, MLflow logs only when asked: ``tracking.uri`` or ``MLFLOW_TRACKING_URI``."""
    return bool(cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))


def run_local(cfg: Config, output_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The recipe without Ray: this process is one rank of ``torchrun`` (or the only one).

    Rank 0 runs the driver's checks, validates the data and plans the run (as :func:`run`), then
    hands the job to the other ranks; every rank trains; rank 0 writes the outputs. The config's
    ``cluster.num_workers`` is the launcher's world size. Returns the summary on rank 0, None on the
    others.
    """
    if "RANK" in os.environ:  # a launcher's process
        return run_rank(cfg, output_dir)
    # one plain process: a world of one, for this call only (a later one picks its own port)
    world = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    world["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    before = {k: os.environ.get(k) for k in world}
    os.environ.update(world)
    try:
        return run_rank(cfg, output_dir)
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_rank(cfg: Config, output_dir: str | Path | None = None) -> dict[str, Any] | None:
    """:func:`run_local` in one rank's process (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT`` set)."""
    import deepspeed
    import torch.distributed as dist

    if is_remote(str(output_dir or cfg.output_dir)):
        raise ValueError(
            f"output_dir={output_dir or cfg.output_dir}: without Ray the outputs go to a local folder"
        )
    output_dir = Path(output_dir or cfg.output_dir)
    runtime = LocalRuntime(cfg.cluster.use_gpu)
    if cfg.cluster.num_workers != runtime.world:
        if runtime.rank == 0:
            print(f"[train] {runtime.world} processes: cluster.num_workers={runtime.world}", flush=True)
        cfg.cluster.num_workers = runtime.world
    with console.library_prints():
        deepspeed.init_distributed(dist_backend="nccl" if runtime.device.type == "cuda" else "gloo")
    objects = dist.new_group(backend="gloo")  # the job travels as a pickled object, on the CPU
    payload: list[Any] = [None]
    prepared = exp_id = None
    if runtime.rank == 0:
        try:
            job, prepared, exp_id = plan_local(cfg, output_dir)
            payload = [job]
        except Exception as e:
            payload = [f"rank 0 refused the run: {console.headline(e)}"]
            dist.broadcast_object_list(payload, src=0, group=objects)
            raise
    dist.broadcast_object_list(payload, src=0, group=objects)
    job = payload[0]
    if isinstance(job, str):
        raise RuntimeError(job)
    try:
        tracked = runtime.rank == 0 and job.mlflow_run_id is not None
        t0 = time.time()
        with tracking.ends_on_error(job.mlflow_run_id, job.tracking_uri) if tracked else nullcontext():
            if not job.finished:
                run_recipe(job, runtime)
            barrier()
            if runtime.rank != 0:
                return None
            seconds = 0.0 if job.finished else time.time() - t0
            return finish(job, output_dir, prepared, exp_id, seconds)
    finally:  # DeepSpeed's: it also drops the process groups it cached (another run in this process)
        deepspeed.comm.destroy_process_group()


def plan_local(cfg: Config, output_dir: Path) -> tuple[TrainJob, Prepared, str | None]:
    """Rank 0's share of :func:`run_local`: every check, the data, the plan, the MLflow run."""
    if is_remote(cfg.cluster.storage_path):
        raise ValueError(
            f"cluster.storage_path={cfg.cluster.storage_path}: without Ray the run folder must be a local "
            "or shared file system path (every rank writes its checkpoint shard there)"
        )
    tracked = tracking_configured(cfg)
    if tracked:
        tracking.check_tracking(tracking.tracking_uri(cfg))
    model_dir = check_paths(cfg)
    identity = runs.identity(cfg, model_dir)
    run_dir = runs.run_dir(cfg, identity)
    runs.check_claim(run_dir, identity)
    prepared = prepare_data(cfg, model_dir, output_dir, use_ray=False)
    job = make_job(cfg, model_dir, prepared.table, run_dir, validation_set(cfg, model_dir), identity=identity)
    output_dir.mkdir(parents=True, exist_ok=True)
    console.log_errors_to(output_dir)
    prepared.write_rejects(rejects_path(cfg, output_dir))
    exp_id = None
    if tracked:
        job.tracking_uri, exp_id, job.mlflow_run_id = open_mlflow_run(cfg, job.plan, run_dir)
        print(f"[mlflow] {tracking.run_url(job.tracking_uri, exp_id, job.mlflow_run_id)}", flush=True)
    if job.finished:
        print(finished_line(job), flush=True)
        return job, prepared, exp_id
    print(
        f"[train] {job.plan.total_steps} optimizer steps of {cfg.train.global_batch_size} samples "
        f"({cfg.cluster.num_workers} processes x {cfg.train.per_device_batch_size} x {job.plan.grad_accum} "
        f"accumulation, no Ray)" + (f", resuming at step {job.start_step}" if job.start_step else ""),
        flush=True,
    )
    return job, prepared, exp_id


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
