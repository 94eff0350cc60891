"""The LoRA fine-tuning recipe: Ray Train (V2) + DeepSpeed ZeRO + PEFT LoRA, tracked in MLflow.

    python -m raylora.train                                 # the recipe if pretrained/ and data/ exist, else the demo
    python -m raylora.train --config internvl2_2b_coco train.lr=2e-5 cluster.num_workers=16
    python -m raylora.train --config demo --output outputs/demo lora.rank=8

Read top to bottom: :class:`LoRAFinetuneRecipe` is what every Ray Train worker runs (``setup``,
``restore``, ``train``, ``evaluate``, ``save_checkpoint``); ``train_func`` builds and runs it. Below
it, the driver: :func:`make_job` validates nothing itself but plans every micro-batch and decides,
once, whether the run starts or resumes (and from which checkpoint); :func:`run` validates the
data, opens the MLflow run, fits the TorchTrainer (or, for a finished run, only writes its outputs)
and writes the adapter. Running the same command again resumes from the latest checkpoint;
``cluster.max_failures`` restarts crashed workers from it within a run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylora import console, runs, tracking
from raylora.cli import config_from_args, config_parser
from raylora.cluster import init_ray, preflight
from raylora.config import Config, save_config
from raylora.console import run_command, send, step_line
from raylora.data.pipeline import iter_rank_batches, rank_dataset
from raylora.data.plan import BatchPlan, make_plan, plan_microbatches, plan_units, unit_lengths
from raylora.data.prepare import Prepared, prepare
from raylora.data.records import EvalItem, read_gt, read_karpathy
from raylora.data.settings import ImageSettings
from raylora.files import absolute, atomic_dir, is_remote, redact, tree_size, writes_to
from raylora.generation import GenerationSettings, generate_captions
from raylora.loss import forward_loss, to_device
from raylora.metrics import cider
from raylora.model import (
    apply_lora,
    attention_for_layout,
    attn_implementation,
    count_trainable,
    load_base_model,
    lora_init_snapshot,
    lora_state_dict,
    save_adapter,
    torch_dtype,
)
from raylora.monitoring import TrainMetrics, enable_train_state_tracking
from raylora.sources import complete_adapter_dir, image_settings, resolve_model_dir

# torch, deepspeed, ray and transformers are imported inside the functions that run on the workers
# or fit the trainer: the driver's checks (config, paths, tracking store) answer in a second.

DEEPSPEED_CONFIGS = Path(__file__).parent / "deepspeed_configs"


# ================================================================================ the worker's job


@dataclass(frozen=True)
class ValidationSet:
    """The fixed validation subset (first ``data.val_size`` images), its references and settings."""

    items: list[EvalItem]
    references: dict[int, list[str]]
    settings: ImageSettings


@dataclass
class TrainJob:
    """Everything a training worker needs, resolved once on the driver."""

    cfg: Config
    plan: BatchPlan
    model_dir: str
    settings: ImageSettings
    records: Any  # ObjectRef of the validated records (pyarrow Table)
    planned: Any  # ObjectRef of the planned micro-batches (pyarrow Table: index, rows)
    run_dir: str
    start_step: int = 0  # the step of ``resume_from``; 0 for a new run
    resume_from: str | None = None  # the newest complete checkpoint on storage
    validation: ValidationSet | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    fail_at_step: int | None = None  # RAYLORA_FAIL_AT_STEP: crash one worker once (the fault drill)
    progress: Any = None  # the driver's progress queue (raylora.console); None: rank 0 prints its lines
    identity: dict[str, Any] | None = None  # runs.identity: recorded in the run folder at the first step

    @property
    def finished(self) -> bool:
        return self.resume_from is not None and self.start_step >= self.plan.total_steps

    @property
    def run_name(self) -> str:
        """The Ray Train run's name (the dashboard's): the run folder's."""
        return self.run_dir.rstrip("/").rsplit("/", 1)[1]

    def __str__(self) -> str:
        """What Ray Train's state tracking shows of the job (the dashboard's run settings): a summary,
        never the whole config or the tracking URI (which may carry credentials)."""
        return (
            f"TrainJob(run_dir={redact(self.run_dir)}, model_dir={redact(self.model_dir)}, "
            f"steps={self.plan.total_steps}, start_step={self.start_step})"
        )


# ====================================================================================== the recipe


def deepspeed_config(cfg: Config, grad_accum: int, world_size: int, bf16: bool) -> dict[str, Any]:
    """The shipped ZeRO JSON for ``train.zero_stage`` with the run's batch, clipping and precision."""
    stage = max(cfg.train.zero_stage, 1)
    ds = json.loads((DEEPSPEED_CONFIGS / f"zero{stage}.json").read_text())
    if cfg.train.zero_stage == 0:
        ds["zero_optimization"] = {"stage": 0}
    ds["train_micro_batch_size_per_gpu"] = cfg.train.per_device_batch_size
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = cfg.train.per_device_batch_size * grad_accum * world_size
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds["bf16"] = {"enabled": bf16}
    if cfg.train.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return ds


def checkpoint_state(checkpoint: Any) -> dict[str, Any]:
    """``train_state.json`` of a checkpoint (step, loss, val CIDEr, ...); {} for None."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as d:
        return json.loads(Path(d, "train_state.json").read_text())


class LoRAFinetuneRecipe:
    """One Ray Train worker's share of a LoRA fine-tuning run, in the shape of a torchtune recipe."""

    def __init__(self, job: TrainJob):
        import ray.train

        ctx = ray.train.get_context()
        self.job, self.cfg, self.plan = job, job.cfg, job.plan
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.is_rank0 = self.rank == 0
        self.device = ray.train.torch.get_device()
        self.step = 0
        self.progress = job.progress if self.is_rank0 else None
        self.last_tick = 0.0
        self.logger = (
            tracking.MetricLogger(job.tracking_uri, job.mlflow_run_id)
            if self.is_rank0 and job.mlflow_run_id and job.tracking_uri
            else None
        )
        self.ray_metrics = TrainMetrics(job.run_name) if self.is_rank0 else None  # Prometheus, Grafana

    def setup(self) -> None:
        """Model, LoRA, optimizer, scheduler and the DeepSpeed engine."""
        import deepspeed
        import torch
        from transformers import get_cosine_schedule_with_warmup

        cfg, t = self.cfg, self.cfg.train
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
        torch.manual_seed(t.seed)
        self.dtype = torch_dtype(cfg.model.dtype, self.device.type)
        structured = cfg.data.group_by_image or cfg.data.max_packed_tokens > 0
        attn = attn_implementation(cfg.model.attn_implementation, self.device.type)
        attn, self.text_attention, notice = attention_for_layout(attn, structured, self.device.type)
        if notice:
            self.print(f"[train] {notice}")
        model = load_base_model(self.job.model_dir, self.dtype, attn)
        model = apply_lora(model, cfg, model.config.text_config.model_type)
        # pissa/olora moved the adapter's initial value out of the base weights: rank 0 keeps it to
        # save adapters for the original base (recomputed identically on a resume: same weights, seed)
        self.lora_init = lora_init_snapshot(model) if self.is_rank0 else None
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        trainable, total = count_trainable(model)
        self.print(f"[train] trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

        params = [p for p in model.parameters() if p.requires_grad]
        adamw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
        if t.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **adamw)
        else:
            optimizer = torch.optim.AdamW(params, **adamw)
        total_steps = self.plan.total_steps
        self.scheduler = get_cosine_schedule_with_warmup(
            optimizer, math.ceil(total_steps * t.warmup_ratio), total_steps
        )
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(cfg, self.plan.grad_accum, self.world, self.dtype == torch.bfloat16),
        )
        self.synced = t.zero_stage == 3 and self.world > 1  # ZeRO-3 generation needs every rank

    def restore(self) -> None:
        """Load the newest checkpoint: Ray's (a worker restart within the run) or the driver's (a rerun)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if self.job.resume_from and checkpoint_state(checkpoint).get("step", -1) < self.job.start_step:
            checkpoint = ray.train.Checkpoint(self.job.resume_from)  # on storage, not yet known to Ray
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            self.engine.load_checkpoint(
                os.path.join(d, "ds"),
                tag="ds",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            self.step = json.loads(Path(d, "train_state.json").read_text())["step"]
        self.print(f"[train] resumed from the checkpoint at step {self.step}/{self.plan.total_steps}")

    def batches(self):
        """This rank's micro-batches from the restored step on, in plan order, as torch tensors."""
        import ray

        first = self.step * self.plan.microbatches_per_step + self.rank
        dataset = rank_dataset(
            ray.get(self.job.records),
            ray.get(self.job.planned),
            self.rank,
            self.world,
            first,
            self.job.settings,
            actors=self.cfg.data.decode_actors,
            cpus_per_actor=self.cfg.data.decode_cpus,
            max_packed_tokens=self.cfg.data.max_packed_tokens,
        )
        stream = iter_rank_batches(dataset, first, self.world)
        return (
            self.traced(stream) if self.cfg.train.trace_data and not is_remote(self.job.run_dir) else stream
        )

    def traced(self, stream):
        """``train.trace_data``: every micro-batch's index, step, rank, node and record indices, appended
        to ``<run dir>/data_trace/rank<r>.jsonl`` as it is consumed (restarts append their replay)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        path = Path(self.job.run_dir) / "data_trace" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for batch in stream:
                index = int(batch["index"])
                step = index // self.plan.microbatches_per_step + 1
                records = batch["record_index"].tolist()
                f.write(
                    json.dumps(
                        {"index": index, "step": step, "rank": self.rank, "node": node, "records": records}
                    )
                    + "\n"
                )
                f.flush()
                yield batch

    def train(self) -> None:
        """The loop: an optimizer step every ``grad_accum`` micro-batches; log, evaluate, checkpoint."""
        cfg, total, accum = self.cfg, self.plan.total_steps, self.plan.grad_accum
        window, last_eval = StepWindow(), {}
        self.started = (self.step, time.time())
        self.engine.train()
        for micro, batch in enumerate(self.batches(), 1):
            window.add(*self.forward_backward(batch), batch)
            if micro % accum:
                continue
            self.step += 1
            self.claim_run()
            self.tick()
            self.fault_drill()
            done = self.step >= total
            if done or self.step % cfg.train.log_every_n_steps == 0:
                self.last_loss = self.log_step(window)
                window = StepWindow()
            evaluate = self.job.validation is not None and (
                done or (cfg.eval.every_n_steps > 0 and self.step % cfg.eval.every_n_steps == 0)
            )
            if evaluate:
                last_eval = self.evaluate()
            if evaluate or done or self.step % cfg.train.checkpoint_every_n_steps == 0:
                loss = window.mean_loss() if window.labels else self.last_loss
                self.save_checkpoint({"step": self.step, "total_steps": total, "loss": loss, **last_eval})
            if done:
                return
        raise RuntimeError(
            f"rank {self.rank}: the data stream ended at step {self.step} of {total}; "
            "the plan and the dataset disagree"
        )

    def forward_backward(self, batch: dict[str, Any]) -> tuple[float, int]:
        """One micro-batch: forward, backward, DeepSpeed's step (it applies at the boundary).

        The loss of an optimizer step is the sum of its label tokens' cross-entropies (all
        micro-batches, all ranks) over their number, whatever the layout; DeepSpeed divides each
        micro-batch's loss by accumulation x world, so the micro-batch's sum is scaled back up.
        Returns (summed cross-entropy, label tokens) of this micro-batch.
        """
        batch = to_device(batch, self.device)
        loss_sum, tokens = forward_loss(self.engine, batch, self.dtype, self.text_attention)
        scale = self.plan.grad_accum * self.world / int(batch["step_label_tokens"])
        self.engine.backward(loss_sum * scale)
        self.engine.step()
        return loss_sum.item(), tokens

    def log_step(self, window: StepWindow) -> float:
        """Sum the window over ranks: the same numbers go to MLflow and to the step line; the loss."""
        import torch
        import torch.distributed as dist

        # on the training device: NCCL (GPUs) reduces CUDA tensors only
        values = [window.loss, window.labels, window.samples, window.tokens]
        sums = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        loss, labels, samples, tokens = sums.cpu().tolist()
        elapsed = max(time.time() - window.start, 1e-9)
        metrics = {
            "loss": loss / max(labels, 1),  # mean cross-entropy per label token
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "epoch": self.step / self.plan.steps_per_epoch,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.logger is not None:
            self.logger.log(metrics, self.step)
        if self.ray_metrics is not None:
            self.ray_metrics.record({**metrics, "step": self.step})
        rate = (self.step - self.started[0]) / max(time.time() - self.started[1], 1e-9)
        eta = (self.plan.total_steps - self.step) / rate if rate > 0 else float("inf")
        shown = {**metrics, "eta": eta}
        if self.progress is not None:
            self.send({"step": self.step, "metrics": shown})
        elif self.is_rank0:
            print(step_line(self.step, self.plan.total_steps, shown), flush=True)
        return metrics["loss"]

    def evaluate(self) -> dict[str, float]:
        """Caption the fixed validation subset (sharded over ranks) and score it with fast CIDEr."""
        import torch.distributed as dist

        val, e = self.job.validation, self.cfg.eval
        per_rank = math.ceil(len(val.items) / self.world)
        mine = val.items[self.rank * per_rank : (self.rank + 1) * per_rank]
        if self.synced:  # every rank must run the same number of forward passes
            mine = mine + [val.items[-1]] * (per_rank - len(mine))
        if not hasattr(self, "eval_tokenizer"):
            self.eval_tokenizer = val.settings.conversation_tokenizer()
        gen = GenerationSettings.from_config(e)
        caps = generate_captions(
            self.engine.module, self.eval_tokenizer, val.settings, [it.image for it in mine], gen, self.synced
        )
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, [(it.image_id, c) for it, c in zip(mine, caps)])
        captions: dict[int, list[str]] = {}
        for part in gathered:
            for image_id, caption in part:
                captions.setdefault(image_id, [caption])
        metrics = {"val_cider": float(cider(val.references, captions)), "val_images": len(captions)}
        if self.logger is not None:
            self.logger.log(metrics, self.step)
        if self.ray_metrics is not None:
            self.ray_metrics.record(metrics)
        self.print(
            f"[eval] step {self.step}: val CIDEr {metrics['val_cider']:.3f} on {len(captions)} images ({gen.decoding})"
        )
        return metrics

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        """DeepSpeed state (all ranks), the PEFT adapter (for the original base, whatever
        ``lora.init``) and train_state.json, reported to Ray Train."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="raylora-ckpt-") as d:
            self.engine.save_checkpoint(os.path.join(d, "ds"), tag="ds", exclude_frozen_parameters=True)
            state = lora_state_dict(self.engine.module)  # collective under ZeRO-3
            if self.is_rank0:
                save_adapter(self.engine.module, Path(d) / "adapter", state, self.lora_init)
                Path(d, "train_state.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def claim_run(self) -> None:
        """Rank 0 records the run's identity in its folder once a step has run: a run exists from
        its first step on, so a refused or crashed-at-start run never claims its name."""
        if self.is_rank0 and not getattr(self, "claimed", False) and self.job.identity is not None:
            runs.claim(self.job.run_dir, self.job.identity)
            self.claimed = True

    def fault_drill(self) -> None:
        """RAYLORA_FAIL_AT_STEP: the last rank crashes once at that step (FailureConfig restarts it)."""
        if self.job.fail_at_step != self.step or self.rank != self.world - 1 or is_remote(self.job.run_dir):
            return
        marker = Path(self.job.run_dir) / "injected_failure"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(self.step))
            raise RuntimeError(f"RAYLORA_FAIL_AT_STEP: simulated worker crash at step {self.step}")

    def print(self, text: str) -> None:
        """A line for the user: through the driver's progress display, or printed by rank 0."""
        if self.progress is not None:
            self.send({"step": self.step, "line": text})
        elif self.is_rank0:
            print(text, flush=True)

    def tick(self) -> None:
        """The step, to the driver's progress bar, at most once a second."""
        if self.progress is not None and time.time() - self.last_tick >= 1.0:
            self.last_tick = time.time()
            self.send({"step": self.step})

    def send(self, event: dict[str, Any]) -> None:
        if not send(self.progress, event):  # the driver is gone: training goes on, printing its lines
            self.progress = None
            if "line" in event:
                print(event["line"], flush=True)


class StepWindow:
    """Sums of cross-entropy, label tokens, samples and tokens since the last logged step."""

    def __init__(self) -> None:
        self.loss, self.labels, self.samples, self.tokens, self.start = 0.0, 0, 0, 0, time.time()

    def add(self, loss_sum: float, label_tokens: int, batch: dict[str, Any]) -> None:
        self.loss += loss_sum
        self.labels += label_tokens
        self.samples += int(batch["samples"])
        self.tokens += int(batch["attention_mask"].sum())

    def mean_loss(self) -> float:
        return self.loss / max(self.labels, 1)


def train_func(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the recipe from the driver's job and run it."""
    recipe = LoRAFinetuneRecipe(config["job"])
    recipe.setup()
    recipe.restore()
    recipe.train()


# ===================================================================================== the driver


def check_paths(cfg: Config) -> Path:
    """The model's native checkpoint dir; an error naming the key when model or data do not exist."""
    model_dir = resolve_model_dir(cfg.model.path)
    keys = ("train", "val", "val_gt") if cfg.eval.every_n_steps >= 0 else ("train",)  # val: only if used
    for key in keys:
        value = getattr(cfg.data, key)
        if value and not Path(value).exists():
            raise FileNotFoundError(f"data.{key} = {value!r} does not exist")
    return model_dir


def rejects_path(cfg: Config, output_dir: Path) -> Path:
    """Where a run's rejected rows go: ``data.rejects`` or <output>/rejects.jsonl."""
    return Path(cfg.data.rejects or output_dir / "rejects.jsonl")


def prepare_data(cfg: Config, model_dir: Path, output_dir: Path, log: Any = print) -> Prepared:
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


def validation_set(cfg: Config, model_dir: Path) -> ValidationSet | None:
    """The fixed validation subset (first data.val_size images) and its references, if configured."""
    if not cfg.data.val or cfg.eval.every_n_steps < 0:
        return None
    items = read_karpathy(cfg.data.val, cfg.data.val_root, limit=cfg.data.val_size)
    references = read_gt(cfg.data.val_gt, [i.image_id for i in items])
    missing = [i.image_id for i in items if i.image_id not in references]
    if missing:
        raise ValueError(f"{cfg.data.val_gt}: no reference captions for image ids {missing[:5]}")
    settings = image_settings(
        model_dir,
        cfg.model.template,
        cfg.model.system_message,
        cfg.data,
        max_num=cfg.eval.max_num,
        max_seq_length=cfg.model.max_seq_length,
    )
    return ValidationSet(items, references, settings)


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
    validated records (shared by the trials of a sweep)."""
    import ray

    table = ray.get(records)
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
        planned=ray.put(planned),
        run_dir=run_dir,
        start_step=start_step,
        resume_from=resume_from,
        validation=validation,
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        fail_at_step=int(fail_at) if fail_at else None,
        identity=identity if identity is not None else runs.identity(cfg, model_dir),
    )


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


def build_trainer(job: TrainJob, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer of a job: scaling, storage, checkpoints and failure handling."""
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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            callbacks=callbacks,
        ),
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

    output_dir = Path(output_dir or cfg.output_dir)
    tracking.check_tracking(tracking.tracking_uri(cfg))  # before any heavy work
    model_dir = check_paths(cfg)  # missing model or data: an error before the cluster starts
    identity = runs.identity(cfg, model_dir)
    run_dir = runs.run_dir(cfg, identity)
    runs.check_claim(run_dir, identity)  # another config's run is never resumed
    init_ray(cfg)
    preflight(cfg, absolute(cfg.cluster.storage_path), tracking.tracking_uri(cfg))
    prepared = prepare_data(cfg, model_dir, output_dir)
    validation = validation_set(cfg, model_dir)
    job = make_job(cfg, model_dir, ray.put(prepared.table), run_dir, validation, identity=identity)
    output_dir.mkdir(parents=True, exist_ok=True)  # after every check: a refused run writes nothing
    console.log_errors_to(output_dir)
    prepared.write_rejects(rejects_path(cfg, output_dir))
    uri, exp_id, run_id = open_mlflow_run(cfg, job.plan, run_dir)
    job.tracking_uri, job.mlflow_run_id = uri, run_id
    print(f"[mlflow] {tracking.run_url(uri, exp_id, run_id)}", flush=True)
    with tracking.ends_on_error(run_id, uri):
        return fit(job, output_dir, prepared, exp_id)


def fit(job: TrainJob, output_dir: Path, prepared: Prepared, exp_id: str) -> dict[str, Any]:
    """Run the job's TorchTrainer (or, for a finished run, only write its outputs)."""
    import ray.train

    cfg, plan = job.cfg, job.plan
    if job.finished:
        print(
            f"[train] {redact(job.run_dir)} already finished ({job.start_step} steps); writing its outputs",
            flush=True,
        )
        return finish(job, ray.train.Checkpoint(job.resume_from), output_dir, prepared, exp_id, 0.0)
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
        result = build_trainer(job, callbacks=[notice]).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint; see the logs under {redact(job.run_dir)}")
    return finish(job, result.checkpoint, output_dir, prepared, exp_id, time.time() - t0)


def write_outputs(job: TrainJob, checkpoint_dir: Path, output_dir: Path, summary: dict[str, Any]) -> None:
    """<output>/adapter (PEFT + tokenizer + processor files), config.yaml, metrics.json."""
    cfg = job.cfg
    needed = tree_size(checkpoint_dir / "adapter") + (1 << 20)  # + tokenizer/processor files, config
    with writes_to(output_dir, needed):  # a full disk: one line, the old adapter kept whole
        with atomic_dir(output_dir / "adapter", overwrite=True) as adapter:
            shutil.copytree(checkpoint_dir / "adapter", adapter, dirs_exist_ok=True)
            complete_adapter_dir(adapter, Path(job.model_dir), cfg.model.template, cfg.model.system_message)
        save_config(cfg, output_dir / "config.yaml")
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))


def finish(
    job: TrainJob, checkpoint: Any, output_dir: Path, prepared: Prepared, exp_id: str, seconds: float
) -> dict[str, Any]:
    """Outputs from the final checkpoint, artifacts to MLflow, the summary line."""
    import ray

    uri, run_id = job.tracking_uri, job.mlflow_run_id
    per_step = job.plan.microbatches_per_step
    samples = ray.get(job.planned).column("samples").to_numpy()  # records (captions) per micro-batch
    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, "train_state.json").read_text())
        steps_run = state["step"] - job.start_step if seconds else 0
        samples_run = int(samples[job.start_step * per_step : state["step"] * per_step].sum())
        summary = {
            "final_loss": state.get("loss"),
            "steps": state["step"],
            "steps_this_run": steps_run,
            "samples": int(samples[: state["step"] * per_step].sum()),
            "samples_per_s": samples_run / seconds if steps_run else 0.0,
            "seconds": round(seconds, 1),
            "val_cider": state.get("val_cider"),
            "rows_ok": prepared.rows_ok,
            "rows_rejected": len(prepared.rejects),
            "mlflow_run_id": run_id,
            "checkpoint": checkpoint.path,
        }
        history = tracking.metric_history(run_id, "tokens_per_s", uri)
        if history:
            summary["tokens_per_s"] = sum(m.value for m in history) / len(history)
        write_outputs(job, Path(d), output_dir, summary)
    tracking.log_artifacts(run_id, output_dir / "adapter", "adapter", uri)
    for name in ("metrics.json", "config.yaml", "rejects.jsonl"):
        if (output_dir / name).is_file():
            tracking.log_artifacts(run_id, output_dir / name, None, uri)
    tracking.end_run(run_id, "FINISHED", uri)
    cider_text = f"val CIDEr {summary['val_cider']:.3f}, " if summary["val_cider"] is not None else ""
    print(
        f"[done] {summary['steps']} steps, final loss {summary['final_loss']:.4f}, {cider_text}{seconds:.0f}s; "
        f"adapter: {output_dir / 'adapter'}; MLflow {tracking.run_url(uri, exp_id, run_id)}",
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python -m raylora.train", __doc__, "train.lr=1e-4 lora.rank=16")
    parser.add_argument("--output", help="output directory (default: the config's output_dir)")
    args = parser.parse_args(argv)

    def body() -> dict[str, Any]:
        cfg = config_from_args(args)
        return run(cfg, args.output)  # logs errors under the output folder once run has made it

    return run_command(body, command="train", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
