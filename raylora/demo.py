"""The built-in demo: a tiny InternVL of the real architecture, an offline tokenizer, and a synthetic
caption dataset in COCO's layout, all built deterministically and cached under the user's cache dir.

The scenes are 112 px images of one or two coloured shapes. Captions come in two styles:
style A ("a red circle on the left and a blue square on the right") teaches the demo *base* model
to caption a little; style B (five paraphrases, the references of val/test) is what LoRA learns.
A base that already captions makes LoRA's job the real one: adapt the style, not learn vision.

The demo base's weights ship with raylora (``raylora/demo_base/``, 3 MB): pre-training it takes
minutes on a CPU and its float sums differ between CPU instruction sets and library versions, so a
base built on each machine scored differently (CIDEr 2.07 on one, 2.19 on another) and so did the LoRA
runs on top. The shipped weights were built by :func:`pretrain_base` (``--pretrain`` builds them again
on this machine; ``--save-shipped`` writes a rebuilt base into the package folder); they are used
only for the tokenizer they were trained with (its fingerprint is recorded beside them).

    python -m raylora.demo            # build (or show) the cached assets
    python -m raylora.demo --rebuild --pretrain   # pre-train the base here instead of the shipped weights
    python -m raylora.demo build --family qwen2_5_vl --out DIR   # a tiny random checkpoint of a family
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from raylora.console import add_verbose_flag, run_command
from raylora.data.pipeline import iter_microbatches
from raylora.data.plan import make_plan, plan_microbatches
from raylora.data.prepare import prepare
from raylora.families import named_templates, tiny_builders
from raylora.files import atomic_dir, cache_root, file_lock
from raylora.loss import forward_loss
from raylora.model import RECORD
from raylora.sources import image_settings

# torch, transformers and tokenizers are imported inside the builders: reading the cache stays fast.

DEMO_VERSION = "v5"  # v5: the base is the shipped weights (SHIPPED_BASE); v4: portable init, BASE_THREADS
SHIPPED_BASE = Path(__file__).parent / "demo_base"  # model.safetensors + base.json (see the docstring)
BASE_THREADS = 2  # the base pre-training's CPU threads on every machine: its float sums in one order
IMAGE_SIZE = 112
PROMPT = "Provide a one-sentence caption for the provided image."
SYSTEM_MESSAGE = "You are a helpful assistant that describes images."
TEMPLATE = "Hermes-2"
DEMO_FAMILY = "internvl"  # the demo base's family (tiny_builders)
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
PAIRS = (("left", "right"), ("top", "bottom"))  # left before right, top before bottom: one right caption
STYLE_B = (
    "there is a {c1} {s1} at the {p1} and a {c2} {s2} at the {p2}",
    "an image with a {c1} {s1} at the {p1} and a {c2} {s2} at the {p2}",
    "this picture shows a {c1} {s1} at the {p1} and a {c2} {s2} at the {p2}",
    "a {c1} {s1} placed at the {p1} with a {c2} {s2} at the {p2}",
    "you can see a {c1} {s1} at the {p1} and a {c2} {s2} at the {p2}",
)
STYLE_B_SINGLE = (
    "there is a {c1} {s1} in the middle",
    "an image with a {c1} {s1} in the middle",
    "this picture shows a {c1} {s1} in the middle",
    "a {c1} {s1} placed in the middle",
    "you can see a {c1} {s1} in the middle",
)
SPLITS = {"base": 2000, "train": 1200, "val": 64, "test": 64}
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # before the family's own tokens


def demo_dir() -> Path:
    return cache_root() / f"demo-{DEMO_VERSION}"


# ------------------------------------------------------------------------------------------ data


def _scene(rng: random.Random) -> dict:
    n = 1 if rng.random() < 0.2 else 2
    colors = rng.sample(sorted(COLORS), n)
    shapes = [rng.choice(SHAPES) for _ in range(n)]
    positions = ["middle"] if n == 1 else list(rng.choice(PAIRS))
    return {"colors": colors, "shapes": shapes, "positions": positions}


def _draw(scene: dict, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(im)
    centers = {"left": (28, 56), "right": (84, 56), "top": (56, 28), "bottom": (56, 84), "middle": (56, 56)}
    for color, shape, pos in zip(scene["colors"], scene["shapes"], scene["positions"]):
        cx, cy = centers[pos]
        cx += rng.randint(-6, 6)
        cy += rng.randint(-6, 6)
        r = rng.randint(12, 20)
        fill = COLORS[color]
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def draw_scenes(count: int, out_dir: Path, seed: int = 0, size: tuple[int, int] = (448, 336)) -> list[str]:
    """``count`` demo scenes saved as JPEGs of ``size`` in ``out_dir`` (e.g. images to check a model on)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        path = Path(out_dir) / f"scene_{i}.jpg"
        _draw(_scene(rng), rng).resize(size).save(path, quality=95)
        out.append(str(path))
    return out


def caption_a(scene: dict) -> str:
    c, s, p = scene["colors"], scene["shapes"], scene["positions"]
    if len(c) == 1:
        return f"a {c[0]} {s[0]} in the middle"
    return f"a {c[0]} {s[0]} on the {p[0]} and a {c[1]} {s[1]} on the {p[1]}"


def captions_b(scene: dict) -> list[str]:
    c, s, p = scene["colors"], scene["shapes"], scene["positions"]
    if len(c) == 1:
        return [t.format(c1=c[0], s1=s[0]) for t in STYLE_B_SINGLE]
    return [t.format(c1=c[0], s1=s[0], p1=p[0], c2=c[1], s2=s[1], p2=p[1]) for t in STYLE_B]


def build_data(root: Path, seed: int = 0) -> None:
    """Images + annotations: base (style A JSONL), train (style B JSONL), val/test (Karpathy + gt)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id = 0
    for split, count in SPLITS.items():
        rng = random.Random(f"{seed}-{split}")
        (root / split).mkdir(exist_ok=True)
        rows, items, gt_images, gt_anns = [], [], [], []
        for _ in range(count):
            image_id += 1
            scene = _scene(rng)
            rel = f"{split}/demo_{split}_{image_id:06d}.jpg"
            _draw(scene, rng).save(root / rel, quality=95)
            refs = captions_b(scene)
            if split in ("base", "train"):
                # the base learns style A; LoRA learns style B, five phrasings per image as in COCO
                captions = [caption_a(scene)] if split == "base" else refs
                for k, caption in enumerate(captions):
                    rows.append(
                        {
                            "id": image_id if split == "base" else f"{image_id}-{k}",
                            "image": rel,
                            "conversations": [
                                {"from": "human", "value": f"<image>\n{PROMPT}"},
                                {"from": "gpt", "value": caption},
                            ],
                        }
                    )
            else:
                items.append({"image": rel, "caption": refs, "image_id": image_id})
                gt_images.append({"id": image_id, "file_name": rel})
                gt_anns += [{"image_id": image_id, "id": len(gt_anns) + 1, "caption": r} for r in refs]
        if rows:
            with open(root / "annotations" / f"demo_{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            (root / "annotations" / f"demo_{split}.json").write_text(json.dumps(items))
            gt = {"info": {}, "licenses": [], "type": "captions", "images": gt_images, "annotations": gt_anns}
            (root / "annotations" / f"demo_{split}_gt.json").write_text(json.dumps(gt))


# ------------------------------------------------------------------------------------- tokenizer


def all_caption_text() -> list[str]:
    words = []
    for c in COLORS:
        for s in SHAPES:
            scene1 = {"colors": [c], "shapes": [s], "positions": ["middle"]}
            words += [caption_a(scene1), *captions_b(scene1)]
            for p in PAIRS:
                scene = {"colors": [c, c], "shapes": [s, s], "positions": list(p)}
                words += [caption_a(scene), *captions_b(scene)]
    return words


def build_tokenizer(out: Path, family: str = DEMO_FAMILY, system_message: str | None = SYSTEM_MESSAGE):
    """A byte-level BPE trained on the demo's text, with a family's special tokens and chat template
    (``system_message`` its default system prompt; the demo base's tokenizer by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    builder = tiny_builders()[family]
    template = demo_template() if family == DEMO_FAMILY else builder.template
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=CHATML_TOKENS + list(builder.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = all_caption_text() * 3 + [PROMPT, SYSTEM_MESSAGE, "system", "user", "assistant"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        extra_special_tokens=dict(builder.extra),
    )
    fast.chat_template = (
        builder.jinja
        if builder.jinja and family != DEMO_FAMILY
        else template.jinja(system_message, builder.image_item)
    )
    fast.save_pretrained(out)
    return fast


def demo_template():
    """The demo base's chat template."""
    return named_templates()[TEMPLATE]


# ----------------------------------------------------------------------------------------- model


def build_random_model(tokenizer_dir: Path, seed: int = 0):
    """A randomly initialised tiny InternVL for ``tokenizer_dir``'s tokenizer.

    The weights come from :func:`init_weights` (numpy's PCG64 stream), not from transformers'
    ``_init_weights`` or torch's CPU normal kernels, which change between library versions and
    CPU instruction sets: the same seed gives the same bits on every machine.
    """
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = tiny_builders()[DEMO_FAMILY].model(tok)
    init_weights(model, seed, layer_scale=model.config.vision_config.layer_scale_init_value)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def init_weights(model, seed: int, std: float = 0.02, layer_scale: float = 0.1) -> None:
    """Every parameter set from ``seed`` alone, in name order: matrices (linear, convolution,
    embedding) ~ N(0, std) drawn in float64 by numpy's PCG64 (the same numbers on any platform), norm
    weights 1, biases 0, the vision tower's layer scales ``layer_scale``, its class token and position
    embeddings 0, the padding token's embedding 0."""
    import numpy as np
    import torch

    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("lambda_1", "lambda_2"):
                param.fill_(layer_scale)
            elif leaf in ("cls_token", "position_embeddings") or (param.dim() == 1 and leaf == "bias"):
                param.zero_()
            elif param.dim() == 1:  # LayerNorm / RMSNorm weights
                param.fill_(1.0)
            else:
                values = rng.standard_normal(param.shape) * std
                param.copy_(torch.from_numpy(values.astype(np.float32)))
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def write_processor(out: Path, tokenizer_dir: Path) -> None:
    """transformers' processor files for the demo base (GotOcr2 tiling, 16 tokens per tile)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    builder = tiny_builders()[DEMO_FAMILY]
    builder.processor(out, tok, demo_template().jinja(SYSTEM_MESSAGE, builder.image_item))


def pretrain_base(model, data_root: Path, model_dir: Path, steps: int, log=print) -> dict:
    """Full fine-tune on caption style A: the demo base that already captions a little.

    A fixed number of steps (no time budget), so the demo base is the same on every machine.
    """
    import torch

    settings = demo_image_settings(model_dir)
    prepared = prepare(data_root / "annotations" / "demo_base.jsonl", data_root, settings, use_ray=False)
    bs = 32
    plan = make_plan(prepared.rows_ok, bs, bs, 1, epochs=1)
    batches = list(
        iter_microbatches(prepared.table, plan_microbatches(prepared.table, plan, seed=0), settings)
    )
    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-3, weight_decay=0.0
    )  # 2e-3 is fragile: it can stall at loss ~0.1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    model.train()
    start = time.time()
    loss = float("nan")
    for step in range(steps):
        loss_sum, tokens = forward_loss(model, batches[step % len(batches)], torch.float32)
        loss = loss_sum / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(
                f"[demo] base pre-training step {step + 1}/{steps} loss {loss:.3f} ({time.time() - start:.0f}s)"
            )
    model.eval()
    return {"steps": step + 1, "loss": loss, "seconds": round(time.time() - start, 1)}


def demo_image_settings(model_dir: Path, max_num: int = 6):
    """The demo's ImageSettings (its template, system message and 512-token budget)."""
    return image_settings(model_dir, TEMPLATE, SYSTEM_MESSAGE, max_num=max_num, max_seq_length=512)


def ensure_demo(log=print, base_steps: int = 1000, pretrain: bool = False) -> Path:
    """Build whatever part of the demo is not cached yet; returns the demo dir.

    Layout: ``data/`` (COCO-like: annotations/, base/, train/, val/, test/), ``tokenizer/``,
    ``base/`` (the pre-trained demo base model, native transformers InternVL with processor files).
    Each part is written into a temp folder and renamed when complete; a lock makes concurrent
    callers (several Ray workers) wait for one build.
    """
    root = demo_dir()
    done = root / "COMPLETE"
    if done.exists() and (root / "base" / "processor_config.json").exists():
        return root
    with file_lock(root.parent / f".{root.name}.lock"):
        if done.exists():  # built by another process meanwhile, or a cache from before processor files
            if not (root / "base" / "processor_config.json").exists():
                write_processor(root / "base", root / "tokenizer")
            return root
        log(f"[demo] building the demo assets in {root} (once)")
        data = root / "data"
        if not (data / "annotations" / "demo_test_gt.json").exists():
            with atomic_dir(data, overwrite=True) as tmp:
                build_data(tmp)
        tok_dir = root / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            with atomic_dir(tok_dir, overwrite=True) as tmp:
                build_tokenizer(tmp)
        base = root / "base"
        if not (base / "config.json").exists():
            with atomic_dir(base, overwrite=True) as tmp:
                build_base(tmp, data, tok_dir, base_steps, log, pretrain=pretrain)
        done.write_text(DEMO_VERSION)
        log(f"[demo] demo assets ready in {root}")
        return root


def build_base(out: Path, data: Path, tok_dir: Path, steps: int, log=print, pretrain: bool = False) -> None:
    """The demo base, saved in ``out``: the shipped weights when they fit this tokenizer (and
    ``pretrain`` is off), else a random tiny InternVL pre-trained here on caption style A."""
    import torch

    model = build_random_model(tok_dir)
    save_model_dir(model, tok_dir, out)  # config and tokenizer first: the data settings read them
    why = "--pretrain" if pretrain else shipped_base_mismatch(tok_dir, steps)
    if why is None:  # the file as shipped: the same bits on every machine
        shutil.copyfile(SHIPPED_BASE / "model.safetensors", out / "model.safetensors")
        info = {**json.loads((SHIPPED_BASE / "base.json").read_text()), "shipped": True}
        log(f"[demo] base model: the shipped pre-trained weights ({info['steps']} steps)")
    else:
        log(f"[demo] pre-training the base model here ({steps} steps; not the shipped weights: {why})")
        threads = torch.get_num_threads()
        torch.set_num_threads(BASE_THREADS)
        try:
            info = pretrain_base(model, data, out, steps, log)
        finally:
            torch.set_num_threads(threads)
        info["built_with"] = build_environment()
        info["tokenizer"] = tokenizer_fingerprint(tok_dir)
        save_model_dir(model, tok_dir, out)
    (out / "raylora_demo_base.json").write_text(json.dumps(info, indent=2))


def tokenizer_fingerprint(tok_dir: Path) -> str:
    """A hash of what gives each token its id: the BPE vocabulary and merges, the added tokens."""
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    key = {"model": spec["model"], "added": [(t["id"], t["content"]) for t in spec.get("added_tokens", [])]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def shipped_base_mismatch(tok_dir: Path, steps: int) -> str | None:
    """Why the shipped weights cannot be this demo's base (None: they can)."""
    record = SHIPPED_BASE / "base.json"
    if not (SHIPPED_BASE / "model.safetensors").is_file() or not record.is_file():
        return f"{SHIPPED_BASE} is missing"
    info = json.loads(record.read_text())
    if info.get("steps") != steps:
        return f"they were pre-trained {info.get('steps')} steps, {steps} asked"
    if info.get("tokenizer") != tokenizer_fingerprint(tok_dir):
        return "they were trained with another tokenizer (the tokenizers library built a different one)"
    return None


def save_shipped_base(base_dir: Path) -> Path:
    """Write a built base's weights and record into the package's ``demo_base/`` (for maintainers:
    after a change that makes the shipped weights stale)."""
    info = json.loads((base_dir / "raylora_demo_base.json").read_text())
    info.pop("shipped", None)
    SHIPPED_BASE.mkdir(exist_ok=True)
    shutil.copyfile(base_dir / "model.safetensors", SHIPPED_BASE / "model.safetensors")
    (SHIPPED_BASE / "base.json").write_text(json.dumps(info, indent=2) + "\n")
    return SHIPPED_BASE


def build_environment() -> dict[str, str]:
    """What a demo base's numbers depend on beyond raylora's code: library versions, the CPU's
    instruction set torch ran, the threads (recorded beside the base to explain a difference)."""
    from importlib.metadata import version

    import torch

    libs = ("torch", "transformers", "tokenizers", "pillow", "numpy")
    return {
        **{lib: version(lib) for lib in libs},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(BASE_THREADS),
    }


def save_model_dir(model, tokenizer_dir: Path, out: Path) -> None:
    """A native checkpoint dir: safetensors weights, tokenizer, image processor config."""
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    write_processor(out, tokenizer_dir)
    (out / RECORD).write_text(json.dumps({"template": TEMPLATE, "system_message": SYSTEM_MESSAGE}))


def build_checkpoint(family: str, out: Path, seed: int = 0, log=print) -> Path:
    """A tiny random checkpoint of ``family``'s real shape (:func:`raylora.families.tiny_builders`) in
    ``out``: weights from :func:`init_weights`, a BPE tokenizer trained on the demo's text with the
    family's special tokens and chat template (its own default system prompt), the family's
    transformers processor files. What the per-family CPU tests train, merge and serve."""
    import torch
    from transformers import AutoTokenizer

    builders = tiny_builders()
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(builders)}")
    builder = builders[family]
    with atomic_dir(Path(out), overwrite=True) as tmp:
        build_tokenizer(tmp, family, system_message=None)
        tok = AutoTokenizer.from_pretrained(tmp)
        torch.manual_seed(seed)
        model = builder.model(tok)
        init_weights(
            model, seed, layer_scale=getattr(model.config.vision_config, "layer_scale_init_value", 0.1)
        )
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        builder.processor(tmp, tok, tok.chat_template)
    log(f"[demo] tiny {family} checkpoint written to {out}")
    return Path(out)


def data_paths(root: Path) -> dict[str, Path]:
    """The demo dataset of the demo dir ``root`` in data-config terms (``data.train``, ``data.root``, ...)."""
    data = root / "data"
    return {
        "train": data / "annotations" / "demo_train.jsonl",
        "root": data,
        "val": data / "annotations" / "demo_val.json",
        "val_gt": data / "annotations" / "demo_val_gt.json",
        "val_root": data,
        "test": data / "annotations" / "demo_test.json",
        "test_gt": data / "annotations" / "demo_test_gt.json",
        "test_root": data,
    }


def build_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m raylora.demo build",
        description="Build a tiny random checkpoint of a model family's real shape (narrow widths), with "
        "an offline tokenizer carrying the family's special tokens and chat template: what the CPU tests "
        "train, merge and serve.",
    )
    p.add_argument("--family", required=True, choices=sorted(tiny_builders()), help="the model family")
    p.add_argument("--out", required=True, help="the checkpoint folder to write (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    add_verbose_flag(p)
    args = p.parse_args(argv)

    def body() -> None:
        build_checkpoint(args.family, Path(args.out), args.seed)

    return run_command(body, command="demo build", verbose_flag=args.verbose)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        return build_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m raylora.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--rebuild", action="store_true", help="delete the cached demo assets and build them again"
    )
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="pre-train the base model here (minutes) instead of using the shipped weights",
    )
    p.add_argument(
        "--save-shipped",
        action="store_true",
        help="copy the cached base's weights into the package's demo_base/ (maintainers)",
    )
    add_verbose_flag(p)
    args = p.parse_args(argv)

    def body() -> None:
        if args.rebuild:
            shutil.rmtree(demo_dir(), ignore_errors=True)
        root = ensure_demo(pretrain=args.pretrain)
        if args.save_shipped:
            print(f"shipped base written: {save_shipped_base(root / 'base')}")
        print(root)

    return run_command(body, command="demo", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
