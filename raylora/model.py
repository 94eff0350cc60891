"""Model builders: resolve a base checkpoint, load it natively, wrap its LLM in PEFT LoRA.

Plain functions, as in torchtune: the train job, evaluation, merge and caption all call these.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from raylora.config import DEMO, Config
from raylora.data.pipeline import ImageSettings
from raylora.data.tiling import IMAGENET_MEAN, IMAGENET_STD

# Linear layers of one decoder block, per LLM family (native transformers names).
LLM_TARGETS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
VISION_TARGETS = ["q_proj", "k_proj", "v_proj", "projection_layer"]


def resolve_model_dir(path: str, log: Any = print) -> Path:
    """``demo`` -> the cached demo base; an original InternVL2 checkpoint -> its native conversion."""
    if path == DEMO:
        from raylora.demo import ensure_demo

        return ensure_demo(log=log) / "base"
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path {path!r} is not a checkpoint directory (no config.json); "
            "download one with scripts/download_internvl2_coco.sh or use model.path=demo"
        )
    if json.loads((p / "config.json").read_text()).get("model_type") == "internvl_chat":
        from raylora.convert import ensure_native

        return ensure_native(p)
    return p


def model_info(model_dir: Path) -> dict[str, Any]:
    """Tile size, tokens per tile and LLM family from a native config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vision = cfg["vision_config"]
    size = vision.get("image_size", 448)
    patch = vision.get("patch_size", 14)
    size = size[0] if isinstance(size, list) else size
    patch = patch[0] if isinstance(patch, list) else patch
    ratio = cfg.get("downsample_ratio", 0.5)
    return {
        "image_size": int(size),
        "tokens_per_tile": int(cfg.get("image_seq_length") or (size // patch) ** 2 * ratio**2),
        "family": cfg["text_config"].get("model_type", "llama"),
        "template": _saved_template(Path(model_dir)),
    }


def _saved_template(model_dir: Path) -> dict[str, Any]:
    f = model_dir / "raylora.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def image_settings(cfg: Config, model_dir: Path, max_num: int | None = None) -> ImageSettings:
    """The ImageSettings of a run: tiling from the config, tile size and tokens from the model."""
    info = model_info(model_dir)
    if cfg.data.image_size != info["image_size"]:
        raise ValueError(
            f"data.image_size is {cfg.data.image_size} but the model {model_dir} takes "
            f"{info['image_size']} px tiles; set data.image_size={info['image_size']}"
        )
    return ImageSettings(
        tokenizer_path=str(model_dir),
        template=cfg.model.template,
        system_message=cfg.model.system_message,
        image_size=info["image_size"],
        min_num=cfg.data.min_num,
        max_num=cfg.data.max_num if max_num is None else max_num,
        use_thumbnail=cfg.data.use_thumbnail,
        tokens_per_tile=info["tokens_per_tile"],
        max_seq_length=cfg.model.max_seq_length,
    )


def torch_dtype(name: str, device_type: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def attn_implementation(name: str, device_type: str) -> str:
    if name != "auto":
        return name
    if device_type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_base_model(model_dir: str | Path, dtype: Any = None, attn: str = "sdpa"):
    """A native InternVL checkpoint as ``InternVLForConditionalGeneration`` (no remote code)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)


def lora_target_regex(family: str, target_modules: list[str] | None, vision: bool) -> str:
    """A regex over module names: the LLM's decoder blocks (and the vision tower if asked).

    A bare name list would also hit the vision tower's q/k/v, hence the anchored regex.
    """
    names = target_modules or LLM_TARGETS.get(family, LLM_TARGETS["llama"])
    pattern = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(map(re.escape, names))})"
    if vision:
        vnames = "|".join(VISION_TARGETS)
        pattern = rf"({pattern}|.*vision_tower\.encoder\.layer\.\d+\.attention\.({vnames}))"
    return pattern


def apply_lora(model: Any, cfg: Config, family: str):
    """Freeze the base, wrap in PEFT LoRA; optionally train the projector and/or lm_head fully."""
    from peft import LoraConfig, get_peft_model

    modules_to_save = []
    if cfg.lora.train_projector:
        modules_to_save.append("multi_modal_projector")
    if cfg.lora.train_lm_head:
        modules_to_save.append("lm_head")
    lcfg = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_regex(family, cfg.lora.target_modules, cfg.lora.vision_lora),
        modules_to_save=modules_to_save or None,
        bias="none",
    )
    return get_peft_model(model, lcfg)


def count_trainable(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def internvl_image_processor(image_size: int, max_patches: int) -> Any:
    """transformers' image processor for InternVL tiling (GotOcr2 with crop_to_patches, ImageNet stats)."""
    from transformers import GotOcr2ImageProcessor

    return GotOcr2ImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def save_processor(
    out: Path, tokenizer: Any, image_processor: Any, image_size: int, tokens_per_tile: int, chat_template: str
) -> None:
    """transformers' InternVL processor files (processor_config.json, image and video processor
    configs, tokenizer with the chat template), so ``AutoProcessor.from_pretrained(out)`` works."""
    from transformers import InternVLProcessor, InternVLVideoProcessor

    tokenizer.chat_template = chat_template
    video_processor = InternVLVideoProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
    )
    InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=tokens_per_tile,
        chat_template=chat_template,
    ).save_pretrained(out)
    # the separate files older transformers versions read (5.x reads processor_config.json)
    image_processor.save_pretrained(out)
    video_processor.save_pretrained(out)
