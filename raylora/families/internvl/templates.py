"""InternVL's chat templates (the MPT separator style of its releases) and image tokens."""

from __future__ import annotations

from raylora.data.templates import ChatTemplate, ImageTokens

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
# the names transformers' InternVLProcessor reads from the tokenizer (tokenizer_config.json keys)
NAMED_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": "<video>",
}

INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def image_tokens(tokens_per_tile: int) -> ImageTokens:
    """``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens per tile) + ``</img>``; the text after an
    image keeps its newline; transformers' InternVL processor expands ``<IMG_CONTEXT>``."""
    return ImageTokens(IMG_START, IMG_CONTEXT, IMG_END, tokens_per_tile, "\n", IMG_CONTEXT + "\n")


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "internlm2-chat",
            "<|im_start|>system\n{system}",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>",
            INTERNVL2_SYSTEM,
            ("<|im_end|>",),
        ),
        ChatTemplate(
            "Hermes-2",
            "<|im_start|>system\n{system}",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>",
            INTERNVL2_SYSTEM,
            ("<|im_end|>", "<|endoftext|>"),
        ),
        ChatTemplate(
            "phi3-chat",
            "<|system|>\n{system}",
            "<|user|>\n",
            "<|assistant|>\n",
            "<|end|>",
            INTERNVL2_SYSTEM,
            ("<|end|>", "<|endoftext|>"),
        ),
        ChatTemplate(
            "internvl2_5",
            "<|im_start|>system\n{system}",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
            INTERNVL2_5_SYSTEM,
            ("<|im_end|>",),
        ),
    )
}
