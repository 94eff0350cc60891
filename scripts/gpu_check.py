"""The GPU check's stages (run it through scripts/gpu_check.sh, which installs the wheels first).

    python scripts/gpu_check.py [--out DIR] [--cpu-dry-run] [--steps 8] [--demo-steps 30]

Each stage runs isolated (an exception is recorded as the stage's error, and the next stage runs),
prints its lines as it goes and rewrites ``<out>/gpu_check.json`` after it ends; ``<out>`` is
``--out``, else ``$OUT``, else ``gpu_check_out/``. Stages:

1. ``environment``: GPU, memory, torch/CUDA/transformers/peft/DeepSpeed versions, attention kernels.
2. ``exactness``: image-once LoRA gradients (flex_attention with a block mask and sdpa with a 4D
   mask) against the same rows one per micro-batch, fp32 with TF32 off, max relative error <= 1e-4.
3. ``recipe_tutorial`` / ``recipe_image_once``: the recipe's own step (``LoRAFinetuneRecipe`` under
   ``torchrun``, world size 1, NCCL, DeepSpeed ZeRO-2, bf16, gradient checkpointing, its log_step and
   checkpoint) on InternVL2-2B's architecture with random weights built in bf16 on the GPU, over
   real COCO rows; the plan cycles through different packed shapes. Per layout: mean step time
   after the first (compile) steps, samples/s, tokens/s, model TFLOP/s and MFU (model FLOPs: forward
   and backward of what the layout computes; the recompute of gradient checkpointing is not
   counted), torch.compile's graph and recompile counts, peak GPU memory.
4. ``demo``: the demo config end to end through ``torchrun -m raylora.train`` on the GPU: the loss falls.
5. ``generation_merge``: batched captioning with the demo adapter (images/s at batch 16 vs 1) and
   the adapter merged into its base on the GPU (max logit difference merged vs unmerged).

``--cpu-dry-run``: every stage on the CPU with narrow models (gloo, fp32, sdpa), to check the check.
DeepSpeed's JIT-built ops (fused Adam and the like) are not used: the recipe's optimizer is torch's
AdamW, so nothing is compiled by DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
COCO = REPO / "tests" / "fixtures" / "coco"

INTERNVL2_2B = {  # InternViT-300M + InternLM2-1.8B (native Llama layout), from the published config
    "text": dict(
        vocab_size=92553,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "image_size": 448,
    "lora_rank": 128,
}
NARROW = {  # --cpu-dry-run: the same layout, small enough for a CPU (the tokenizer's own vocabulary)
    "text": dict(
        vocab_size=None,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    ),
    "vision": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    "image_size": 112,
    "lora_rank": 8,
}
STAGES = (
    "environment",
    "demo_assets",
    "exactness",
    "recipe_tutorial",
    "recipe_image_once",
    "demo",
    "generation_merge",
)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


# ================================================================================== the report


class Report:
    """gpu_check.json: every stage's status, seconds and figures, rewritten after each stage."""

    def __init__(self, path: Path, dry_run: bool):
        self.path = path
        self.data: dict[str, Any] = {"cpu_dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.data["stages"] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def stage(self, name: str, fn: Any, *args: Any) -> Any:
        print(f"[gpu_check] stage {name} ...", flush=True)
        t0 = time.time()
        entry: dict[str, Any] = {"status": "running"}
        self.data["stages"][name] = entry
        self.write()
        result = None
        try:
            result = fn(*args)
            entry.update(status="ok", result=result)
        except Exception as e:  # recorded; the next stage runs
            entry.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            entry["traceback"] = traceback.format_exc()[-4000:]
            print(f"[gpu_check] stage {name} failed: {entry['error'][:500]}", flush=True)
        entry["seconds"] = round(time.time() - t0, 1)
        self.write()
        shown = json.dumps(entry.get("result"), default=str)
        print(f"[gpu_check] stage {name}: {entry['status']} in {entry['seconds']}s {shown[:600]}", flush=True)
        return result

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


# ====================================================================================== stages


def environment(dry: bool) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "cuda": torch.version.cuda}
    for lib in ("torch", "transformers", "tokenizers", "peft", "deepspeed", "accelerate", "numpy", "triton"):
        try:
            info[lib] = version(lib)
        except PackageNotFoundError:
            info[lib] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    kernels: dict[str, Any] = {}
    try:
        import flash_attn

        kernels["flash_attn"] = flash_attn.__version__
    except ImportError:
        kernels["flash_attn"] = None
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        kernels["flex_attention"] = True
    except ImportError:
        kernels["flex_attention"] = False
    if torch.cuda.is_available():
        kernels["sdpa_flash"] = torch.backends.cuda.flash_sdp_enabled()
        kernels["sdpa_mem_efficient"] = torch.backends.cuda.mem_efficient_sdp_enabled()
        kernels["sdpa_cudnn"] = torch.backends.cuda.cudnn_sdp_enabled()
    info["attention_kernels"] = kernels
    from raylora.versions import too_old

    info["below_raylora_floors"] = too_old()
    print(f"[gpu_check] {json.dumps(info)}", flush=True)
    return info


def device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def build_model_dir(
    tokenizer_dir: Path, out: Path, arch: dict[str, Any], weights: bool, dtype: Any = None
) -> Path:
    """An InternVL of ``arch``'s widths with the demo tokenizer's special tokens: its config,
    tokenizer and processor files in ``out``, and its random weights when ``weights``."""
    import torch
    from transformers import (
        AutoTokenizer,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        LlamaConfig,
    )

    from raylora.demo import SYSTEM_MESSAGE, TEMPLATE, demo_template
    from raylora.families.internvl import image_processor_for
    from raylora.families.internvl.family import write_processor_files

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = {**arch["text"], "vocab_size": arch["text"]["vocab_size"] or len(tok)}
    size = arch["image_size"]
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(image_size=[size, size], patch_size=[14, 14], **arch["vision"]),
        text_config=LlamaConfig(tie_word_embeddings=False, **text),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(size // 14) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    write_processor_files(
        out,
        tok,
        image_processor_for(size, max_patches=6),
        size,
        (size // 14) ** 2 // 4,
        demo_template().jinja(SYSTEM_MESSAGE, "<IMG_CONTEXT>\n"),
    )
    (out / "raylora.json").write_text(json.dumps({"template": TEMPLATE, "system_message": SYSTEM_MESSAGE}))
    if weights:
        torch.manual_seed(0)
        model = InternVLForConditionalGeneration(config).to(dtype or torch.float32)
        model.save_pretrained(out)
    return out


def random_model_loader(device_name: str):
    """``load_base_model``'s stand-in: the config's model with random weights, built directly in the
    requested dtype on ``device_name`` (no checkpoint written or read)."""

    def load(model_dir: str | Path, dtype: Any = None, attn: Any = "sdpa") -> Any:
        import torch
        from transformers import AutoConfig, InternVLForConditionalGeneration

        config = AutoConfig.from_pretrained(model_dir)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or torch.float32)
        try:
            torch.manual_seed(0)
            with torch.device(device_name):
                model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn)
        finally:
            torch.set_default_dtype(previous)
        return model

    return load


def exactness(dry: bool, work: Path, demo_root: Path) -> dict[str, Any]:
    """Max relative error of image-once LoRA gradients against the plain rows, per text backend."""
    import torch

    from raylora.data.pipeline import build_microbatch
    from raylora.data.plan import plan_units
    from raylora.data.prepare import prepare
    from raylora.demo import SYSTEM_MESSAGE, TEMPLATE
    from raylora.loss import forward_loss, to_device
    from raylora.sources import image_settings

    dev = device(dry)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 matmuls for the comparison
    torch.backends.cudnn.allow_tf32 = False
    arch = {
        **NARROW,
        "text": {**NARROW["text"], "hidden_size": 256, "intermediate_size": 1024},
        "image_size": 448,
    }
    arch["vision"] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    model_dir = build_model_dir(demo_root / "tokenizer", work / "narrow", arch, weights=True)
    settings = image_settings(model_dir, TEMPLATE, SYSTEM_MESSAGE, max_seq_length=8192)
    records = prepare(COCO / "annotations" / "coco_karpathy_train.jsonl", COCO, settings, use_ray=False).table
    units = [u for u in plan_units(records, group_by_image=True) if len(u) == 5][:3]
    plain = [build_microbatch(records, [[r]], settings) for u in units for r in u]
    packed = build_microbatch(records, units, settings, max_packed_tokens=8192)

    def grads(attn: Any, backend: str, batches: list[dict]) -> dict[str, Any]:
        model = lora_model(model_dir, attn, torch.float32, dev, rank=8)
        total = sum(int(b["label_tokens"]) for b in batches)
        for b in batches:
            b = to_device({k: torch.from_numpy(v) for k, v in b.items()}, dev)
            loss_sum, _ = forward_loss(model, b, torch.float32, backend)
            (loss_sum / total).backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = grads("sdpa", "sdpa", plain)
    errors = {}
    backends = ("sdpa",) if dry else ("flex_attention", "sdpa")
    for backend in backends:
        attn = (
            {"text_config": "flex_attention", "vision_config": "sdpa"}
            if backend == "flex_attention"
            else backend
        )
        got = grads(attn, backend, [packed])
        errors[backend] = max(
            float((got[n] - reference[n]).abs().max() / reference[n].abs().max()) for n in reference
        )
    torch.backends.cuda.matmul.allow_tf32 = True
    ok = max(errors.values()) <= 1e-4
    if not ok:
        raise AssertionError(f"image-once gradients differ from plain rows: {errors} (> 1e-4)")
    return {"max_relative_gradient_error": errors, "rows": len(plain), "images": len(units)}


def lora_model(model_dir: Path, attn: Any, dtype: Any, dev: str, rank: int) -> Any:
    """LoRA on the LLM (no dropout: the same masks in every pass), B random so gradients flow."""
    import torch

    from raylora.cli import load
    from raylora.model import apply_lora, load_base_model

    cfg = load("internvl2_2b_coco", ["lora.dropout=0", f"lora.rank={rank}", f"lora.alpha={2 * rank}"])
    torch.manual_seed(0)
    model = apply_lora(load_base_model(model_dir, dtype, attn).to(dev), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.config.use_cache = False
    return model.train()


def recipe_step(dry: bool, work: Path, demo_root: Path, layout: str, steps: int) -> dict[str, Any]:
    """The recipe's step under torchrun (one process): see :func:`recipe_worker`."""
    arch = NARROW if dry else INTERNVL2_2B
    model_dir = work / "model-config"
    if not (model_dir / "config.json").exists():
        build_model_dir(demo_root / "tokenizer", model_dir, arch, weights=False)
    result = work / f"recipe_{layout}.json"
    command = [
        *torchrun(),
        str(Path(__file__).resolve()),
        "--worker",
        layout,
        "--model-dir",
        str(model_dir),
        "--work",
        str(work),
        "--steps",
        str(steps),
        "--result",
        str(result),
    ] + (["--cpu-dry-run"] if dry else [])
    run_logged(command, work / f"recipe_{layout}.log", timeout=300)
    return json.loads(result.read_text())


def recipe_worker(args: argparse.Namespace) -> None:
    """One torchrun process: the recipe (LocalRuntime) on the random model, the plan cycling shapes."""
    import torch

    from raylora import runs
    from raylora.cli import load
    from raylora.data.plan import unit_lengths
    from raylora.driver import make_job, prepare_data
    from raylora.recipe import LocalRuntime, LoRAFinetuneRecipe

    dry, layout = args.cpu_dry_run, args.worker
    arch = NARROW if dry else INTERNVL2_2B
    grouped = layout == "image_once"
    overrides = [
        f"model.path={args.model_dir}",
        f"data.train={COCO / 'annotations' / 'coco_karpathy_train.jsonl'}",
        f"data.root={COCO}",
        "data.val=",
        "eval.every_n_steps=-1",
        f"data.group_by_image={str(grouped).lower()}",
        f"data.image_size={arch['image_size']}",
        f"data.max_packed_tokens={8192 if grouped else 0}",
        "train.per_device_batch_size=4",
        "train.global_batch_size=4",
        f"train.max_steps={args.steps}",
        "train.epochs=10",
        "train.zero_stage=2",
        "train.log_every_n_steps=1",
        f"train.checkpoint_every_n_steps={args.steps}",
        f"lora.rank={arch['lora_rank']}",
        f"lora.alpha={2 * arch['lora_rank']}",
        f"model.dtype={'fp32' if dry else 'bf16'}",
        "model.gradient_checkpointing=true",
        f"cluster.use_gpu={'false' if dry else 'true'}",
        "cluster.num_workers=1",
        f"cluster.storage_path={args.work / ('runs_' + layout)}",
    ]
    cfg = load("internvl2_2b_coco", overrides)
    runtime = LocalRuntime(cfg.cluster.use_gpu)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if runtime.device.type == "cuda" else "gloo")
    model_dir = Path(args.model_dir)
    prepared = prepare_data(cfg, model_dir, args.work, log=lambda line: None, use_ray=False)
    identity = runs.identity(cfg, model_dir)
    job = make_job(cfg, model_dir, prepared.table, runs.run_dir(cfg, identity), None, identity=identity)
    recipe = LoRAFinetuneRecipe(job, runtime)
    recipe.load_model = random_model_loader(runtime.device.type)
    logged: list[dict[str, Any]] = []
    recipe.logger = type("Sink", (), {"log": lambda self, m, step: logged.append({**m, "step": step})})()
    lines: list[str] = []
    recipe.print = lines.append
    torch._dynamo.utils.counters.clear()
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    recipe.setup()
    setup_seconds = time.time() - t0
    recipe.train()
    # each logged window is one step: its seconds are its samples over its samples/s
    planned = job.planned.to_pylist()
    tiles = job.records.column("tiles").to_pylist()
    prefix = job.records.column("prefix_length").to_pylist()
    labels = job.records.column("label_tokens").to_pylist()
    per_step = job.plan.microbatches_per_step

    def step_units(step: int) -> list[list[int]]:
        return [unit for mb in planned[(step - 1) * per_step : step * per_step] for unit in mb["rows"]]

    def step_samples(step: int) -> int:
        return sum(len(unit) for unit in step_units(step))

    def step_flops(step: int) -> float:
        return sum(
            model_flops(arch, sum(tiles[u[0]]), prefix[u[0]], [labels[r] for r in u], grouped)
            for u in step_units(step)
        )

    warm = 2 if args.steps > 3 else 1
    timed = [m for m in logged if m["step"] > warm]
    times = [step_samples(m["step"]) / m["samples_per_s"] for m in timed]
    total = sum(times)
    lengths, _ = unit_lengths(job.records, [u for s in range(1, args.steps + 1) for u in step_units(s)])
    name = torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops_per_s = sum(step_flops(m["step"]) for m in timed) / total
    counters = torch._dynamo.utils.counters
    result = {
        "layout": layout,
        "attention": next((line for line in lines if "attention:" in line), None),
        "steps": args.steps,
        "timed_steps": len(timed),
        "setup_seconds": round(setup_seconds, 1),
        "first_steps_seconds": [
            round(step_samples(m["step"]) / m["samples_per_s"], 3) for m in logged if m["step"] <= warm
        ],
        "mean_step_seconds": round(total / len(timed), 4),
        "samples_per_s": sum(step_samples(m["step"]) for m in timed) / total,
        "tokens_per_s": sum(m["tokens_per_s"] * t for m, t in zip(timed, times)) / total,
        "model_tflops_per_s": flops_per_s / 1e12,
        "mfu": flops_per_s / (peak * 1e12) if peak else None,
        "flops_counted": "model FLOPs: forward + backward of what this layout computes (frozen weights: "
        "activation gradients only; LoRA: weight gradients too); gradient checkpointing's recompute not counted",
        "compile": {
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "calls_captured": int(counters["stats"].get("calls_captured", 0)),
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
        },
        "losses": [round(m["loss"], 4) for m in logged],
        "units_per_step": sorted({len(step_units(s)) for s in range(1, args.steps + 1)}),
        "unit_tokens": {"min": int(min(lengths)), "max": int(max(lengths))},
    }
    if runtime.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    checkpoints = sorted(Path(job.run_dir).glob("checkpoint_step_*/train_state.json"))
    result["checkpoint_written"] = bool(checkpoints)
    if runtime.rank == 0:
        Path(args.result).write_text(json.dumps(result, default=str))
    import torch.distributed as dist

    dist.destroy_process_group()


def model_flops(arch: dict[str, Any], tiles: int, prefix: int, captions: list[int], grouped: bool) -> float:
    """Model FLOPs of training one unit (an image with its captions): forward and backward of what
    the layout computes, recompute not counted. The vision tower and projector are frozen and need no
    gradient (forward only); the LLM's frozen matmuls run forward and backward to the activations (2
    forwards), its LoRA matmuls forward and both backward products (3 forwards); attention forward
    and backward (3 forwards of QK^T and AV over each token's context); logits forward and backward
    at the positions that predict a label (both layouts compute only those). The tutorial layout
    runs the image and its prefix once per caption, image-once once per image."""
    t, v = arch["text"], arch["vision"]
    h, layers, ffn = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"]
    kv = h * t["num_key_value_heads"] // t["num_attention_heads"]
    vocab = t["vocab_size"] or 512
    rank = arch["lora_rank"]
    vit_tokens = (arch["image_size"] // 14) ** 2 + 1
    vh, vffn, vl = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    per_tile = vl * vit_tokens * (2 * (4 * vh * vh + 2 * vh * vffn) + 4 * vit_tokens * vh)
    image_tokens = (arch["image_size"] // 14) ** 2 // 4
    per_tile += image_tokens * 2 * (4 * vh * h + h * h)  # the projector (pixel shuffle: 4x the width)
    frozen = 2 * (h * h + 2 * h * kv + h * h + 3 * h * ffn)
    lora = 2 * rank * (6 * h + 2 * kv + 3 * (h + ffn))

    def llm(tokens: float, context: float, labels: float) -> float:
        return (
            layers * tokens * (2 * frozen + 3 * lora)
            + 3 * layers * 4 * h * context
            + 2 * labels * 2 * h * vocab
        )

    if grouped:
        context = prefix * (prefix + 1) / 2 + sum(c * prefix + c * (c + 1) / 2 for c in captions)
        return tiles * per_tile + llm(prefix + sum(captions), context, sum(captions))
    return sum(tiles * per_tile + llm(prefix + c, (prefix + c) * (prefix + c + 1) / 2, c) for c in captions)


def demo(dry: bool, work: Path, steps: int) -> dict[str, Any]:
    """``torchrun -m raylora.train --config demo`` on the device: the loss falls; one validation at
    the end (16 images) runs the recipe's captioning on the training model (flex_attention on a GPU)."""
    out = work / "demo"
    command = [
        *torchrun(),
        "-m",
        "raylora.train",
        "--config",
        "demo",
        "--output",
        str(out),
        f"train.max_steps={steps}",
        "train.log_every_n_steps=1",
        f"train.checkpoint_every_n_steps={steps}",
        f"eval.every_n_steps={steps}",
        "data.val_size=16",
        "cluster.num_workers=1",
        "train.global_batch_size=16",
        f"cluster.use_gpu={'false' if dry else 'true'}",
        f"cluster.storage_path={work / 'demo_runs'}",
        "cluster.cpus_per_worker=2",
    ]
    text = run_logged(command, work / "demo.log", timeout=420)
    losses = [
        float(line.split(" loss ")[1].split()[0])
        for line in text.splitlines()
        if line.startswith("[train] step ")
    ]
    attention = next((line for line in text.splitlines() if "attention:" in line), None)
    summary = json.loads((out / "metrics.json").read_text())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    result = {
        "steps": len(losses),
        "loss_first3": first,
        "loss_last3": last,
        "attention": attention,
        "seconds": summary["seconds"],
        "samples_per_s": summary["samples_per_s"],
        "val_cider": summary["val_cider"],
        "adapter": str(out / "adapter"),
    }
    if not last < first:
        raise AssertionError(f"the demo's loss did not fall: {result}")
    return result


def generation_merge(dry: bool, work: Path, demo_root: Path) -> dict[str, Any]:
    """Captions with the demo adapter at batch 16 and 1 (images/s); the adapter merged on the device."""
    import torch

    from raylora.data.records import read_karpathy
    from raylora.demo import demo_image_settings
    from raylora.generation import GenerationSettings, generate_captions
    from raylora.sources import resolve_source

    dev = device(dry)
    adapter = work / "demo" / "adapter"
    spec = str(adapter) if adapter.is_dir() else str(demo_root / "base")
    source = resolve_source(spec)
    from raylora.sources import load_model

    model = load_model(source, dtype=torch.float32 if dry else torch.bfloat16).to(dev)
    settings = demo_image_settings(source.base_dir)
    conv_tok = settings.conversation_tokenizer()
    items = read_karpathy(
        demo_root / "data" / "annotations" / "demo_val.json", demo_root / "data", limit=32 if not dry else 8
    )
    images = [it.image for it in items]
    timing = {}
    for batch in (1, 16):
        gen = GenerationSettings(batch_size=batch)
        generate_captions(model, conv_tok, settings, images[:batch], gen)  # warm-up
        sync(dev)
        t0 = time.time()
        captions = generate_captions(model, conv_tok, settings, images, gen)
        sync(dev)
        timing[f"images_per_s_batch{batch}"] = len(images) / (time.time() - t0)
    result: dict[str, Any] = {"adapter": spec, "images": len(images), **timing, "caption": captions[0]}
    result["batch16_speedup"] = timing["images_per_s_batch16"] / timing["images_per_s_batch1"]
    if source.adapter_dir is not None:
        batch = prompt_inputs(conv_tok, settings, images[:2], dev, model)
        with torch.no_grad():
            before = model(**batch).logits.float()
            t0 = time.time()
            merged = model.merge_and_unload(safe_merge=True)
            sync(dev)
            result["merge_seconds"] = round(time.time() - t0, 3)
            after = merged(**batch).logits.float()
        result["merged_max_abs_logit_diff"] = float((after - before).abs().max())
        result["merged_on"] = str(next(merged.parameters()).device)
    return result


def prompt_inputs(conv_tok: Any, settings: Any, images: list[str], dev: str, model: Any) -> dict[str, Any]:
    import torch

    from raylora.families import family_of_model
    from raylora.generation import prompt_batch

    batch = prompt_batch(conv_tok, settings, images, "Provide a one-sentence caption for the provided image.")
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return {
        "input_ids": torch.from_numpy(batch["input_ids"]).to(dev),
        "attention_mask": torch.from_numpy(batch["attention_mask"]).to(dev),
        **family_of_model(model).model_inputs(
            {"pixel_values": torch.from_numpy(batch["pixel_values"]).to(dev)}, dtype
        ),
    }


# ====================================================================================== helpers


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def torchrun() -> list[str]:
    """``torchrun`` for one process on a free port (the stages' own launcher command)."""
    from raylora.driver import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "1",
        "--master-port",
        str(free_port()),
    ]


def run_logged(command: list[str], log: Path, timeout: int) -> str:
    """Run a stage's subprocess, its output streamed to the console and kept in ``log``."""
    print(f"[gpu_check] $ {' '.join(command[:12])} ... (log: {log.name})", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    lines = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    ) as p:
        deadline = time.time() + timeout
        for line in p.stdout:
            lines.append(line)
            if line.startswith(("[train]", "[gpu_check]", "error", "Traceback", "[done]")) or "Error" in line:
                print("    " + line.rstrip()[:300], flush=True)
            if time.time() > deadline:
                p.kill()
                break
        code = p.wait()
    text = "".join(lines)
    log.write_text(text)
    if code != 0:
        raise RuntimeError(f"exit code {code}: {failure(lines)}")
    return text


def failure(lines: list[str]) -> str:
    """The line that says why a subprocess failed: its last exception or ``error:`` line (a torchrun
    worker's ``[rank0]: ValueError: ...``), not the launcher's summary."""
    import re

    why = re.compile(r"^(\[rank\d+\]: )?([\w.]+(Error|Exception)|error): ")
    found = [line.strip() for line in lines if why.match(line) and "ChildFailedError" not in line]
    return found[-1][:1500] if found else "".join(lines[-15:])[-1500:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder of gpu_check.json (default: $OUT, else gpu_check_out/)")
    p.add_argument("--cpu-dry-run", action="store_true", help="every stage on the CPU with narrow models")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of each recipe layout (2 warm-up)")
    p.add_argument("--demo-steps", type=int, default=30, help="steps of the demo run")
    p.add_argument("--stages", help=f"comma-separated stages to run (default: all): {', '.join(STAGES)}")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        recipe_worker(args)
        return 0
    import tempfile

    from raylora.console import quiet_libraries

    quiet_libraries()  # transformers' loading bars and notices; the stages print their own lines
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    dry = args.cpu_dry_run
    chosen = STAGES if not args.stages else args.stages.split(",")
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; the stages: {', '.join(STAGES)}")
    report = Report(out / "gpu_check.json", dry)
    env = report.stage("environment", environment, dry)
    if not dry and not (env or {}).get("gpu"):
        print("[gpu_check] no CUDA GPU here: use --cpu-dry-run to check the check on a CPU", flush=True)
    from raylora.demo import ensure_demo

    demo_root = report.stage("demo_assets", lambda: str(ensure_demo()))
    demo_root = Path(demo_root) if demo_root else None
    with tempfile.TemporaryDirectory(prefix="raylora-gpu-check-") as tmp:
        work = Path(tmp)
        if demo_root is not None:
            runs = {
                "exactness": (exactness, dry, work, demo_root),
                "recipe_tutorial": (recipe_step, dry, work, demo_root, "tutorial", args.steps),
                "recipe_image_once": (recipe_step, dry, work, demo_root, "image_once", args.steps),
                "demo": (demo, dry, work, args.demo_steps),
                "generation_merge": (generation_merge, dry, work, demo_root),
            }
            for name in STAGES[2:]:
                if name in chosen:
                    report.stage(name, *runs[name])
        stages = report.data["stages"]
        report.data["ok"] = all(s["status"] == "ok" for s in stages.values())
        report.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        report.write()
    print(json.dumps({k: v["status"] for k, v in report.data["stages"].items()}), flush=True)
    print(
        f"[gpu_check] {'all stages ok' if report.data['ok'] else 'some stages failed'}: {report.path}",
        flush=True,
    )
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
