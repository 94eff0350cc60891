"""InternVL (2, 2.5, 3, 3.5): transformers' native ``InternVLForConditionalGeneration``.

Checkpoints come as transformers-native ``-hf`` folders (``model_type: internvl``, loaded as they
are) or in the original remote-code format (``internvl_chat``), converted once by
:mod:`raylora.convert`. Images are tiled (:mod:`raylora.families.internvl.tiling`): up to
``data.max_num`` square tiles matching the aspect ratio, plus a thumbnail, each
``(image_size / patch)^2 * downsample_ratio^2`` tokens between ``<img>`` and ``</img>``. Tiles travel
as uint8 and are normalised (ImageNet mean/std) on the training device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from raylora.data.templates import ChatTemplate, ImageTokens
from raylora.families.base import Family, ImageInput
from raylora.families.internvl.templates import NAMED_TOKENS, TEMPLATES, image_tokens
from raylora.families.internvl.tiling import IMAGENET_MEAN, IMAGENET_STD, normalize, num_tiles, tile_image

_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer")


@dataclass(frozen=True)
class LLMFamily:
    """What raylora needs to know about one LLM an InternVL release is built on."""

    architecture: str  # llm_config.architectures[0] of an original checkpoint
    native_model_type: str  # text_config.model_type once converted to transformers' native layout
    lora_targets: tuple[str, ...]  # linear layers of one decoder block (native names)
    template: str  # the chat template the release was trained with (original checkpoints)
    image_token_id: int | None  # <IMG_CONTEXT> of the published tokenizer (when its files do not say)


# The one table of per-LLM facts, keyed by the original LLM's model_type (also the native one for
# the LLMs only -hf checkpoints use: qwen3, gpt_oss)
LLM_FAMILIES: dict[str, LLMFamily] = {
    "internlm2": LLMFamily("InternLM2ForCausalLM", "llama", _DECODER_LINEARS, "internlm2-chat", 92546),
    "qwen2": LLMFamily("Qwen2ForCausalLM", "qwen2", _DECODER_LINEARS, "Hermes-2", 151667),
    "llama": LLMFamily("LlamaForCausalLM", "llama", _DECODER_LINEARS, "internlm2-chat", None),
    "phi3": LLMFamily(
        "Phi3ForCausalLM", "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "phi3-chat", None
    ),
    "qwen3": LLMFamily("Qwen3ForCausalLM", "qwen3", _DECODER_LINEARS, "internvl2_5", 151669),
    # InternVL3.5-GPT-OSS (-HF checkpoints): LoRA on the attention projections; the experts are fused
    # parameters, not linear layers, and stay frozen
    "gpt_oss": LLMFamily(
        "GptOssForCausalLM", "gpt_oss", ("q_proj", "k_proj", "v_proj", "o_proj"), "internvl2_5", None
    ),
}


def llm_family(model_type: str) -> LLMFamily:
    """The LLM family of a native ``text_config.model_type`` (or an original LLM model_type)."""
    try:
        return LLM_FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported InternVL LLM type {model_type!r}; raylora knows {', '.join(sorted(LLM_FAMILIES))}"
        ) from None


@dataclass(frozen=True)
class InternVL(Family):
    """A native InternVL checkpoint's facts: tile size, tokens per tile, LLM type."""

    name: ClassVar[str] = "internvl"
    projector_module: ClassVar[str] = "multi_modal_projector"
    image_size: int = 448  # tile side in pixels
    tokens_per_tile: int = 256  # (image_size / patch)^2 * downsample_ratio^2
    text_model_type: str = "qwen2"  # the LLM's native model_type

    @property
    def image_tokens(self) -> ImageTokens:  # type: ignore[override]
        return image_tokens(self.tokens_per_tile)

    @classmethod
    def recognises(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "internvl"

    @classmethod
    def original_format(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "internvl_chat"

    @classmethod
    def from_config(cls, config: dict[str, Any], model_dir: str | Path | None = None) -> InternVL:
        vision = config.get("vision_config") or {}
        size = vision.get("image_size", 448)
        patch = vision.get("patch_size", 14)
        size = size[0] if isinstance(size, list) else size
        patch = patch[0] if isinstance(patch, list) else patch
        ratio = config.get("downsample_ratio", 0.5)
        text = config.get("text_config") or {}
        llm = text.get("model_type", "llama")
        llm_family(llm)  # an LLM raylora cannot target is an error here, not at LoRA time
        return cls(
            image_size=int(size),
            tokens_per_tile=int(config.get("image_seq_length") or (size // patch) ** 2 * ratio**2),
            text_model_type=llm,
        )

    # ------------------------------------------------------------------------------ data side
    def image_units(self, width: int, height: int, options: Any) -> int:
        return num_tiles(
            width, height, self.image_size, options.min_num, options.max_num, options.use_thumbnail
        )

    def image_input(self, image: Any, options: Any) -> ImageInput:
        tiles = tile_image(image, self.image_size, options.min_num, options.max_num, options.use_thumbnail)
        return ImageInput(tiles, len(tiles))

    def describe_images(self, options: Any) -> str:
        thumb = " + thumbnail" if options.use_thumbnail else ""
        return (
            f"{options.min_num}..{options.max_num} tiles of {self.image_size} px{thumb}, "
            f"{self.tokens_per_tile} tokens each"
        )

    # -------------------------------------------------------------------------------- templates
    @classmethod
    def named_templates(cls) -> dict[str, ChatTemplate]:
        return dict(TEMPLATES)

    def default_template(self, model_dir: Path) -> ChatTemplate:
        """The checkpoint's chat template; a converted original checkpoint (no template of its own
        that raylora did not write) gets its release's template by LLM."""
        from raylora.families.base import checkpoint_chat_template

        if checkpoint_chat_template(model_dir) is not None:
            try:
                return super().default_template(model_dir)
            except ValueError:
                pass
        return TEMPLATES[llm_family(self.text_model_type).template]

    # ------------------------------------------------------------------------------ model side
    def lora_target_regex(self, config: Any, target_modules: list[str] | None, vision: bool) -> str:
        """The LLM's decoder blocks (and the vision tower's attention if asked). A bare name list
        would also hit the vision tower's q/k/v, hence the anchored regex."""
        names = target_modules or LLM_FAMILIES.get(self.text_model_type, LLM_FAMILIES["llama"]).lora_targets
        pattern = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(map(re.escape, names))})"
        if vision:
            vnames = "|".join(VISION_TARGETS)
            pattern = rf"({pattern}|.*vision_tower\.encoder\.layer\.\d+\.attention\.({vnames}))"
        return pattern

    def model_inputs(self, batch: dict[str, Any], dtype: Any) -> dict[str, Any]:
        return {"pixel_values": normalize(batch["pixel_values"], dtype)}

    def save_processor(self, out: Path, base_dir: Path, tokenizer: Any, chat_template: str) -> None:
        """transformers' InternVL processor files (processor_config.json, image and video processor
        configs, tokenizer with the chat template), so ``AutoProcessor.from_pretrained(out)`` works."""
        from transformers import AutoImageProcessor

        image_processor = None
        if (base_dir / "preprocessor_config.json").is_file() or (
            base_dir / "processor_config.json"
        ).is_file():
            try:
                image_processor = AutoImageProcessor.from_pretrained(base_dir)
            except (OSError, ValueError, KeyError):
                image_processor = None
        if image_processor is None:
            image_processor = image_processor_for(self.image_size, max_patches=12)
        write_processor_files(
            out, tokenizer, image_processor, self.image_size, self.tokens_per_tile, chat_template
        )


def with_named_tokens(tokenizer: Any) -> Any:
    """The tokenizer, naming InternVL's image tokens as transformers' InternVLProcessor reads them
    (``start_image_token``, ...): reloaded with them when it does not (a checkpoint converted before
    the converter wrote them)."""
    import tempfile

    from transformers import AutoTokenizer

    if all(getattr(tokenizer, name, None) for name in NAMED_TOKENS):
        return tokenizer
    with tempfile.TemporaryDirectory(prefix="raylora-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, **NAMED_TOKENS)


def write_processor_files(
    out: Path, tokenizer: Any, image_processor: Any, image_size: int, tokens_per_tile: int, chat_template: str
) -> None:
    """transformers' InternVL processor (its processor_config.json, image and video processor
    configs, the tokenizer with the chat template) saved in ``out``."""
    from transformers import InternVLProcessor, InternVLVideoProcessor

    tokenizer = with_named_tokens(tokenizer)
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


def image_processor_for(image_size: int, max_patches: int, cls: type | None = None, **options: Any) -> Any:
    """transformers' image processor for InternVL tiling (GotOcr2 with crop_to_patches, ImageNet stats);
    ``cls`` another GotOcr2 processor class, ``options`` more of its keywords (the data benchmark's)."""
    if cls is None:
        from transformers import GotOcr2ImageProcessor as cls

    return cls(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        **options,
    )
