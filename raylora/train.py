"""The LoRA fine-tuning recipe: Ray Train (V2) + DeepSpeed ZeRO + PEFT LoRA, tracked in MLflow.

    python -m raylora.train                                 # the recipe if pretrained/ and data/ exist, else the demo
    python -m raylora.train --config internvl2_2b_coco train.lr=2e-5 cluster.num_workers=16
    python -m raylora.train --config demo --output outputs/demo lora.rank=8
    torchrun --nproc-per-node 2 -m raylora.train --config demo   # the same recipe without Ray
    python -m raylora.train --no-ray --config demo                # one plain process (debugging)

Read top to bottom: :class:`LoRAFinetuneRecipe` is what every Ray Train worker runs (``setup``,
``restore``, ``train``, ``evaluate``, ``save_checkpoint``); ``train_func`` builds and runs it. Below
it, the driver: :func:`make_job` validates nothing itself but plans every micro-batch and decides,
once, whether the run starts or resumes (and from which checkpoint); :func:`run` validates the
data, opens the MLflow run, fits the TorchTrainer (or, for a finished run, only writes its outputs)
and writes the adapter of the checkpoint ``train.select`` picks (the best validation CIDEr; checkpoints
are validated as :mod:`raylora.validation` says). Running the same command again resumes from the latest checkpoint;
``cluster.max_failures`` restarts crashed workers from it within a run.

The same recipe runs without Ray (:func:`run_local`): under ``torchrun`` (one process per GPU,
``RANK``/``WORLD_SIZE`` from the launcher) or as one plain process (``--no-ray``). Rank 0 does the
driver's checks and planning and hands the job to the others; every rank builds its own micro-batches
in-process with the same builder; checkpoints go to the same run folder (so either path resumes the
other's run); MLflow logs from rank 0 when ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` is set. Ray stays
the path for clusters, sweeps and fault tolerance.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylora import console, runs, tracking
from raylora.cli import config_from_args, config_parser
from raylora.cluster import init_ray, preflight
from raylora.config import Config, save_config
from raylora.console import run_command, send, step_line
from raylora.data.pipeline import iter_local_batches, iter_rank_batches, rank_dataset
from raylora.data.plan import BatchPlan, make_plan, plan_microbatches, plan_units, unit_lengths
from raylora.data.prepare import Prepared, prepare
from raylora.data.settings import ImageSettings
from raylora.files import absolute, atomic_dir, is_remote, redact, tree_size, writes_to
from raylora.generation import GenerationSettings, generate_captions
from raylora.loss import forward_loss, to_device
from raylora.model import (
    apply_lora,
    attention_for_layout,
    attention_line,
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
from raylora.validation import (
    SCORE,
    Scored,
    ValidationSet,
    eval_line,
    reported_metrics,
    score_captions,
    start_validator,
    validation_actor,
    validation_set,
)

# torch, deepspeed, ray and transformers are imported inside the functions that run on the workers
# or fit the trainer: the driver's checks (config, paths, tracking store) answer in a second.

DEEPSPEED_CONFIGS = Path(__file__).parent / "deepspeed_configs"


# ================================================================================ the worker's job


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
    early_stop: dict[str, Any] | None = None  # runs.early_stop: the run stopped on a plateau
    scores: Any = None  # a sweep trial's score channel (raylora.validation.Scored.scores)

    @property
    def finished(self) -> bool:
        done = self.start_step >= self.plan.total_steps or self.early_stop is not None
        return self.resume_from is not None and done

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


# ===================================================================================== runtimes


def resolve(value: Any) -> Any:
    """A table the job holds: itself (no Ray), or fetched from Ray's object store (an ObjectRef)."""
    import pyarrow as pa

    if isinstance(value, pa.Table):
        return value
    import ray

    return ray.get(value)


class RayTrainRuntime:
    """The recipe on a Ray Train worker: rank, device, checkpoints and reports through ``ray.train``;
    micro-batches from a Ray Data actor pool."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = ray.get_runtime_context().get_node_id()

    def checkpoint(self) -> Any:
        """Ray's latest checkpoint of this run (after a worker restart), else None."""
        import ray.train

        return ray.train.get_checkpoint()

    def microbatches(self, job: TrainJob, first: int):
        if job.cfg.data.decode_actors == 0:  # built in this worker, in plan order (no actor pool)
            return in_process_batches(job, self.rank, self.world, first)
        dataset = rank_dataset(
            resolve(job.records),
            resolve(job.planned),
            self.rank,
            self.world,
            first,
            job.settings,
            actors=job.cfg.data.decode_actors,
            cpus_per_actor=job.cfg.data.decode_cpus,
            max_packed_tokens=job.cfg.data.max_packed_tokens,
        )
        return iter_rank_batches(dataset, first, self.world)

    def report(self, job: TrainJob, metrics: dict[str, Any], directory: str, validate: bool) -> None:
        """Rank 0's train_state.json, then every rank's files to Ray Train's checkpoint; ``validate``:
        Ray Train's asynchronous validation scores it. Ray keeps the ``train.num_to_keep`` best by
        :data:`SCORE` (the val CIDEr; UNSCORED until validated) and always the latest."""
        import ray.train

        if self.rank == 0:
            Path(directory, "train_state.json").write_text(json.dumps(metrics))
        ray.train.report(
            reported_metrics(metrics),
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            validation=validate,
        )

    def checkpoint_dir(self, job: TrainJob, step: int) -> Any:
        return tempfile.TemporaryDirectory(prefix="raylora-ckpt-")


class LocalRuntime:
    """The recipe without Ray: one process of ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)
    or one plain process. Every rank builds its micro-batches in-process; checkpoints are written
    straight into the run folder, complete once rank 0's ``train_state.json`` is there."""

    def __init__(self, use_gpu: bool) -> None:
        import socket

        import torch

        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("cluster.use_gpu=true but torch sees no CUDA GPU here")
        if use_gpu:
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.node = socket.gethostname()

    def checkpoint(self) -> Any:
        return None  # a rerun resumes from the run folder (TrainJob.resume_from)

    def microbatches(self, job: TrainJob, first: int):
        return in_process_batches(job, self.rank, self.world, first)

    def checkpoint_dir(self, job: TrainJob, step: int) -> Any:
        path = Path(job.run_dir) / f"checkpoint_step_{step:07d}"
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # a half-written one from a crashed run
        barrier()
        path.mkdir(parents=True, exist_ok=True)
        return nullcontext(str(path))

    def report(self, job: TrainJob, metrics: dict[str, Any], directory: str, validate: bool) -> None:
        """Once every rank's shard is written, rank 0's train_state.json completes the checkpoint
        (:func:`raylora.runs.latest_checkpoint` judges by it); then the ``train.num_to_keep`` best by
        val CIDEr and the latest stay (validation is inline here: ``validate`` is never set)."""
        barrier()
        if self.rank != 0:
            return
        Path(directory, "train_state.json").write_text(json.dumps(metrics))
        runs.prune(job.run_dir, self.world, job.cfg.train.num_to_keep)


def in_process_batches(job: TrainJob, rank: int, world: int, first: int):
    """A rank's micro-batches built in this process (no Ray Data actor pool), in plan order."""
    return iter_local_batches(
        resolve(job.records),
        resolve(job.planned),
        rank,
        world,
        first,
        job.settings,
        job.cfg.data.max_packed_tokens,
    )


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


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
    with checkpoint_directory(checkpoint) as d:
        return json.loads(Path(d, "train_state.json").read_text())


def checkpoint_directory(checkpoint: Any) -> Any:
    """A context giving a local directory of a checkpoint: a Ray Train ``Checkpoint``, a URI or a
    local path (a local one as it is, without Ray)."""
    if isinstance(checkpoint, str) and not is_remote(checkpoint):
        return nullcontext(checkpoint)
    if isinstance(checkpoint, str):
        import ray.train

        checkpoint = ray.train.Checkpoint(checkpoint)
    return checkpoint.as_directory()


class LoRAFinetuneRecipe:
    """One worker's share of a LoRA fine-tuning run, in the shape of a torchtune recipe: a Ray Train
    worker's (:class:`RayTrainRuntime`) or a torchrun process's (:class:`LocalRuntime`)."""

    load_model = staticmethod(load_base_model)  # (model_dir, dtype, attn) -> model; the GPU check's
    # random-weights model replaces it

    def __init__(self, job: TrainJob, runtime: RayTrainRuntime | LocalRuntime | None = None):
        self.runtime = runtime or RayTrainRuntime()
        self.job, self.cfg, self.plan = job, job.cfg, job.plan
        self.rank, self.world = self.runtime.rank, self.runtime.world
        self.is_rank0 = self.rank == 0
        self.device = self.runtime.device
        self.audit = None  # train.device_audit: the DeviceAudit the recipe runs under
        self.step = 0
        self.progress = job.progress if self.is_rank0 else None
        self.last_tick = 0.0
        self.logger = (
            tracking.MetricLogger(job.tracking_uri, job.mlflow_run_id)
            if self.is_rank0 and job.mlflow_run_id and job.tracking_uri
            else None
        )
        ray_run = isinstance(self.runtime, RayTrainRuntime)
        self.ray_metrics = TrainMetrics(job.run_name) if self.is_rank0 and ray_run else None  # Prometheus
        # validation by the training ranks at the step: eval.validation=inline, and always without Ray
        # (asynchronous validation is Ray Train's); rank 0 publishes the score
        self.inline_validation = job.cfg.eval.validation == "inline" or not ray_run
        self.scored = scored(job, run_name=job.run_name if ray_run else None) if self.is_rank0 else None

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
        self.print(f"[train] {attention_line(attn)}" + (f" ({notice})" if notice else ""))
        model = self.load_model(self.job.model_dir, self.dtype, attn)
        self.family = self.job.settings.family
        model = apply_lora(model, cfg, self.family)
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
        with console.library_prints():
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(cfg, self.plan.grad_accum, self.world, self.dtype == torch.bfloat16),
        )
        if self.audit is not None:
            self.audit.watch_engine(self.engine)
        self.synced = t.zero_stage == 3 and self.world > 1  # ZeRO-3 generation needs every rank

    def restore(self) -> None:
        """Load the newest checkpoint: Ray's (a worker restart within the run) or the driver's (a rerun)."""
        checkpoint = self.runtime.checkpoint()
        if self.job.resume_from and checkpoint_state(checkpoint).get("step", -1) < self.job.start_step:
            checkpoint = self.job.resume_from  # on storage, not yet known to Ray
        if checkpoint is None:
            return
        with checkpoint_directory(checkpoint) as d:
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
        first = self.step * self.plan.microbatches_per_step + self.rank
        stream = self.runtime.microbatches(self.job, first)
        if self.audit is not None:
            stream = self.audit.batches(stream)
        return (
            self.traced(stream) if self.cfg.train.trace_data and not is_remote(self.job.run_dir) else stream
        )

    def traced(self, stream):
        """``train.trace_data``: every micro-batch's index, step, rank, node and record indices, appended
        to ``<run dir>/data_trace/rank<r>.jsonl`` as it is consumed (restarts append their replay)."""
        node = self.runtime.node
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
        window = StepWindow()
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
            validate = self.job.validation is not None and (
                done or (cfg.eval.every_n_steps > 0 and self.step % cfg.eval.every_n_steps == 0)
            )
            scores = self.evaluate() if validate and self.inline_validation else {}
            if validate or done or self.step % cfg.train.checkpoint_every_n_steps == 0:
                loss = window.mean_loss() if window.labels else self.last_loss
                state = {"step": self.step, "total_steps": total, "loss": loss, **scores}
                self.save_checkpoint(state, validate=validate and not self.inline_validation)
                if scores and self.scored is not None:  # after its checkpoint: early stopping reads it
                    self.scored.publish(self.step, scores, eval_line(self.step, scores, self.decoding))
                if not done and self.stopped_early():
                    self.print(f"[train] early stop at step {self.step}: {self.early_stop_text()}")
                    return
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
        loss_sum, tokens = forward_loss(self.engine, batch, self.dtype, self.text_attention, self.family)
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
        """Inline validation: caption the fixed validation subset with the live model (sharded over
        ranks) and score it with fast CIDEr."""
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
        captions: dict[int, str] = {}
        for part in gathered:
            for image_id, caption in part:
                captions.setdefault(image_id, caption)
        self.decoding = gen.decoding
        return score_captions(val, captions)

    def stopped_early(self) -> bool:
        """``train.early_stop_patience``: whether the run's scores plateaued (rank 0 reads the run
        folder's record, every rank gets the answer)."""
        import torch
        import torch.distributed as dist

        if self.cfg.train.early_stop_patience <= 0:
            return False
        found = self.is_rank0 and runs.early_stop(self.job.run_dir) is not None
        flag = torch.tensor([1.0 if found else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def early_stop_text(self) -> str:
        stop = runs.early_stop(self.job.run_dir) or {}
        return (
            f"no better val CIDEr in {stop.get('patience')} evaluations after step {stop.get('best_step')} "
            f"({stop.get('best_val_cider', float('nan')):.3f})"
        )

    def save_checkpoint(self, metrics: dict[str, Any], validate: bool = False) -> None:
        """DeepSpeed state (all ranks), the PEFT adapter (for the original base, whatever
        ``lora.init``) and train_state.json, reported to Ray Train (``validate``: for its
        asynchronous validation)."""
        with self.runtime.checkpoint_dir(self.job, self.step) as d:
            self.engine.save_checkpoint(os.path.join(d, "ds"), tag="ds", exclude_frozen_parameters=True)
            state = lora_state_dict(self.engine.module)  # collective under ZeRO-3
            if self.is_rank0:
                save_adapter(self.engine.module, Path(d) / "adapter", state, self.lora_init)
            self.runtime.report(self.job, metrics, d, validate)

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


def scored(job: TrainJob, run_name: str | None = None) -> Scored:
    """Where a validation score of ``job`` goes (MLflow, the Ray gauge of ``run_name``, the console,
    a sweep trial's score channel) and its early stop rule."""
    return Scored(
        run_dir=job.run_dir,
        total_steps=job.plan.total_steps,
        early_stop_patience=job.cfg.train.early_stop_patience,
        tracking_uri=job.tracking_uri,
        mlflow_run_id=job.mlflow_run_id,
        run_name=run_name,
        progress=job.progress,
        scores=job.scores,
        echo=job.progress is None and job.scores is None,
    )


def validates_async(cfg: Config, validation: ValidationSet | None) -> bool:
    return validation is not None and cfg.eval.validation == "async"


def async_validation(job: TrainJob, validator: Any = None) -> Any:
    """A context giving the ValidationConfig of a job whose validation is asynchronous (its
    validator actor, ``validator`` if started already, runs while the context is open), else None."""
    if not validates_async(job.cfg, job.validation):
        return nullcontext(None)
    return validation_actor(job.validation, job.model_dir, job.cfg, scored(job, job.run_name), validator)


def train_func(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the recipe from the driver's job and run it."""
    run_recipe(config["job"])


def run_recipe(job: TrainJob, runtime: RayTrainRuntime | LocalRuntime | None = None) -> None:
    """Set up, restore and train; under the device audit when ``train.device_audit`` is on."""
    recipe = LoRAFinetuneRecipe(job, runtime)
    if not job.cfg.train.device_audit:
        recipe.setup()
        recipe.restore()
        recipe.train()
        return
    from raylora.device_audit import device_audit

    with device_audit(recipe.device) as audit:
        recipe.audit = audit
        recipe.setup()
        recipe.restore()
        recipe.train()
    recipe.print(
        f"[train] device audit: {audit.checked} tensors handed to collectives, DeepSpeed and the model, "
        f"all made on or moved to {recipe.device.type}"
    )


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

    output_dir = Path(output_dir or cfg.output_dir)
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
    needed = tree_size(checkpoint_dir / "adapter") + (1 << 20)  # + tokenizer/processor files, config
    with writes_to(output_dir, needed):  # a full disk: one line, the old adapter kept whole
        with atomic_dir(output_dir / "adapter", overwrite=True) as adapter:
            shutil.copytree(checkpoint_dir / "adapter", adapter, dirs_exist_ok=True)
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
        state = json.loads(Path(d, "train_state.json").read_text())
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
    tracking.log_artifacts(run_id, output_dir / "adapter", "adapter", uri)
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


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python -m raylora.train", __doc__, "train.lr=1e-4 lora.rank=16")
    parser.add_argument("--output", help="output directory (default: the config's output_dir)")
    parser.add_argument(
        "--no-ray",
        action="store_true",
        help="run the recipe in this process without Ray (one rank; under torchrun this is automatic)",
    )
    args = parser.parse_args(argv)

    def body() -> dict[str, Any] | None:
        cfg = config_from_args(args)
        if args.no_ray or launched_by_torchrun():
            return run_local(cfg, args.output)
        return run(cfg, args.output)  # logs errors under the output folder once run has made it

    return run_command(body, command="train", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
