"""The first thing to run on a GPU: image-once training checked and measured at InternVL2-2B's size.

    python scripts/bench_gpu.py [--steps 5] [--peak-tflops 989]

On a machine without CUDA it prints what it would measure and exits 0. On a CUDA GPU, unattended,
in a few minutes (H100/H200-class):

1. Exactness on the GPU backends: a narrow InternVL with LoRA, fp32 (TF32 off), real COCO rows
   from the test fixtures; the LoRA gradients of image-once batches (the text attention on
   flex_attention with a block mask, and on sdpa with a 4D mask) against the same rows one per
   micro-batch (the tutorial's layout, flash_attention_2 when installed). Max relative error per
   tensor must stay <= 1e-4, else it stops with exit code 1 (nothing else is worth measuring then).
2. Speed: InternVL2-2B's architecture built from its config with random weights (no download),
   bf16, gradient checkpointing, LoRA rank 128 on the LLM; the recipe's micro-batch in both layouts
   (4 rows of one caption each, padded; 4 images with all their captions packed into one row of
   <= 8192 tokens); samples/s, tokens/s and MFU per GPU (model FLOPs from
   ``bench_pack.internvl2_2b_training_flops``; peak from the GPU's name or ``--peak-tflops``).

The last line is one JSON object with the figures; record it in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pack import COCO, internvl2_2b_training_flops, microbatch  # noqa: E402

DEVICE = "cuda"  # --cpu-dry-run: the same code on the CPU (sdpa only, narrow models), to catch mistakes
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def build_model(tokenizer_dir: Path, out: Path, text: dict, vision: dict) -> Path:
    """An InternVL of the given widths with the demo tokenizer's special tokens, saved to ``out``."""
    from transformers import (
        AutoTokenizer,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        LlamaConfig,
    )

    from raylora.demo import SYSTEM_MESSAGE, TEMPLATE

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = {**text, "vocab_size": text["vocab_size"] or len(tok)}  # None: the tokenizer's own (dry run)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(image_size=[448, 448], patch_size=[14, 14], **vision),
        text_config=LlamaConfig(tie_word_embeddings=False, **text),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=256,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = InternVLForConditionalGeneration(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "raylora.json").write_text(json.dumps({"template": TEMPLATE, "system_message": SYSTEM_MESSAGE}))
    del model
    return out


def lora(model_dir: Path, attn: object, dtype: torch.dtype, checkpointing: bool, dropout: bool = True):
    """The recipe's LoRA (rank 128 on the LLM); without its 0.05 dropout for the exactness check,
    since dropout draws different masks in every forward pass."""
    from raylora.cli import load
    from raylora.model import apply_lora, load_base_model

    cfg = load("internvl2_2b_coco", [] if dropout else ["lora.dropout=0"])
    torch.manual_seed(0)
    model = apply_lora(load_base_model(model_dir, dtype, attn).to(DEVICE), cfg, "llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def grads(model, batches: list[dict], backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from raylora.loss import forward_loss, to_device

    model.zero_grad(set_to_none=True)
    total = sum(int(b["label_tokens"]) for b in batches)
    for b in batches:
        loss_sum, _ = forward_loss(model, to_device(b, DEVICE), dtype, backend)
        (loss_sum / total).backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def exactness(root: Path, work: Path, backends: tuple[str, ...], vocab_size: int | None) -> dict[str, float]:
    """Max relative gradient error of image-once layouts against the plain rows, per backend (a
    ``vocab_size`` of None: the tokenizer's own, for the CPU dry run)."""
    from raylora.data.plan import plan_units
    from raylora.data.prepare import prepare
    from raylora.demo import SYSTEM_MESSAGE, TEMPLATE
    from raylora.sources import image_settings

    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 matmuls for the comparison
    torch.backends.cudnn.allow_tf32 = False
    narrow = build_model(
        root / "tokenizer",
        work / "narrow",
        dict(
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        ),
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    )
    settings = image_settings(narrow, TEMPLATE, SYSTEM_MESSAGE, max_seq_length=4096)
    records = prepare(COCO / "annotations" / "coco_karpathy_train.jsonl", COCO, settings, use_ray=False).table
    units = [u for u in plan_units(records, group_by_image=True) if len(u) == 5][:3]
    plain = [microbatch(records, settings, [[r]], 0) for u in units for r in u]
    packed = microbatch(records, settings, units, 8192)
    reference_model = lora(narrow, "sdpa", torch.float32, False, dropout=False)  # fp32: no flash-attn
    reference = grads(reference_model, plain, "sdpa", torch.float32)
    errors = {}
    for backend in backends:
        attn = (
            {"text_config": "flex_attention", "vision_config": "sdpa"}
            if backend == "flex_attention"
            else backend
        )
        got = grads(lora(narrow, attn, torch.float32, False, dropout=False), [packed], backend, torch.float32)
        errors[backend] = max(
            float((got[n] - reference[n]).abs().max() / reference[n].abs().max()) for n in reference
        )
    torch.backends.cuda.matmul.allow_tf32 = True
    return errors


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def throughput(model, batches: list[dict], backend: str, steps: int, warmups: int = 2) -> float:
    """Seconds per optimizer step (forward, backward, AdamW), the best of ``steps`` after ``warmups``."""
    from raylora.loss import forward_loss, to_device

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=4e-5)
    on_gpu = [to_device(b, DEVICE) for b in batches]
    best = float("inf")
    for i in range(steps + warmups):
        synchronize()
        t0 = time.perf_counter()
        total = sum(int(b["label_tokens"]) for b in on_gpu)
        for b in on_gpu:
            loss_sum, _ = forward_loss(model, b, torch.bfloat16, backend)
            (loss_sum / total).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize()
        if i >= warmups:
            best = min(best, time.perf_counter() - t0)
    return best


def unit_flops(records, units: list[list[int]], grouped: bool) -> float:
    """Model FLOPs of training on these units (their real tiles, prefixes and caption lengths)."""
    tiles = records.column("tiles").to_pylist()
    prefix = records.column("prefix_length").to_pylist()
    labels = records.column("label_tokens").to_pylist()
    return sum(
        internvl2_2b_training_flops(sum(tiles[u[0]]), prefix[u[0]], [labels[r] for r in u], grouped)
        for u in units
    )


INTERNVL2_2B = (  # InternViT-300M + InternLM2-1.8B (native Llama layout), from the published config
    dict(
        vocab_size=92553,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
)
DRY_RUN_MODEL = (  # --cpu-dry-run: the same layout, a model small enough for a CPU (the demo's vocabulary)
    dict(
        vocab_size=None,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
    dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
)


def main() -> int:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per layout (best kept)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run the same code on the CPU with a small model and sdpa only (checks the script, measures nothing)",
    )
    args = p.parse_args()
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA GPU here; on one it checks image-once gradients on flex_attention and sdpa "
            "against plain rows (fp32), then measures samples/s, tokens/s and MFU of InternVL2-2B (random "
            "weights, bf16, gradient checkpointing) in the tutorial and the image-once layout"
        )
        return 0
    import tempfile

    from raylora.data.plan import plan_units
    from raylora.data.prepare import prepare
    from raylora.demo import SYSTEM_MESSAGE, TEMPLATE, ensure_demo
    from raylora.sources import image_settings

    name = "cpu (dry run)" if args.cpu_dry_run else torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    try:
        import flash_attn  # noqa: F401

        flash = not args.cpu_dry_run
    except ImportError:
        flash = False
    text_attn = "sdpa" if args.cpu_dry_run else "flex_attention"
    dtype = torch.float32 if args.cpu_dry_run else torch.bfloat16
    root = ensure_demo()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text, vision = DRY_RUN_MODEL if args.cpu_dry_run else INTERNVL2_2B
        backends = ("sdpa",) if args.cpu_dry_run else ("flex_attention", "sdpa")
        errors = exactness(root, work, backends, text["vocab_size"])
        print(
            f"exactness on {name}: max relative gradient error "
            + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        )
        if max(errors.values()) > 1e-4:
            print("bench_gpu: image-once gradients differ from plain rows on this GPU backend; stop here")
            print(json.dumps({"gpu": name, "exactness": errors, "ok": False}))
            return 1
        model_dir = build_model(root / "tokenizer", work / "internvl2-2b", text, vision)
        settings = image_settings(model_dir, TEMPLATE, SYSTEM_MESSAGE, max_seq_length=4096)
        records = prepare(
            COCO / "annotations" / "coco_karpathy_train.jsonl", COCO, settings, use_ray=False
        ).table
        units = [u for u in plan_units(records, group_by_image=True) if len(u) == 5][:4]
        rows = [[r] for u in units for r in u]
        plain_attn = "flash_attention_2" if flash else "sdpa"
        grouped_attn = {"text_config": text_attn, "vision_config": "sdpa"}
        layouts = {
            "tutorial": (
                plain_attn,
                plain_attn,
                [microbatch(records, settings, rows[i : i + 4], 0) for i in range(0, 20, 4)],
            ),
            "image_once": (grouped_attn, text_attn, [microbatch(records, settings, units, 8192)]),
        }
        result: dict = {"gpu": name, "exactness": errors, "ok": True, "flash_attn": flash}
        for layout, (attn, backend, batches) in layouts.items():
            model = lora(model_dir, attn, dtype, checkpointing=True)
            seconds = throughput(model, batches, backend, args.steps, warmups=0 if args.cpu_dry_run else 2)
            flops = unit_flops(records, units, grouped=layout == "image_once")
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            result[layout] = {
                "samples_per_s": len(rows) / seconds,
                "tokens_per_s": tokens / seconds,
                "model_tflops_per_s": flops / seconds / 1e12,
                "mfu": flops / seconds / (peak * 1e12) if peak else None,
            }
            if DEVICE == "cuda":
                result[layout]["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            print(
                f"{layout}: " + ", ".join(f"{k} {v:.3g}" for k, v in result[layout].items() if v is not None)
            )
            del model
        result["speedup"] = result["image_once"]["samples_per_s"] / result["tutorial"]["samples_per_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
