"""The settings that turn an image and a conversation into model inputs, shared by training,
validation, evaluation and captioning (built from a model and a config by
:func:`raylora.sources.image_settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from raylora.data.records import load_rgb
from raylora.data.templates import ConversationTokenizer
from raylora.data.tiling import num_tiles, tile_image

# transformers is imported inside conversation_tokenizer(): tiling alone does not need it.


@dataclass(frozen=True)
class ImageSettings:
    """Everything that turns an image + conversation into tokens; shared by train and eval."""

    tokenizer_path: str
    template: str
    system_message: str | None = None
    image_size: int = 448
    min_num: int = 1
    max_num: int = 6
    use_thumbnail: bool = True
    tokens_per_tile: int = 256
    max_seq_length: int = 4096

    def tiles_for(self, width: int, height: int) -> int:
        return num_tiles(width, height, self.image_size, self.min_num, self.max_num, self.use_thumbnail)

    def tile(self, path: str | BinaryIO) -> np.ndarray:
        """uint8 tiles of an image file (a path, or a binary file object such as ``io.BytesIO``)."""
        return tile_image(load_rgb(path), self.image_size, self.min_num, self.max_num, self.use_thumbnail)

    def conversation_tokenizer(self) -> ConversationTokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return ConversationTokenizer(
            tok, self.template, self.tokens_per_tile, self.max_seq_length, self.system_message
        )
