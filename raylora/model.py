"""Model builders: load a native InternVL checkpoint, wrap its LLM in PEFT LoRA, and the per-LLM-family facts.

Plain functions, as in torchtune: the train recipe, evaluation, merge and caption all call these.
torch, transformers and peft are imported inside the functions that need them, so that CLIs start fast.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylora.config import Config
from raylora.data.tiling import IMAGENET_MEAN, IMAGENET_STD

_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LLMFamily:
    """What raylora needs to know about one InternVL2 LLM family."""

    architecture: str  # llm_config.architectures[0] of an original checkpoint
    native_model_type: str  # text_config.model_type once converted to transformers' native layout
    lora_targets: tuple[str, ...]  # linear layers of one decoder block (native names)
    template: str  # the InternVL2 chat template the family was trained with
    image_token_id: int | None  # <IMG_CONTEXT> of the published tokenizer (when its files do not say)


# The one table of per-family facts, keyed by family (= the original LLM's model_type).
LLM_FAMILIES: dict[str, LLMFamily] = {
    "internlm2": LLMFamily("InternLM2ForCausalLM", "llama", _DECODER_LINEARS, "internlm2-chat", 92546),
    "qwen2": LLMFamily("Qwen2ForCausalLM", "qwen2", _DECODER_LINEARS, "Hermes-2", 151667),
    "llama": LLMFamily("LlamaForCausalLM", "llama", _DECODER_LINEARS, "internlm2-chat", None),
    "phi3": LLMFamily(
        "Phi3ForCausalLM", "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "phi3-chat", None
    ),
}
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer")


def llm_family(model_type: str) -> LLMFamily:
    """The family of a native ``text_config.model_type`` (or an original LLM model_type)."""
    try:
        return LLM_FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported LLM type {model_type!r}; raylora knows {', '.join(sorted(LLM_FAMILIES))}"
        ) from None


@dataclass(frozen=True)
class ModelInfo:
    """What a native checkpoint's config.json says about its inputs."""

    image_size: int  # tile side in pixels
    tokens_per_tile: int  # (image_size / patch)^2 * downsample_ratio^2
    text_model_type: str  # the LLM's native model_type (qwen2, llama, phi3)


def model_info(model_dir: str | Path) -> ModelInfo:
    """Tile size, tokens per tile and LLM type from a native checkpoint's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vision = cfg["vision_config"]
    size = vision.get("image_size", 448)
    patch = vision.get("patch_size", 14)
    size = size[0] if isinstance(size, list) else size
    patch = patch[0] if isinstance(patch, list) else patch
    ratio = cfg.get("downsample_ratio", 0.5)
    return ModelInfo(
        image_size=int(size),
        tokens_per_tile=int(cfg.get("image_seq_length") or (size // patch) ** 2 * ratio**2),
        text_model_type=cfg["text_config"].get("model_type", "llama"),
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


def attention_for_layout(attn: str, structured: bool, device_type: str) -> tuple[Any, str, str | None]:
    """(``attn_implementation`` to load with, the text model's backend, a one-line notice or None).

    A structured layout (grouped captions, packed rows) needs an exact mask: flash_attention_2 cannot
    express a shared prefix, so on a GPU it is replaced by flex_attention for the text model (the
    vision tower keeps sdpa; it needs no mask) and on a CPU by sdpa with a 4D mask. flex_attention's
    backward does not run on a CPU.
    """
    if not structured:
        return attn, attn, None
    if attn == "flex_attention" and device_type != "cuda":
        raise ValueError("model.attn_implementation=flex_attention needs a GPU; use sdpa (or auto) on a CPU")
    if attn == "flash_attention_2":
        if device_type == "cuda":
            chosen = {"text_config": "flex_attention", "vision_config": "sdpa"}
            note = "flash_attention_2 cannot express grouped captions or packed rows: text attention uses flex_attention"
            return chosen, "flex_attention", note
        return "sdpa", "sdpa", "flash_attention_2 needs a GPU: attention uses sdpa with a 4D mask"
    if attn == "flex_attention":
        return {"text_config": "flex_attention", "vision_config": "sdpa"}, "flex_attention", None
    return attn, attn, None


def load_base_model(model_dir: str | Path, dtype: Any = None, attn: Any = "sdpa"):
    """A native InternVL checkpoint as ``InternVLForConditionalGeneration`` (no remote code)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)


def lora_target_regex(family: str, target_modules: list[str] | None, vision: bool) -> str:
    """A regex over module names: the LLM's decoder blocks (and the vision tower if asked).

    ``family`` is the LLM's native model_type. A bare name list would also hit the vision tower's
    q/k/v, hence the anchored regex.
    """
    names = target_modules or LLM_FAMILIES.get(family, LLM_FAMILIES["llama"]).lora_targets
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
