"""The model-family interface (:class:`Family`) and the values families exchange with the pipeline;
the registry of families is :mod:`raylora.families`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from raylora.data.templates import ChatTemplate, ImageTokens, template_from_jinja

# torch and transformers are imported inside the methods that need them: the data checks do not.

AUTO = "auto"
IMAGE_COLUMNS = ("pixel_values", "image_grid_thw")  # the image columns of a batch (those a family uses)


@dataclass(frozen=True)
class ImageInput:
    """One image as the model takes it: ``pixels`` (the rows of ``pixel_values`` it contributes),
    ``units`` (what its image tokens are counted in: tiles, merged patches) and ``grid`` (the
    (t, h, w) patch grid of families whose positions depend on it)."""

    pixels: np.ndarray
    units: int
    grid: tuple[int, int, int] | None = None


def image_columns(images: list[ImageInput]) -> dict[str, np.ndarray]:
    """The image columns of a batch of images in order: ``pixel_values`` (every image's rows) and,
    for families with patch grids, ``image_grid_thw`` (one (t, h, w) row per image)."""
    out = {"pixel_values": np.concatenate([im.pixels for im in images], axis=0)}
    if images and images[0].grid is not None:
        out["image_grid_thw"] = np.asarray([im.grid for im in images], np.int64).reshape(len(images), 3)
    return out


class Family:
    """The interface every family implements (see the module docstring)."""

    name: ClassVar[str] = ""
    position_axes: ClassVar[int] = 1  # rows of position ids per token (3 for multimodal rotary positions)
    image_tokens: ImageTokens

    # ------------------------------------------------------------------ recognising a checkpoint
    @classmethod
    def recognises(cls, config: dict[str, Any]) -> bool:
        raise NotImplementedError

    @classmethod
    def original_format(cls, config: dict[str, Any]) -> bool:
        """Whether config.json is of the family's original remote-code format (:mod:`raylora.convert`
        converts it once into the native layout)."""
        return False

    @classmethod
    def from_config(cls, config: dict[str, Any], model_dir: str | Path | None = None) -> Family:
        """The family's facts from a config.json (``model_dir``: the folder it was read from)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ data side
    def image_units(self, width: int, height: int, options: Any) -> int:
        """Units (``image_tokens.tokens_per_unit`` tokens each) of a ``width`` x ``height`` image,
        without decoding it; ``options`` holds the data settings (ImageSettings)."""
        raise NotImplementedError

    def image_input(self, image: Any, options: Any) -> ImageInput:
        """A decoded RGB PIL image as the model's input."""
        raise NotImplementedError

    def positions(self, input_ids: np.ndarray, images: list[ImageInput]) -> np.ndarray:
        """``(position_axes, L)`` position ids of one sequence holding ``images`` in order."""
        return np.arange(len(input_ids), dtype=np.int64)[None]

    def describe_images(self, options: Any) -> str:
        """One line: how images become tokens under these settings."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------- templates
    @classmethod
    def named_templates(cls) -> dict[str, ChatTemplate]:
        """The chat templates this family knows by name (``model.template``)."""
        return {}

    def default_template(self, model_dir: Path) -> ChatTemplate:
        """The checkpoint's own chat template (its tokenizer's ``chat_template``)."""
        jinja = checkpoint_chat_template(model_dir)
        if jinja is None:
            raise ValueError(
                f"{model_dir}: the checkpoint carries no chat template (chat_template.jinja, "
                "chat_template.json or tokenizer_config.json); set model.template to one of "
                f"{', '.join(self.named_templates()) or 'the known templates'}"
            )
        return template_from_jinja(jinja, f"{self.name} (checkpoint)")

    # ------------------------------------------------------------------------------ model side
    def lora_target_regex(self, config: Any, target_modules: list[str] | None, vision: bool) -> str:
        """A regex over module names: the LLM's decoder linears (and the vision tower's if asked)."""
        raise NotImplementedError

    projector_module: ClassVar[str] = ""  # fully trained with lora.train_projector

    def model_inputs(self, batch: dict[str, Any], dtype: Any) -> dict[str, Any]:
        """The image inputs of a batch of torch tensors (its image columns and ``input_ids``) for
        the forward pass and generation."""
        raise NotImplementedError

    def text_positions(self, batch: dict[str, Any]) -> Any:
        """The ``position_ids`` the model's forward takes (always passed for families with several
        position axes, for structured batches otherwise)."""
        return batch["position_ids"][:, 0]

    def save_processor(self, out: Path, base_dir: Path, tokenizer: Any, chat_template: str) -> None:
        """The processor files a merged checkpoint needs for ``AutoProcessor.from_pretrained(out)``."""
        raise NotImplementedError


@dataclass(frozen=True)
class TinyBuilder:
    """How to build a tiny random checkpoint of a family's real shape (narrow widths): the special
    tokens its tokenizer needs (``extra`` names them for transformers' processor), the chat template
    its tokenizer carries, a ``model(tokenizer)`` builder and a ``processor(out, tokenizer,
    chat_template)`` writer. :mod:`raylora.demo` builds the tokenizer and the folder."""

    name: str
    special_tokens: tuple[str, ...]
    template: ChatTemplate
    image_item: str  # how the chat template renders an image item
    model: Callable[[Any], Any]
    processor: Callable[[Path, Any, str], None]
    extra: dict[str, str] = field(default_factory=dict)
    jinja: str | None = None  # the published chat template, verbatim (else rendered from ``template``)
    system_message: str | None = None


def checkpoint_chat_template(model_dir: Path) -> str | None:
    """The chat template a checkpoint folder carries (chat_template.jinja, chat_template.json,
    tokenizer_config.json's ``chat_template``), or None."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        try:
            data = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        jinja = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(jinja, str) and jinja:
            return jinja
    return None
