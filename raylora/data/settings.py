"""The settings that turn an image and a conversation into model inputs, shared by training,
validation, evaluation and captioning (built from a model and a config by
:func:`raylora.sources.image_settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from raylora.data.records import load_rgb
from raylora.data.templates import ChatTemplate, ConversationTokenizer
from raylora.families import Family, ImageInput

# transformers is imported inside conversation_tokenizer(): image preprocessing alone does not need it.


@dataclass(frozen=True)
class ImageSettings:
    """Everything that turns an image + conversation into tokens; shared by train and eval.

    ``family`` (:mod:`raylora.families`) decides what the image options mean: tiles
    (``min_num``..``max_num``, ``use_thumbnail``) or pixel bounds (``min_pixels``, ``max_pixels``).
    """

    tokenizer_path: str
    template: ChatTemplate
    family: Family
    system_message: str | None = None
    min_num: int = 1
    max_num: int = 6
    use_thumbnail: bool = True
    min_pixels: int | None = None  # None: the checkpoint's image processor's
    max_pixels: int | None = None
    max_seq_length: int = 4096

    @property
    def tokens_per_unit(self) -> int:
        return self.family.image_tokens.tokens_per_unit

    def tiles_for(self, width: int, height: int) -> int:
        """Image units (tiles, merged patches) of an image of that size, without decoding it."""
        return self.family.image_units(width, height, self)

    def image_input(self, path: str | BinaryIO) -> ImageInput:
        """An image file (a path, or a binary file object such as ``io.BytesIO``) as the model's input."""
        return self.family.image_input(load_rgb(path), self)

    def describe(self) -> str:
        """One line: tokenizer, template and how images become tokens."""
        return f"tokenizer: {self.tokenizer_path} [{self.template.name}], {self.family.describe_images(self)}"

    def conversation_tokenizer(self) -> ConversationTokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return ConversationTokenizer(
            tok, self.template, self.family.image_tokens, self.max_seq_length, self.system_message
        )
