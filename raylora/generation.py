"""Batched captioning with left padding, greedy or beam search: the one generation path used by
evaluation, training-time validation, sweeps and ``raylora.caption``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from raylora.config import EvalConfig
from raylora.data.pipeline import ImageSettings
from raylora.data.templates import ConversationTokenizer
from raylora.families import IMAGE_COLUMNS, family_of_model, image_columns

# torch is imported inside the functions: modules that only build prompts do not pay for it.


@dataclass(frozen=True)
class GenerationSettings:
    """The captioning protocol (prompt, decoding, caption length) and the images per generate call."""

    prompt: str = "Provide a one-sentence caption for the provided image."
    min_new_tokens: int = 8
    max_new_tokens: int = 30
    batch_size: int = 16
    num_beams: int = 1  # 1: greedy (the tutorial's protocol); N > 1: beam search with N beams
    temperature: float = 0.0  # 0: no sampling; > 0: sampled at this temperature (serving)

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.batch_size < 1:
            raise ValueError(
                f"num_beams and batch_size must be >= 1, got {self.num_beams}, {self.batch_size}"
            )

    @classmethod
    def from_config(cls, e: EvalConfig) -> GenerationSettings:
        """The ``eval`` section's protocol (evaluation and training-time validation)."""
        return cls(e.prompt, e.min_new_tokens, e.max_new_tokens, e.batch_size, e.num_beams)

    @property
    def decoding(self) -> str:
        """``greedy`` or ``beam N``."""
        return "greedy" if self.num_beams == 1 else f"beam {self.num_beams}"

    def protocol(self) -> dict[str, Any]:
        """What decides the captions (for metrics.json, MLflow params, the gallery)."""
        return {
            "decoding": self.decoding,
            "num_beams": self.num_beams,
            "min_new_tokens": self.min_new_tokens,
            "max_new_tokens": self.max_new_tokens,
            "prompt": self.prompt,
        }

    def describe(self) -> str:
        """One line: ``greedy, 8-30 new tokens, prompt '...'``."""
        return (
            f"{self.decoding}, {self.min_new_tokens}-{self.max_new_tokens} new tokens, prompt {self.prompt!r}"
        )


def prompt_batch(
    conv_tok: ConversationTokenizer,
    settings: ImageSettings,
    paths: Sequence[str | BinaryIO],
    prompt: str,
) -> dict[str, np.ndarray]:
    """Pixels (and patch grids) + left-padded prompt ids for a list of images (paths or binary file
    objects, each read once)."""
    images = [settings.image_input(p) for p in paths]
    ids = [conv_tok.encode_prompt(prompt, [im.units]) for im in images]
    pad = conv_tok.tokenizer.pad_token_id or 0
    width = max(len(i) for i in ids)
    input_ids = np.full((len(ids), width), pad, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return {**image_columns(images), "input_ids": input_ids, "attention_mask": mask}


def generate_batch(
    model: Any,
    conv_tok: ConversationTokenizer,
    batch: dict[str, np.ndarray],
    gen: GenerationSettings,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy (``gen.num_beams == 1``) or beam-search decoding of one prompt batch; returns the
    stripped captions (batched output equals batch-1 output: left padding, masked)."""
    import torch

    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    input_ids = torch.from_numpy(batch["input_ids"]).to(device)
    images = {k: torch.from_numpy(np.asarray(batch[k])).to(device) for k in IMAGE_COLUMNS if k in batch}
    images["input_ids"] = input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.from_numpy(batch["attention_mask"]).to(device),
            **family_of_model(model).model_inputs(images, dtype),
            do_sample=gen.temperature > 0,
            **({"temperature": gen.temperature} if gen.temperature > 0 else {}),
            num_beams=gen.num_beams,
            min_new_tokens=gen.min_new_tokens,
            max_new_tokens=gen.max_new_tokens,
            eos_token_id=conv_tok.stop_token_ids(),
            pad_token_id=conv_tok.tokenizer.pad_token_id or 0,
            synced_gpus=synced_gpus,
        )
    new = out[:, input_ids.shape[1] :]
    return [t.strip() for t in conv_tok.tokenizer.batch_decode(new, skip_special_tokens=True)]


def generate_captions(
    model: Any,
    conv_tok: ConversationTokenizer,
    settings: ImageSettings,
    paths: Sequence[str | BinaryIO],
    gen: GenerationSettings,
    synced_gpus: bool = False,
    progress: Any = None,
) -> list[str]:
    """Captions for ``paths`` (image paths or binary file objects) in order, ``gen.batch_size`` at a time."""
    was_training = model.training
    model.eval()
    captions: list[str] = []
    for start in range(0, len(paths), gen.batch_size):
        chunk = paths[start : start + gen.batch_size]
        captions += generate_batch(
            model, conv_tok, prompt_batch(conv_tok, settings, chunk, gen.prompt), gen, synced_gpus
        )
        if progress is not None:
            progress(len(captions), len(paths))
    if was_training:
        model.train()
    return captions
