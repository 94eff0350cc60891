"""Model families: everything that differs between the vision-language models raylora fine-tunes.

One sub-package per family, as transformers keeps ``models/<name>/`` and torchtune
``torchtune/models/<name>/``: recognising a checkpoint from its ``config.json``, the image
preprocessing and image-token layout, the chat templates, the position ids, the LoRA target names,
the model inputs of a micro-batch, what a merged checkpoint needs beside its weights, and a tiny
random checkpoint of the family's shape for CPU tests. Every command reaches a family through
:func:`family_of` (``model.family: auto``) and the :class:`Family` interface; nothing outside a
family's folder (and the original-format converter) names a family.

A :class:`Family` is a frozen dataclass built from a checkpoint's config.json: it pickles, so it
travels inside :class:`raylora.data.settings.ImageSettings` to the Ray Data actors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylora.data.templates import ChatTemplate
from raylora.families.base import (
    AUTO,
    IMAGE_COLUMNS,
    Family,
    ImageInput,
    TinyBuilder,
    checkpoint_chat_template,
    image_columns,
)

__all__ = [
    "AUTO",
    "IMAGE_COLUMNS",
    "Family",
    "ImageInput",
    "TinyBuilder",
    "chat_template",
    "checkpoint_chat_template",
    "family_of",
    "family_of_config",
    "family_of_model",
    "image_columns",
    "named_templates",
    "original_format",
    "registered",
    "tiny_builders",
]


def registered() -> list[type[Family]]:
    """Every family class, in the order they are tried."""
    from raylora.families.internvl import InternVL
    from raylora.families.qwen_vl import QwenVL

    return [InternVL, QwenVL]


def family_of_config(
    config: dict[str, Any], where: str = "config.json", model_dir: str | Path | None = None
) -> Family:
    """The family of a checkpoint's parsed config.json (read from ``model_dir`` if given)."""
    for cls in registered():
        if cls.recognises(config):
            return cls.from_config(config, model_dir)
    kind = config.get("model_type") or (config.get("architectures") or ["?"])[0]
    raise ValueError(
        f"{where}: model type {kind!r} is not a family raylora knows "
        f"({', '.join(c.name for c in registered())}); see the README's supported families"
    )


def original_format(config: dict[str, Any]) -> bool:
    """Whether a parsed config.json is a family's original remote-code format (converted once)."""
    return any(cls.original_format(config) for cls in registered())


def family_of(model_dir: str | Path) -> Family:
    """The family of a checkpoint folder, from its config.json."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    return family_of_config(config, str(path), model_dir)


def family_of_model(model: Any) -> Family:
    """The family of a loaded transformers model (or a PEFT, DeepSpeed or DDP wrapper of one)."""
    while not hasattr(getattr(model, "config", None), "to_dict") and hasattr(model, "module"):
        model = model.module
    config = model.config
    name = getattr(config, "_name_or_path", None) or None
    return family_of_config(config.to_dict(), type(model).__name__, name)


def named_templates() -> dict[str, ChatTemplate]:
    """Every named template of every family."""
    out: dict[str, ChatTemplate] = {}
    for cls in registered():
        out.update(cls.named_templates())
    return out


def chat_template(family: Family, model_dir: Path, name: str) -> ChatTemplate:
    """``model.template``: a named template, or ``auto`` (the checkpoint's own)."""
    if name in (AUTO, "", None):
        return family.default_template(Path(model_dir))
    known = named_templates()
    if name not in known:
        raise ValueError(f"unknown chat template {name!r}; valid: auto, {', '.join(known)}")
    return known[name]


def tiny_builders() -> dict[str, TinyBuilder]:
    """Every family's tiny checkpoint builders, by name (``python -m raylora.demo build --family``)."""
    from raylora.families.internvl.tiny import builders as internvl_builders
    from raylora.families.qwen_vl.tiny import builders as qwen_builders

    return {**internvl_builders(), **qwen_builders()}
