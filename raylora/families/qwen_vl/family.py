"""Qwen2.5-VL and Qwen3-VL: transformers' native ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen3VLForConditionalGeneration``.

Images go through the checkpoint's own transformers image processor (``Qwen2VLImageProcessor``:
resized so both sides are multiples of patch x merge, between ``data.min_pixels`` and
``data.max_pixels``, cut into patches and normalised) inside the data actors; an image of patch grid
(t, h, w) is t*h*w / merge^2 ``<|image_pad|>`` tokens between ``<|vision_start|>`` and
``<|vision_end|>``. Positions are multimodal rotary positions, three per token (t, h, w), as
transformers' ``get_rope_index`` computes them (:func:`mrope_positions`); the data pipeline gives
every token the positions it has in its own row, so image-once and packed layouts stay exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from raylora.data.templates import ChatTemplate, ImageTokens
from raylora.families.base import Family, ImageInput

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
IMAGE_TOKENS = ImageTokens(VISION_START, IMAGE_PAD, VISION_END, 1, "", VISION_START + IMAGE_PAD + VISION_END)
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("qkv", "proj")
# the published processors' pixel bounds when a checkpoint folder has none (preprocessor_config.json)
DEFAULT_PIXELS = {"qwen2_5_vl": (56 * 56, 28 * 28 * 1280), "qwen3_vl": (64 * 64, 32 * 32 * 1280)}
DEFAULT_MEAN_STD = {
    "qwen2_5_vl": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "qwen3_vl": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
TEMPLATES_DIR = Path(__file__).parent


@dataclass(frozen=True)
class QwenVL(Family):
    """A Qwen2.5-VL or Qwen3-VL checkpoint's facts."""

    name: ClassVar[str] = "qwen_vl"
    position_axes: ClassVar[int] = 3
    projector_module: ClassVar[str] = "merger"
    model_type: str = "qwen2_5_vl"  # qwen2_5_vl | qwen3_vl
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_token_id: int = 0
    processor_dir: str = ""  # the checkpoint folder whose image processor config is read ("" if none)

    image_tokens: ClassVar[ImageTokens] = IMAGE_TOKENS

    @classmethod
    def recognises(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") in DEFAULT_PIXELS

    @classmethod
    def from_config(cls, config: dict[str, Any], model_dir: str | Path | None = None) -> QwenVL:
        vision = config.get("vision_config") or {}
        model_type = config["model_type"]
        return cls(
            model_type=model_type,
            patch_size=int(vision.get("patch_size", 16 if model_type == "qwen3_vl" else 14)),
            merge_size=int(vision.get("spatial_merge_size", 2)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            image_token_id=int(config.get("image_token_id", 0)),
            processor_dir=str(model_dir or ""),
        )

    # ------------------------------------------------------------------------------ data side
    def pixel_bounds(self, options: Any) -> tuple[int, int]:
        """(min_pixels, max_pixels): ``data.min_pixels`` / ``data.max_pixels``, else the checkpoint's."""
        proc = image_processor(
            self.processor_dir, self.model_type, self.patch_size, self.merge_size, None, None
        )
        lo = options.min_pixels if options.min_pixels is not None else proc.size["shortest_edge"]
        hi = options.max_pixels if options.max_pixels is not None else proc.size["longest_edge"]
        return int(lo), int(hi)

    def image_units(self, width: int, height: int, options: Any) -> int:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        lo, hi = self.pixel_bounds(options)
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=lo, max_pixels=hi)
        return (h // factor) * (w // factor)

    def image_input(self, image: Any, options: Any) -> ImageInput:
        lo, hi = self.pixel_bounds(options)
        proc = image_processor(self.processor_dir, self.model_type, self.patch_size, self.merge_size, lo, hi)
        out = proc(images=[image], return_tensors="np")
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        units = grid[0] * grid[1] * grid[2] // self.merge_size**2
        return ImageInput(np.asarray(out["pixel_values"], np.float32), units, grid)  # type: ignore[arg-type]

    def positions(self, input_ids: np.ndarray, images: list[ImageInput]) -> np.ndarray:
        return mrope_positions(input_ids, [im.grid for im in images], self.image_token_id, self.merge_size)

    def describe_images(self, options: Any) -> str:
        lo, hi = self.pixel_bounds(options)
        f = self.patch_size * self.merge_size
        return (
            f"{lo}..{hi} pixels per image ({lo // f**2}..{hi // f**2} image tokens of {f}x{f} px), "
            f"{self.model_type} image processor"
        )

    # -------------------------------------------------------------------------------- templates
    @classmethod
    def named_templates(cls) -> dict[str, ChatTemplate]:
        return {}

    # ------------------------------------------------------------------------------ model side
    def lora_target_regex(self, config: Any, target_modules: list[str] | None, vision: bool) -> str:
        names = target_modules or DECODER_LINEARS
        pattern = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(map(re.escape, names))})"
        if vision:
            pattern = rf"({pattern}|.*visual\.blocks\.\d+\.attn\.({'|'.join(VISION_TARGETS)}))"
        return pattern

    def model_inputs(self, batch: dict[str, Any], dtype: Any) -> dict[str, Any]:
        """Pixels, grids and ``mm_token_type_ids`` (1 at image tokens): without it transformers
        computes 1-D positions (Qwen2.5-VL, silently) or fails (Qwen3-VL) when it derives positions
        itself (generation)."""
        return {
            "pixel_values": batch["pixel_values"].to(dtype),
            "image_grid_thw": batch["image_grid_thw"],
            "mm_token_type_ids": (batch["input_ids"] == self.image_token_id).long(),
        }

    def text_positions(self, batch: dict[str, Any]) -> Any:
        return batch["position_ids"].permute(1, 0, 2)  # (rows, 3, L) -> the (3, rows, L) the model takes

    def save_processor(self, out: Path, base_dir: Path, tokenizer: Any, chat_template: str) -> None:
        """The checkpoint's own processor (image and video processors, tokenizer) with the chat
        template the adapter was trained with."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(base_dir)
        processor.tokenizer = tokenizer
        tokenizer.chat_template = chat_template
        processor.chat_template = chat_template
        processor.save_pretrained(out)


@lru_cache(maxsize=8)
def image_processor(
    processor_dir: str,
    model_type: str,
    patch: int,
    merge: int,
    min_pixels: int | None,
    max_pixels: int | None,
) -> Any:
    """The checkpoint's image processor (one per process and setting), with ``min_pixels`` /
    ``max_pixels`` as its size bounds when given."""
    from transformers import Qwen2VLImageProcessor

    folder = Path(processor_dir) if processor_dir else None
    saved = folder is not None and any(
        (folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")
    )
    if saved:
        proc = Qwen2VLImageProcessor.from_pretrained(folder)
    else:
        lo, hi = DEFAULT_PIXELS[model_type]
        mean, std = DEFAULT_MEAN_STD[model_type]
        proc = Qwen2VLImageProcessor(
            patch_size=patch,
            merge_size=merge,
            temporal_patch_size=2,
            size={"shortest_edge": lo, "longest_edge": hi},
            image_mean=list(mean),
            image_std=list(std),
        )
    if min_pixels is None and max_pixels is None:
        return proc
    size = {
        "shortest_edge": proc.size["shortest_edge"] if min_pixels is None else min_pixels,
        "longest_edge": proc.size["longest_edge"] if max_pixels is None else max_pixels,
    }
    if saved:
        return Qwen2VLImageProcessor.from_pretrained(folder, size=size)
    return Qwen2VLImageProcessor(**{**proc.to_dict(), "size": size})


def mrope_positions(
    input_ids: np.ndarray, grids: list[Any], image_token_id: int, merge_size: int = 2
) -> np.ndarray:
    """(3, L) multimodal rotary positions of one unpadded sequence, as transformers'
    ``get_rope_index`` computes them for images: a text token has position p on all three axes
    (then p + 1); an image of patch grid (t, h, w) has its (t, h/m, w/m) merged tokens at
    p + (ti, hi, wi), and the text after it starts at p + max(h, w) / m."""
    ids = np.asarray(input_ids).reshape(-1)
    out = np.empty((3, len(ids)), np.int64)
    pos, i, image = 0, 0, 0
    is_image = ids == image_token_id
    while i < len(ids):
        if not is_image[i]:
            end = i + int(np.argmax(is_image[i:])) if is_image[i:].any() else len(ids)
            out[:, i:end] = pos + np.arange(end - i)
            pos += end - i
            i = end
            continue
        if image >= len(grids):
            raise ValueError("more images in the tokens than image grids")
        t, h, w = (int(x) for x in grids[image])
        h, w = h // merge_size, w // merge_size
        n = t * h * w
        if not is_image[i : i + n].all() or len(is_image[i : i + n]) != n:
            raise ValueError(f"image {image}: expected {n} image tokens at position {i}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        out[:, i : i + n] = pos + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])
        pos += max(h, w)
        i += n
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} image grids for {image} images in the tokens")
    return out
