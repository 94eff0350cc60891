"""The LoRA fine-tuning recipe: what every training worker runs (Ray Train V2 + DeepSpeed ZeRO + PEFT
LoRA), in the shape of a torchtune recipe.

Read top to bottom: the :class:`TrainJob` the driver hands every worker, the two runtimes (a Ray Train
worker's, :class:`RayTrainRuntime`; a ``torchrun`` or plain process's, :class:`LocalRuntime`), then
:class:`LoRAFinetuneRecipe` (``setup``, ``restore``, ``train``, ``evaluate``, ``save_checkpoint``);
``train_func`` builds and runs it on a Ray Train worker. The driver side (planning, the data check,
MLflow, fitting the trainer, the outputs) is :mod:`raylora.driver`; the command is :mod:`raylora.train`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylora import console, runs, tracking
from raylora.config import Config
from raylora.console import send, step_line
from raylora.data.pipeline import iter_local_batches, iter_rank_batches, rank_dataset
from raylora.data.plan import BatchPlan
from raylora.data.settings import ImageSettings
from raylora.files import is_remote, join_uri, read_text, redact, write_text
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
from raylora.monitoring import TrainMetrics
from raylora.validation import (
    Scored,
    ValidationSet,
    eval_line,
    reported_metrics,
    score_captions,
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
            runs.write_state(directory, metrics)
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
        runs.write_state(directory, metrics)
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
        return runs.read_state(d)


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
                runs.deepspeed_dir(d),
                tag=runs.DEEPSPEED,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            self.step = runs.read_state(d)["step"]
        self.print(f"[train] resumed from the checkpoint at step {self.step}/{self.plan.total_steps}")

    def batches(self):
        """This rank's micro-batches from the restored step on, in plan order, as torch tensors."""
        first = self.step * self.plan.microbatches_per_step + self.rank
        stream = self.runtime.microbatches(self.job, first)
        if self.audit is not None:
            stream = self.audit.batches(stream)
        return self.traced(stream) if self.cfg.train.trace_data else stream

    def traced(self, stream):
        """``train.trace_data``: every micro-batch's index, step, rank, node and record indices, appended
        to ``<run dir>/data_trace/rank<r>.jsonl`` as it is consumed (restarts append their replay). An
        object store cannot append: in a remote run folder each attempt of a rank writes its own
        ``rank<r>.<attempt>.jsonl``, rewritten as it grows (every line while it is short, then at most
        every 5 s) and when the stream ends."""
        node = self.runtime.node
        if is_remote(self.job.run_dir):
            yield from self.traced_remote(stream, node)
            return
        path = Path(self.job.run_dir) / "data_trace" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for batch in stream:
                f.write(self.trace_line(batch, node))
                f.flush()
                yield batch

    def traced_remote(self, stream, node: str):
        uri = join_uri(self.job.run_dir, "data_trace", f"rank{self.rank}.{uuid.uuid4().hex[:8]}.jsonl")
        lines: list[str] = []
        written = time.monotonic()
        try:
            for batch in stream:
                lines.append(self.trace_line(batch, node))
                if len(lines) < 2000 or time.monotonic() - written > 5:
                    write_text(uri, "".join(lines))
                    written = time.monotonic()
                yield batch
        finally:
            write_text(uri, "".join(lines))

    def trace_line(self, batch: dict[str, Any], node: str) -> str:
        index = int(batch["index"])
        step = index // self.plan.microbatches_per_step + 1
        records = batch["record_index"].tolist()
        return (
            json.dumps({"index": index, "step": step, "rank": self.rank, "node": node, "records": records})
            + "\n"
        )

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
            self.engine.save_checkpoint(
                runs.deepspeed_dir(d), tag=runs.DEEPSPEED, exclude_frozen_parameters=True
            )
            state = lora_state_dict(self.engine.module)  # collective under ZeRO-3
            if self.is_rank0:
                save_adapter(self.engine.module, runs.adapter_dir(d), state, self.lora_init)
            self.runtime.report(self.job, metrics, d, validate)

    def claim_run(self) -> None:
        """Rank 0 records the run's identity in its folder once a step has run: a run exists from
        its first step on, so a refused or crashed-at-start run never claims its name."""
        if self.is_rank0 and not getattr(self, "claimed", False) and self.job.identity is not None:
            runs.claim(self.job.run_dir, self.job.identity)
            self.claimed = True

    def fault_drill(self) -> None:
        """RAYLORA_FAIL_AT_STEP: the last rank crashes once at that step (FailureConfig restarts it)."""
        if self.job.fail_at_step != self.step or self.rank != self.world - 1:
            return
        marker = join_uri(self.job.run_dir, "injected_failure")
        if read_text(marker) is None:
            write_text(marker, str(self.step))
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
