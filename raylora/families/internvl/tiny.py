"""Tiny random InternVL checkpoints of the real architecture, for CPU runs (the demo's base, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raylora.families.base import TinyBuilder
from raylora.families.internvl.family import image_processor_for, write_processor_files
from raylora.families.internvl.templates import IMG_CONTEXT, IMG_END, IMG_START, NAMED_TOKENS, TEMPLATES

SPECIAL_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT, "<video>"]  # after the ChatML tokens, in this order
EXTRA_SPECIAL_TOKENS = NAMED_TOKENS


def tiny_config(
    vocab_size: int,
    image_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    image_size: int = 112,
    llm: str = "qwen2",
) -> Any:
    """InternVL config at demo scale: ``image_size`` px tiles, 64-wide 2-layer ViT, 128-wide 2-layer
    LLM (``qwen2``: InternVL2 to 3; ``qwen3``: InternVL3.5)."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config, Qwen3Config

    vision = InternVLVisionConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=[image_size, image_size],
        patch_size=[14, 14],
    )
    text_cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[llm]
    extra = {"head_dim": 32} if llm == "qwen3" else {}
    text = text_cls(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **extra,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(image_size // 14) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def tiny_model(tokenizer: Any, image_size: int = 112, llm: str = "qwen2") -> Any:
    """A tiny InternVL for ``tokenizer`` (weights as transformers initialises them: set them after)."""
    from transformers import InternVLForConditionalGeneration

    cfg = tiny_config(
        len(tokenizer),
        tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        image_size,
        llm,
    )
    return InternVLForConditionalGeneration(cfg)


def write_tiny_processor(out: Path, tokenizer: Any, chat_template: str, image_size: int = 112) -> None:
    """transformers' InternVL processor files for a tiny checkpoint (GotOcr2 tiling, up to 6 tiles)."""
    image_processor = image_processor_for(image_size, max_patches=6)
    write_processor_files(
        out, tokenizer, image_processor, image_size, (image_size // 14) ** 2 // 4, chat_template
    )


def builders(image_size: int = 112) -> dict[str, TinyBuilder]:
    """``internvl``: InternVL2 to 3 (Qwen2 LLM, the demo base's shape); ``internvl3_5``: InternVL3.5
    as published in the -hf format (Qwen3 LLM, InternVL2.5's chat format)."""

    def build(name: str, llm: str, template: str) -> TinyBuilder:
        return TinyBuilder(
            name,
            tuple(SPECIAL_TOKENS),
            TEMPLATES[template],
            IMG_CONTEXT + "\n",
            lambda tok: tiny_model(tok, image_size, llm),
            lambda out, tok, jinja: write_tiny_processor(out, tok, jinja, image_size),
            dict(EXTRA_SPECIAL_TOKENS),
        )

    return {
        "internvl": build("internvl", "qwen2", "Hermes-2"),
        "internvl3_5": build("internvl3_5", "qwen3", "internvl2_5"),
    }
