"""Tiny random Qwen2.5-VL / Qwen3-VL checkpoints of the real architectures (narrow widths), for CPU
runs: the published chat templates and special tokens, an image processor bounded to a few dozen
image tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raylora.data.templates import template_from_jinja
from raylora.families.base import TinyBuilder
from raylora.families.qwen_vl.family import (
    DEFAULT_MEAN_STD,
    IMAGE_PAD,
    TEMPLATES_DIR,
    VISION_END,
    VISION_START,
)

# after the ChatML tokens (<|endoftext|>, <|im_start|>, <|im_end|>), as in the published vocabulary
SPECIAL_TOKENS = (VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")
EXTRA_SPECIAL_TOKENS = {
    "image_token": IMAGE_PAD,
    "video_token": "<|video_pad|>",
    "vision_bos_token": VISION_START,
    "vision_eos_token": VISION_END,
}
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
MAX_TOKENS = 64  # image tokens of the largest image (max_pixels of the tiny processor)


def published_template(model_type: str) -> str:
    """The chat template the published Instruct checkpoints carry (kept verbatim in this package)."""
    return (TEMPLATES_DIR / f"{model_type}.jinja").read_text(encoding="utf-8")


def tiny_config(tokenizer: Any, model_type: str) -> Any:
    """The model's config at test scale: 64-wide 2-layer LLM (head_dim 16, its M-RoPE sections
    summing to 8), 32-wide 2-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids(VISION_START),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids(VISION_END),
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": PATCH[model_type],
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
    }
    if model_type == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}
        vision.update(window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    text["head_dim"] = 16
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
        "rope_theta": 5e6,
    }
    vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def tiny_model(tokenizer: Any, model_type: str) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_config(tiny_config(tokenizer, model_type))


def write_tiny_processor(out: Path, tokenizer: Any, chat_template: str, model_type: str) -> None:
    """The model's transformers processor: its image processor (at most MAX_TOKENS image tokens),
    video processor, the tokenizer and the chat template."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    patch = PATCH[model_type]
    factor = patch * 2
    mean, std = DEFAULT_MEAN_STD[model_type]
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": factor * factor * 4, "longest_edge": factor * factor * MAX_TOKENS},
        image_mean=list(mean),
        image_std=list(std),
    )

    video_cls, cls = (
        (Qwen2VLVideoProcessor, Qwen2_5_VLProcessor)
        if model_type == "qwen2_5_vl"
        else (Qwen3VLVideoProcessor, Qwen3VLProcessor)
    )
    tokenizer.chat_template = chat_template
    cls(
        image_processor=image_processor,
        video_processor=video_cls(patch_size=patch, temporal_patch_size=2, merge_size=2),
        tokenizer=tokenizer,
        chat_template=chat_template,
    ).save_pretrained(out)


def builders() -> dict[str, TinyBuilder]:
    """``qwen2_5_vl`` and ``qwen3_vl``: the published chat templates (verbatim)."""

    def build(model_type: str) -> TinyBuilder:
        jinja = published_template(model_type)
        return TinyBuilder(
            model_type,
            SPECIAL_TOKENS,
            template_from_jinja(jinja, model_type),
            VISION_START + IMAGE_PAD + VISION_END,
            lambda tok: tiny_model(tok, model_type),
            lambda out, tok, chat: write_tiny_processor(out, tok, chat, model_type),
            dict(EXTRA_SPECIAL_TOKENS),
            jinja=jinja,
        )

    return {"qwen2_5_vl": build("qwen2_5_vl"), "qwen3_vl": build("qwen3_vl")}
