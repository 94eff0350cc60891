"""The LoRA fine-tuning recipe: Ray Train (V2) + DeepSpeed ZeRO + PEFT LoRA, tracked in MLflow.

    python -m raylora.train                                 # the recipe if pretrained/ and data/ exist, else the demo
    python -m raylora.train --config internvl2_2b_coco train.lr=2e-5 cluster.num_workers=16
    python -m raylora.train --config demo --output outputs/demo lora.rank=8

``train_func`` runs on every worker (model, LoRA, DeepSpeed engine, the loop, checkpoints); the
rest runs on the driver (config, data validation, the micro-batch plan, MLflow run, outputs).
Running the same command again with the same ``cluster.run_name`` resumes from the latest
checkpoint; ``cluster.max_failures`` restarts crashed workers from it within a run.
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

from raylora.config import (
    DEMO,
    Config,
    ConfigError,
    config_from_args,
    config_from_dict,
    config_parser,
    save_config,
)

DEEPSPEED_CONFIGS = Path(__file__).parent / "deepspeed_configs"


# ============================================================================ on every worker


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


def lora_state_dict(module: Any) -> dict[str, Any]:
    """Full (gathered) trainable tensors on every rank; with ZeRO-3 a collective call."""
    import deepspeed

    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in params}


def save_adapter(module: Any, out: Path, is_rank0: bool) -> None:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors), gathered under ZeRO-3."""
    state = lora_state_dict(module)
    if is_rank0:
        module.save_pretrained(out, state_dict=state, safe_serialization=True)


def evaluate_cider(
    module: Any, cfg: Config, ctx: dict[str, Any], rank: int, world: int, synced: bool
) -> dict[str, float]:
    """Caption the fixed validation subset (sharded over ranks) and score it with fast CIDEr."""
    import torch.distributed as dist

    from raylora.generation import GenerationSettings, generate_captions
    from raylora.metrics import cider

    items = ctx["val_items"]
    per_rank = math.ceil(len(items) / world)
    mine = items[rank * per_rank : (rank + 1) * per_rank]
    if synced:  # ZeRO-3: every rank must run the same number of forward passes
        mine = mine + [items[-1]] * (per_rank - len(mine))
    gen = GenerationSettings(
        cfg.eval.prompt, cfg.eval.min_new_tokens, cfg.eval.max_new_tokens, cfg.eval.batch_size
    )
    caps = generate_captions(
        module, ctx["eval_tok"], ctx["eval_settings"], [it["image"] for it in mine], gen, synced
    )
    pairs = [(it["image_id"], c) for it, c in zip(mine, caps)]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, pairs)
    res = {}
    for part in gathered:
        for image_id, cap in part:
            res.setdefault(image_id, cap)
    score = cider(ctx["val_gts"], {k: [v] for k, v in res.items()})
    return {"val_cider": float(score), "val_images": len(res)}


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, restore, loop, evaluate, checkpoint."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import get_cosine_schedule_with_warmup

    from raylora.data.pipeline import unpack
    from raylora.data.tiling import normalize
    from raylora.model import apply_lora, attn_implementation, count_trainable, load_base_model, torch_dtype

    cfg = config_from_dict(config["cfg"])
    plan = config["plan"]
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    is_rank0 = rank == 0
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    dtype = torch_dtype(cfg.model.dtype, device.type)

    model = load_base_model(
        config["model_dir"], dtype, attn_implementation(cfg.model.attn_implementation, device.type)
    )
    model = apply_lora(model, cfg, config["family"])
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    trainable, total = count_trainable(model)
    if is_rank0:
        print(
            f"[train] trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
            flush=True,
        )

    params = [p for p in model.parameters() if p.requires_grad]
    adamw = dict(
        lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=cfg.train.adam_eps,
        weight_decay=cfg.train.weight_decay,
    )
    if cfg.train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **adamw)
    else:
        optimizer = torch.optim.AdamW(params, **adamw)
    total_steps = plan["total_steps"]
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(total_steps * cfg.train.warmup_ratio), total_steps
    )
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, plan["grad_accum"], world, dtype == torch.bfloat16),
    )
    synced = cfg.train.zero_stage == 3 and world > 1

    step = 0
    restored = ray.train.get_checkpoint()
    if plan["resume_from"] and _checkpoint_step(restored) < plan["dataset_start_step"]:
        restored = ray.train.Checkpoint(plan["resume_from"])  # found on disk, not yet registered by Ray
    if restored is not None:
        with restored.as_directory() as d:
            engine.load_checkpoint(
                os.path.join(d, "ds"),
                tag="ds",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            step = json.loads(Path(d, "train_state.json").read_text())["step"]
        if is_rank0:
            print(f"[train] resumed from the checkpoint at step {step}/{total_steps}", flush=True)
    if step < plan["dataset_start_step"]:
        raise RuntimeError(
            f"checkpoint step {step} is behind the planned data start {plan['dataset_start_step']}"
        )
    skip = (step - plan["dataset_start_step"]) * plan["grad_accum"]  # a worker restart within the run
    if restored is not None and step >= total_steps:
        # cut after its last checkpoint (e.g. a sweep driver killed before Tune saw the end):
        # report that checkpoint's metrics again so the run ends with them
        with restored.as_directory() as d:
            final = json.loads(Path(d, "train_state.json").read_text())
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(d))
        return

    eval_ctx = None
    if cfg.eval.every_n_steps >= 0 and config.get("val_items"):
        from raylora.data.pipeline import ImageSettings

        eval_settings = ImageSettings(**config["eval_settings"])
        eval_ctx = {
            "val_items": config["val_items"],
            "val_gts": {int(k): v for k, v in config["val_gts"].items()},
            "eval_settings": eval_settings,
            "eval_tok": eval_settings.conversation_tokenizer(),
        }

    client = None
    if is_rank0 and config.get("mlflow_run_id"):
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(config["tracking_uri"])
        client = MlflowClient()

    def log(metrics: dict[str, float], at: int) -> None:
        if client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(
                config["mlflow_run_id"], metrics=[Metric(k, float(v), now, at) for k, v in metrics.items()]
            )

    def checkpoint_and_report(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory(prefix="raylora-ckpt-") as d:
            engine.save_checkpoint(os.path.join(d, "ds"), tag="ds", exclude_frozen_parameters=True)
            save_adapter(engine.module, Path(d) / "adapter", is_rank0)
            if is_rank0:
                Path(d, "train_state.json").write_text(json.dumps({"step": step, **metrics}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    shard = ray.train.get_dataset_shard("train")
    engine.train()
    window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.time()}
    start_time, start_step = time.time(), step
    last_eval: dict[str, float] = {}
    micro = 0
    for row in shard.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2):
        if skip > 0:
            skip -= 1
            continue
        if step >= total_steps:
            break
        batch = unpack(row["payload"][0])
        out = engine(
            input_ids=torch.from_numpy(batch["input_ids"]).to(device),
            attention_mask=torch.from_numpy(batch["attention_mask"]).to(device),
            labels=torch.from_numpy(batch["labels"]).to(device),
            pixel_values=normalize(torch.from_numpy(batch["pixel_values"]).to(device), dtype),
        )
        engine.backward(out.loss)
        engine.step()
        micro += 1
        window["loss"] += out.loss.item()
        window["n"] += 1
        window["samples"] += len(batch["num_tiles"])
        window["tokens"] += int(batch["attention_mask"].sum())
        if micro % plan["grad_accum"]:
            continue
        step += 1
        if config.get("fail_at_step") == step and rank == world - 1:
            _inject_failure(Path(config["fail_marker"]), step)
        done = step >= total_steps
        if step % cfg.train.log_every_n_steps == 0 or done:
            stats = torch.tensor(
                [window["loss"], window["n"], window["samples"], window["tokens"]], dtype=torch.float64
            )
            dist.all_reduce(stats)
            elapsed = max(time.time() - window["t"], 1e-9)
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "loss": stats[0].item() / max(stats[1].item(), 1),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": stats[2].item() / elapsed,
                "tokens_per_s": stats[3].item() / elapsed,
                "epoch": step / plan["steps_per_epoch"],
            }
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            log(metrics, step)
            if is_rank0:
                rate = (step - start_step) / max(time.time() - start_time, 1e-9)
                eta = (total_steps - step) / rate if rate > 0 else float("inf")
                print(
                    f"[train] step {step}/{total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                    f"{metrics['samples_per_s']:.1f} samples/s {metrics['tokens_per_s']:.0f} tok/s ETA {eta:.0f}s",
                    flush=True,
                )
            window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.time()}
            last_loss = metrics["loss"]
        else:
            last_loss = window["loss"] / max(window["n"], 1)
        do_eval = eval_ctx is not None and (
            done or (cfg.eval.every_n_steps > 0 and step % cfg.eval.every_n_steps == 0)
        )
        do_ckpt = done or step % cfg.train.checkpoint_every_n_steps == 0
        if do_eval:
            last_eval = evaluate_cider(engine.module, cfg, eval_ctx, rank, world, synced)
            log(last_eval, step)
            if is_rank0:
                print(
                    f"[eval] step {step}: val CIDEr {last_eval['val_cider']:.3f} on {last_eval['val_images']} images",
                    flush=True,
                )
        if do_eval or do_ckpt:
            checkpoint_and_report({"step": step, "total_steps": total_steps, "loss": last_loss, **last_eval})
        if done:
            break
    if step < total_steps:
        raise RuntimeError(
            f"rank {rank}: the data stream ended at step {step} of {total_steps}; the plan and the dataset disagree"
        )


def _checkpoint_step(checkpoint: Any) -> int:
    if checkpoint is None:
        return -1
    with checkpoint.as_directory() as d:
        return int(json.loads(Path(d, "train_state.json").read_text())["step"])


def _inject_failure(marker: Path, step: int) -> None:
    """Fault drill (RAYLORA_FAIL_AT_STEP): crash this worker once, to exercise FailureConfig restarts."""
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        raise RuntimeError(f"RAYLORA_FAIL_AT_STEP: simulated worker crash at step {step}")


# ================================================================================== on the driver


@dataclass
class Job:
    """What the driver resolved before launching workers."""

    cfg: Config
    model_dir: Path
    prepared: Any
    plan: Any
    run_dir: str


def resolve_paths(cfg: Config, log: Any = print) -> Path:
    """Expand ``demo`` data paths, check that explicit paths exist; returns the model dir."""
    from raylora.demo import demo_data_paths
    from raylora.model import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model.path, log)
    if cfg.data.train == DEMO:
        for key, value in demo_data_paths().items():
            setattr(cfg.data, key, str(value))
    for key in ("train", "val", "val_gt"):
        value = getattr(cfg.data, key)
        if value and not Path(value).exists():
            raise FileNotFoundError(f"data.{key} = {value!r} does not exist")
    return model_dir


def latest_checkpoint(run_dir: str, world_size: int) -> tuple[int, str | None]:
    """(step, uri) of the newest *complete* checkpoint under ``run_dir`` (local path or URI).

    Complete means rank 0's train_state.json plus every rank's DeepSpeed shard, so a checkpoint
    cut by a crash mid-upload, or one Ray had not registered yet when the driver died, is judged
    by its files rather than by Ray's bookkeeping.
    """
    import pyarrow.fs as pafs

    uri = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    try:
        fs, base = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
    except (OSError, ValueError):
        return 0, None
    best: tuple[int, str | None] = (0, None)
    for info in infos:
        if info.type != pafs.FileType.Directory or not Path(info.path).name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/train_state.json") as f:
                step = int(json.loads(f.read())["step"])
            files = [
                i.base_name
                for i in fs.get_file_info(pafs.FileSelector(f"{info.path}/ds/ds", allow_not_found=True))
            ]
        except (OSError, KeyError, ValueError):
            continue
        shards = [n for n in files if n.endswith("optim_states.pt")]
        if len(shards) < world_size and "mp_rank_00_model_states.pt" not in files:
            continue
        if step > best[0]:
            where = info.path if "://" not in run_dir else f"{uri.split('://')[0]}://{info.path}"
            best = (step, where)
    return best


def ray_runtime_env() -> dict[str, Any]:
    """Environment for every Ray process: a persistent DeepSpeed op cache, quiet tokenizers."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 would tee every worker print through its logger (shown twice)
    env = {
        "TORCH_EXTENSIONS_DIR": extensions,
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    for key in ("RAYLORA_CACHE", "MLFLOW_TRACKING_URI", "HF_HOME"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return {"env_vars": env}


def init_ray(cfg: Config) -> None:
    """Connect to ``cluster.address`` / RAY_ADDRESS, or start a local cluster; print the dashboard URL."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": ray_runtime_env(), "log_to_driver": True}
    if address is None:
        kwargs.update(
            num_cpus=cfg.cluster.num_cpus,
            object_store_memory=cfg.cluster.object_store_memory,
            include_dashboard=True,
        )
    ctx = ray.init(address=address, **kwargs)
    url = getattr(ctx, "dashboard_url", None)
    print(
        f"[ray] cluster {'at ' + address if address else 'started locally'}; dashboard: http://{url}"
        if url
        else "[ray] connected",
        flush=True,
    )


def prepare_job(cfg: Config, output_dir: Path, log: Any = print) -> Job:
    """Resolve model and data, validate every row (rejects to <output>/rejects.jsonl), plan batches."""
    from raylora.data.pipeline import make_plan, prepare
    from raylora.model import image_settings

    model_dir = resolve_paths(cfg, log)
    settings = image_settings(cfg, model_dir)
    t0 = time.time()
    prepared = prepare(
        cfg.data.train,
        cfg.data.root,
        settings,
        strict=cfg.data.strict,
        seed=cfg.data.shuffle_seed,
        progress=True,
    )
    rejects_path = Path(cfg.data.rejects or output_dir / "rejects.jsonl")
    prepared.write_rejects(rejects_path)
    stats = prepared.stats()
    log(
        f"[data] {stats['rows_ok']} rows ok, {stats['rows_rejected']} rejected {stats['rejects'] or ''} "
        f"(rejects: {rejects_path}); tokens p50 {stats['tokens']['p50']} p95 {stats['tokens']['p95']} "
        f"max {stats['tokens']['max']} ({time.time() - t0:.1f}s)"
    )
    plan = make_plan(
        prepared.rows_ok,
        cfg.train.global_batch_size,
        cfg.train.per_device_batch_size,
        cfg.cluster.num_workers,
        cfg.train.epochs,
        cfg.train.max_steps,
    )
    run_dir = f"{cfg.cluster.storage_path.rstrip('/')}/{cfg.cluster.run_name or cfg.name}"
    return Job(cfg, model_dir, prepared, plan, run_dir)


def val_payload(cfg: Config, model_dir: Path) -> dict[str, Any]:
    """The fixed validation subset (first data.val_size images) and its references for workers."""
    from dataclasses import asdict

    from raylora.data.records import read_gt, read_karpathy
    from raylora.model import image_settings

    if not cfg.data.val or cfg.eval.every_n_steps < 0:
        return {}
    items = read_karpathy(cfg.data.val, cfg.data.val_root, limit=cfg.data.val_size)
    gts = read_gt(cfg.data.val_gt, [i.image_id for i in items])
    missing = [i.image_id for i in items if i.image_id not in gts]
    if missing:
        raise ValueError(f"{cfg.data.val_gt}: no reference captions for image ids {missing[:5]}")
    settings = image_settings(cfg, model_dir, max_num=cfg.eval.max_num)
    return {
        "val_items": [{"image_id": i.image_id, "image": i.image} for i in items],
        "val_gts": {str(k): v for k, v in gts.items()},
        "eval_settings": asdict(settings),
    }


def build_trainer(
    job: Job,
    run_id: str | None,
    tracking_uri: str | None,
    callbacks: list[Any] | None = None,
):
    """The TorchTrainer of a job: dataset from the resume point, scaling, checkpoints, failures."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylora.data.pipeline import plan_microbatches, train_dataset
    from raylora.model import image_settings, model_info

    cfg, plan = job.cfg, job.plan
    start, resume_from = latest_checkpoint(job.run_dir, cfg.cluster.num_workers)
    if start >= plan.total_steps:
        start = plan.total_steps  # finished already: the workers only restore and report
    planned = plan_microbatches(
        job.prepared.table, plan, cfg.train.seed, cfg.train.group_by_length, start_step=start
    )
    dataset = train_dataset(
        job.prepared.table,
        planned,
        image_settings(cfg, job.model_dir),
        actors=cfg.data.decode_actors,
        cpus_per_actor=cfg.data.decode_cpus,
    )
    loop_config = {
        "cfg": cfg.to_dict(),
        "model_dir": str(job.model_dir),
        "family": model_info(job.model_dir)["family"],
        "plan": {
            "total_steps": plan.total_steps,
            "grad_accum": plan.grad_accum,
            "steps_per_epoch": plan.steps_per_epoch,
            "dataset_start_step": start,
            "resume_from": resume_from,
        },
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
        "fail_at_step": int(os.environ["RAYLORA_FAIL_AT_STEP"])
        if os.environ.get("RAYLORA_FAIL_AT_STEP")
        else None,
        "fail_marker": os.path.abspath(os.path.join(job.run_dir, "injected_failure"))
        if "://" not in job.run_dir
        else "",
        **val_payload(cfg, job.model_dir),
    }
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    storage, run_name = job.run_dir.rstrip("/").rsplit("/", 1)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage if "://" in storage else os.path.abspath(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
    )
    return trainer, start


def mlflow_run(job: Job, output_dir: Path) -> tuple[str, str, str]:
    """(tracking uri, experiment id, run id): a new run, or the one this run dir started before."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from raylora import tracking

    uri, exp_id = tracking.setup(job.cfg)
    marker = Path(job.run_dir) / "mlflow_run_id" if "://" not in job.run_dir else None
    client = MlflowClient()
    if marker is not None and marker.is_file():
        run_id = marker.read_text().strip()
        try:
            client.get_run(run_id)
            client.set_terminated(run_id, "RUNNING")
            return uri, exp_id, run_id
        except mlflow.exceptions.MlflowException:
            pass
    run = client.create_run(
        exp_id,
        run_name=Path(job.run_dir).name,
        tags={
            "base_model": job.cfg.model.path,
            "dataset": job.cfg.tracking.dataset,
            "train_annotation": job.cfg.data.train,
            "git_commit": tracking.git_commit(),
            "config_hash": job.cfg.fingerprint(),
            "run_dir": job.run_dir,
        },
    )
    with mlflow.start_run(run_id=run.info.run_id):
        tracking.log_params(job.cfg)
        mlflow.log_param("trainable.grad_accum", job.plan.grad_accum)
        mlflow.log_param("trainable.total_steps", job.plan.total_steps)
    client.set_terminated(run.info.run_id, "RUNNING")
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(run.info.run_id)
    return uri, exp_id, run.info.run_id


def complete_adapter_dir(adapter: Path, model_dir: Path, template: str, system_message: str | None) -> None:
    """Add to a saved PEFT adapter dir what loading it needs: the base's tokenizer and processor
    files, and raylora.json (template, system message, base model dir)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter)
    for name in ("preprocessor_config.json", "processor_config.json", "raylora.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, adapter / name)
    (adapter / "raylora.json").write_text(
        json.dumps(
            {"template": template, "system_message": system_message, "base_model": str(model_dir)},
            indent=2,
            ensure_ascii=False,
        )
    )


def write_outputs(job: Job, checkpoint_dir: Path, output_dir: Path, summary: dict[str, Any]) -> None:
    """<output>/adapter (PEFT + tokenizer + processor files), config.yaml, metrics.json."""
    adapter = output_dir / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    shutil.copytree(checkpoint_dir / "adapter", adapter)
    complete_adapter_dir(adapter, job.model_dir, job.cfg.model.template, job.cfg.model.system_message)
    save_config(job.cfg, output_dir / "config.yaml")
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))


def run(cfg: Config, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one job end to end; returns the summary written to metrics.json."""
    import ray.train
    from mlflow.tracking import MlflowClient

    from raylora import tracking

    output_dir = Path(output_dir or cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tracking.check_tracking(tracking.tracking_uri(cfg))  # before any heavy work
    resolve_paths(cfg)  # missing model or data: an error before the cluster starts
    init_ray(cfg)
    job = prepare_job(cfg, output_dir)
    uri, exp_id, run_id = mlflow_run(job, output_dir)
    print(f"[mlflow] {tracking.run_url(uri, exp_id, run_id)}", flush=True)
    plan = job.plan
    done_step, done_path = latest_checkpoint(job.run_dir, cfg.cluster.num_workers)
    if done_step >= plan.total_steps and done_path is not None:
        print(f"[train] {job.run_dir} already finished ({done_step} steps); writing its outputs", flush=True)
        return finish(
            job,
            ray.train.Checkpoint(done_path),
            output_dir,
            run_id,
            uri,
            exp_id,
            start=done_step,
            seconds=0.0,
        )
    trainer, start = build_trainer(job, run_id, uri)
    print(
        f"[train] {plan.total_steps} optimizer steps of {cfg.train.global_batch_size} samples "
        f"({cfg.cluster.num_workers} workers x {cfg.train.per_device_batch_size} x {plan.grad_accum} accumulation)"
        + (f", resuming at step {start}" if start else ""),
        flush=True,
    )
    t0 = time.time()
    client = MlflowClient()
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"training ended without a checkpoint; see the logs under {job.run_dir}")
    return finish(job, result.checkpoint, output_dir, run_id, uri, exp_id, start, time.time() - t0)


def finish(
    job: Job,
    checkpoint: Any,
    output_dir: Path,
    run_id: str,
    uri: str,
    exp_id: str,
    start: int,
    seconds: float,
) -> dict[str, Any]:
    """Outputs from the final checkpoint, artifacts to MLflow, the summary line."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from raylora import tracking

    cfg = job.cfg
    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, "train_state.json").read_text())
        steps_run = state["step"] - start
        summary = {
            "final_loss": state.get("loss"),
            "steps": state["step"],
            "steps_this_run": steps_run,
            "samples": state["step"] * cfg.train.global_batch_size,
            "samples_per_s": steps_run * cfg.train.global_batch_size / seconds if steps_run else 0.0,
            "seconds": round(seconds, 1),
            "val_cider": state.get("val_cider"),
            "rows_ok": job.prepared.rows_ok,
            "rows_rejected": len(job.prepared.rejects),
            "mlflow_run_id": run_id,
            "checkpoint": checkpoint.path,
        }
        history = tracking.metric_history(run_id, "tokens_per_s")
        if history:
            summary["tokens_per_s"] = sum(m.value for m in history) / len(history)
        write_outputs(job, Path(d), output_dir, summary)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(output_dir / "adapter"), artifact_path="adapter")
        mlflow.log_artifact(str(output_dir / "metrics.json"))
        mlflow.log_artifact(str(output_dir / "config.yaml"))
        if (output_dir / "rejects.jsonl").is_file():
            mlflow.log_artifact(str(output_dir / "rejects.jsonl"))
    MlflowClient().set_terminated(run_id, "FINISHED")
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
    try:
        cfg = config_from_args(args)
        run(cfg, args.output)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
