"""COCO-caption evaluation as Ray Data batch inference.

    python -m raylora.evaluate                                    # the demo (or the recipe's) adapter on its test split
    python -m raylora.evaluate --model outputs/internvl2_2b_coco/adapter
    python -m raylora.evaluate --model models:/raylora-coco-lora@champion --split val
    python -m raylora.evaluate --model pretrained/InternVL2-2B    # zero-shot baseline

The Karpathy-format list flows through the training code's decode + tile + tokenize (a CPU
``map_batches`` stage), then an actor pool with one model replica per GPU (or per CPU worker)
generates with left padding. The tutorial's protocol by default: greedy decoding, "Provide a
one-sentence caption for the provided image.", 8 to 30 new tokens, tiling max 6, the model's chat
template; ``eval.num_beams=5`` for beam search (batched output equals batch-1 output either way).
Scores: pycocoevalcap (PTB tokenizer, BLEU 1-4, METEOR, ROUGE_L, CIDEr) on ``results.json``.
Writes ``results.json``, ``metrics.json`` and ``gallery.html`` (worst captions first), with
``gallery.png``, a screenshot of it, when Chromium is installed; ``metrics.json``, the gallery and the
MLflow run's params record the decoding protocol.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from raylora import runs, tracking
from raylora.cli import config_from_args, config_parser, model_spec
from raylora.cluster import init_ray
from raylora.config import Config, ConfigError
from raylora.console import log_errors_to, run_command
from raylora.data.pipeline import quiet_progress
from raylora.data.records import load_rgb, read_gt, read_karpathy
from raylora.data.settings import ImageSettings
from raylora.generation import GenerationSettings, generate_batch, prompt_batch
from raylora.metrics import coco_caption_evaluation, format_scores
from raylora.model import torch_dtype
from raylora.pages import save_screenshot
from raylora.sources import load_model, resolve_source

# ray and torch are imported inside the functions that use them: --help and argument errors stay fast.


class PromptBuilder:
    """CPU stage: image paths -> one row per prompt batch: tiles, left-padded ids and mask, image ids."""

    def __init__(self, settings: ImageSettings, prompt: str):
        self.settings = settings
        self.prompt = prompt
        self.conv_tok = settings.conversation_tokenizer()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        built = prompt_batch(self.conv_tok, self.settings, list(batch["image"]), self.prompt)
        built["image_id"] = np.asarray(batch["image_id"])
        return {k: v[np.newaxis] for k, v in built.items()}  # a batch of one row


class Captioner:
    """Model stage: one replica per actor; prompt batches -> (image_id, caption) rows."""

    def __init__(self, spec: str, settings: ImageSettings, gen: GenerationSettings, dtype: str = "auto"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        source = resolve_source(spec)
        self.model = load_model(source, dtype=torch_dtype(dtype, device), merge=True).to(device).eval()
        self.conv_tok = settings.conversation_tokenizer()
        self.gen = gen

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        built = {k: np.array(v[0]) for k, v in batch.items()}  # batch_size=1: one prompt batch
        captions = generate_batch(self.model, self.conv_tok, built, self.gen)
        return {"image_id": built["image_id"], "caption": np.asarray(captions, dtype=object)}


def eval_settings(spec: str, cfg: Config, max_num: int | None = None) -> ImageSettings:
    """ImageSettings for a model spec: its tokenizer, template and tile size; tiling from the config."""
    return resolve_source(spec).image_settings(
        max_num=cfg.eval.max_num if max_num is None else max_num,
        data=cfg.data,
        max_seq_length=cfg.model.max_seq_length,
    )


def caption_items(
    spec: str,
    items: list[dict[str, Any]],
    settings: ImageSettings,
    gen: GenerationSettings,
    workers: int = 1,
    use_gpu: bool = False,
    dtype: str = "auto",
) -> dict[int, str]:
    """Captions for ``[{"image_id", "image"}]`` through Ray Data: CPU prompt stage, model actor pool."""
    import ray.data
    from ray.data import ActorPoolStrategy

    quiet_progress()
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // gen.batch_size, 64)))
    ds = ds.map_batches(
        PromptBuilder,
        fn_constructor_kwargs={"settings": settings, "prompt": gen.prompt},
        batch_size=gen.batch_size,
        compute=ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    ds = ds.map_batches(
        Captioner,
        fn_constructor_kwargs={"spec": spec, "settings": settings, "gen": gen, "dtype": dtype},
        batch_size=1,
        compute=ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
    )
    out: dict[int, str] = {}
    for row in ds.iter_rows():
        out[int(row["image_id"])] = str(row["caption"])
    return out


def protocol(gen: GenerationSettings, settings: ImageSettings) -> str:
    """The evaluation protocol in one line (the gallery's header)."""
    return (
        f'prompt "{gen.prompt}"; {gen.decoding}, {gen.min_new_tokens} to {gen.max_new_tokens} new tokens; '
        f"{settings.family.describe_images(settings)}; template {settings.template.name}"
    )


def _thumbnail(path: str, size: int = 224) -> str:
    from PIL import Image

    im = load_rgb(path)
    im.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


GALLERY_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#f6f8fa}
h1{font-size:22px;margin:0 0 12px}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0 0 12px;font-size:14px}
.meta dt{color:#57606a}.meta dd{margin:0;overflow-wrap:anywhere}
.scores{display:flex;flex-wrap:wrap;gap:8px;margin:0 0 12px}
.score{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:6px 10px;font-size:13px;color:#57606a}
.score b{display:block;font-size:18px;color:#1f2328}.score.main{border-color:#0969da}
.note{font-size:13px;color:#57606a;margin:0 0 16px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:14px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px;font-size:13px}
.card img{display:block;max-width:100%;max-height:224px;margin:0 auto 8px;border-radius:4px}
.head{display:flex;justify-content:space-between;align-items:center;color:#57606a;margin-bottom:6px}
.cider{font-weight:600;border-radius:10px;padding:1px 8px;color:#fff}
.low{background:#cf222e}.mid{background:#bf8700}.high{background:#1a7f37}
.caption{font-size:15px;font-weight:600;margin:0 0 8px;line-height:1.3}
.refs{margin:0;padding-left:18px;color:#57606a;line-height:1.35}
.label{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#8c959f;margin:0 0 2px}
"""

GALLERY_SCORES = ("CIDEr", "Bleu_1", "Bleu_4", "METEOR", "ROUGE_L")


def _cider_band(value: float) -> str:
    return "low" if value < 0.5 else "mid" if value < 1.0 else "high"


def write_gallery(
    path: Path,
    items: list[dict[str, Any]],
    captions: dict[int, str],
    gts: dict[int, list[str]],
    per_image: dict[int, float],
    title: str,
    limit: int = 200,
    *,
    model: str = "",
    split: str = "",
    protocol: str = "",
    scores: dict[str, float] | None = None,
) -> None:
    """A self-contained HTML page: a header (model, split, protocol, image count, overall scores),
    then one card per image (thumbnail, generated caption, per-image CIDEr, references); worst first."""
    order = sorted(items, key=lambda it: per_image.get(it["image_id"], 0.0))[:limit]
    cards = []
    for rank, it in enumerate(order, 1):
        iid = it["image_id"]
        value = per_image.get(iid, 0.0)
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in gts.get(iid, []))
        cards.append(
            "<div class='card'>"
            f"<img src='data:image/jpeg;base64,{_thumbnail(it['image'])}' alt='image {iid}'>"
            f"<div class='head'><span>#{rank} &middot; image {iid}</span>"
            f"<span class='cider {_cider_band(value)}'>CIDEr {value:.3f}</span></div>"
            f"<p class='label'>generated</p><p class='caption'>{html.escape(captions.get(iid, ''))}</p>"
            f"<p class='label'>references</p><ul class='refs'>{refs}</ul></div>"
        )
    shown = f"{len(order)} of {len(items)}" if len(order) < len(items) else f"all {len(items)}"
    meta = [("model", model), ("split", split), ("protocol", protocol), ("images", str(len(items)))]
    dl = "".join(f"<dt>{k}</dt><dd>{html.escape(v)}</dd>" for k, v in meta if v)
    tiles = "".join(
        f"<div class='score{' main' if k == 'CIDEr' else ''}'>{k}<b>{scores[k]:.3f}</b></div>"
        for k in GALLERY_SCORES
        if scores and k in scores
    )
    path.write_text(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{GALLERY_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><dl class='meta'>{dl}</dl>"
        + (f"<div class='scores'>{tiles}</div>" if tiles else "")
        + f"<p class='note'>Showing {shown} images, lowest per-image CIDEr first. "
        "Badge: red below 0.5, amber below 1.0, green from 1.0.</p>"
        f"<div class='grid'>{''.join(cards)}</div></body></html>",
        encoding="utf-8",
    )


def evaluate(
    spec: str,
    cfg: Config,
    items_path: str,
    gt_path: str,
    root: str,
    output_dir: Path,
    limit: int | None = None,
    log_mlflow: bool = True,
) -> dict[str, Any]:
    """Caption the split, score it with pycocoevalcap, write results/metrics/gallery, log to MLflow."""
    output_dir.mkdir(parents=True, exist_ok=True)
    eval_items = read_karpathy(items_path, root, limit=limit)
    items = [{"image_id": i.image_id, "image": i.image} for i in eval_items]
    settings = eval_settings(spec, cfg)
    gen = GenerationSettings.from_config(cfg.eval)
    print(
        f"[eval] {len(items)} images from {items_path} with {spec} ({settings.template.name}, batch {gen.batch_size}); "
        f"{gen.describe()}",
        flush=True,
    )
    t0 = time.time()
    captions = caption_items(
        spec, items, settings, gen, cfg.eval.workers, cfg.cluster.use_gpu, cfg.model.dtype
    )
    seconds = time.time() - t0
    results = [{"image_id": it["image_id"], "caption": captions[it["image_id"]]} for it in items]
    results_path = output_dir / "results.json"
    results_path.write_text(json.dumps(results))
    scores, per_image = coco_caption_evaluation(str(results_path), gt_path)
    print(format_scores(scores), flush=True)
    gts = read_gt(gt_path, [it["image_id"] for it in items])
    write_gallery(
        output_dir / "gallery.html",
        items,
        captions,
        gts,
        per_image,
        f"raylora evaluation: {spec}",
        model=spec,
        split=items_path,
        protocol=protocol(gen, settings),
        scores=scores,
    )
    save_screenshot(output_dir / "gallery.html", "eval")
    metrics = {
        **scores,
        "images": len(items),
        "seconds": round(seconds, 1),
        "images_per_s": len(items) / max(seconds, 1e-9),
        "model": spec,
        "split": items_path,
        "generation": {**gen.protocol(), "max_num": settings.max_num, "template": settings.template.name},
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if log_mlflow:
        metrics["mlflow_run_id"] = log_evaluation(
            cfg, spec, items_path, output_dir, scores, metrics["generation"]
        )
    print(
        f"[eval] {len(items)} images in {seconds:.0f}s; results {results_path}, gallery {output_dir / 'gallery.html'}",
        flush=True,
    )
    return metrics


def log_evaluation(
    cfg: Config, spec: str, split: str, output_dir: Path, scores: dict[str, float], protocol: dict[str, Any]
) -> str:
    """A run of its own: the protocol as params (decoding, num_beams, min/max new tokens, prompt,
    max_num, template), the scores as metrics, results/metrics/gallery as artifacts."""
    uri, exp_id = tracking.setup(cfg)
    params = {"model": spec[:500], "split": split[:500], **protocol}
    tags = {"kind": "evaluation", "model": spec, "split": split, "decoding": protocol["decoding"]}
    run_id = tracking.create_run(exp_id, "evaluate", tags=tags, params=params, uri=uri)
    logger = tracking.MetricLogger(uri, run_id)
    logger.log({k: float(v) for k, v in scores.items()}, 0)
    for name in ("results.json", "metrics.json", "gallery.html", "gallery.png"):
        if (output_dir / name).is_file():  # gallery.png only when Chromium is installed
            tracking.log_artifacts(run_id, output_dir / name, None, uri)
    tracking.end_run(run_id, "FINISHED", uri)
    return run_id


def default_model(cfg: Config) -> str:
    """The config's trained adapter when present, else its base model."""
    adapter = runs.adapter_dir(cfg.output_dir)
    if (adapter / "adapter_config.json").is_file():
        return str(adapter)
    return cfg.model.path


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python -m raylora.evaluate", __doc__, "eval.num_beams=5 eval.workers=8")
    parser.add_argument(
        "--model",
        help="base/merged checkpoint dir, adapter dir, models:/NAME@ALIAS or runs:/ID/adapter, or demo "
        "(default: the config's trained adapter, else its base model)",
    )
    parser.add_argument(
        "--split", choices=["test", "val"], default="test", help="which configured split (default test)"
    )
    parser.add_argument("--items", help="Karpathy-format list to caption instead of the configured split")
    parser.add_argument("--gt", help="COCO-format ground truth for --items")
    parser.add_argument("--root", help="image root for --items")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument(
        "--output",
        help="where results.json, metrics.json and gallery.html go (default <output_dir>/eval_<split>)",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the evaluation to MLflow")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = config_from_args(args)
        if args.items:
            if not (args.gt and args.root):
                raise ConfigError("--items needs --gt and --root")
            items, gt, root = args.items, args.gt, args.root
        else:
            d = cfg.data
            items, gt, root = (
                (d.test, d.test_gt, d.test_root) if args.split == "test" else (d.val, d.val_gt, d.val_root)
            )
        for p in (items, gt):
            if not Path(p).is_file():
                raise FileNotFoundError(f"evaluation file not found: {p}")
        output = Path(args.output or Path(cfg.output_dir) / f"eval_{args.split}")
        log_errors_to(output)
        spec = model_spec(args.model) if args.model else default_model(cfg)
        init_ray(cfg)
        evaluate(spec, cfg, items, gt, root, output, args.limit, log_mlflow=not args.no_mlflow)

    return run_command(body, command="evaluate", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
