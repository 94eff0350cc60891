"""Convert original InternVL2 / InternVL2.5 checkpoints to transformers' native InternVL layout.

The checkpoints OpenGVLab publishes as ``OpenGVLab/InternVL2-*`` have ``model_type: "internvl_chat"`` and
need remote code (``modeling_internvl_chat.py`` plus the LLM's own modeling file); with InternLM2 LLMs that
code does not run on transformers 5. transformers ships native classes instead
(``InternVLForConditionalGeneration`` = InternViT vision tower + MLP projector + any native LLM), so we
rewrite the weights and the config once, never executing remote code:

* vision tower (InternViT): ``vision_model.*`` -> ``model.vision_tower.*``; the fused ``attn.qkv`` is split
  into ``q_proj`` / ``k_proj`` / ``v_proj`` (thirds along dim 0), other names are renamed 1:1.
* projector: ``mlp1.{0,1,3}`` -> ``model.multi_modal_projector.{layer_norm,linear_1,linear_2}``.
* LLM: InternLM2 becomes a Llama (``wqkv`` split per KV group, renamed norms and MLP); Qwen2, Llama and
  Phi-3 are native already, so only the prefix changes (``language_model.model.`` -> ``model.language_model.``,
  ``language_model.lm_head`` -> ``lm_head``).

Tensors are streamed one at a time into size-bounded safetensors shards, so a 76B checkpoint never needs to
fit in memory. The output directory also gets the tokenizer files (InternLM2's remote-code tokenizer class
replaced by the built-in ``LlamaTokenizer``), a ``preprocessor_config.json`` for transformers' native
InternVL image processing (``GotOcr2ImageProcessor``), ``generation_config.json`` when there is one, and
``raylora_template`` in ``config.json`` plus ``raylora.json`` (the original conversation template name).

Use :func:`ensure_native` to convert on first use into a cache, or the CLI::

    python -m raylora.convert pretrained/InternVL2-2B pretrained/InternVL2-2B-native
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raylora.console import add_verbose_flag, run_command, verbose
from raylora.families.internvl import LLM_FAMILIES
from raylora.families.internvl.templates import NAMED_TOKENS
from raylora.families.internvl.tiling import IMAGENET_MEAN, IMAGENET_STD
from raylora.files import atomic_dir, cache_root, file_lock
from raylora.model import RECORD

logger = logging.getLogger(__name__)
# transformers is imported inside the functions that build configs and models (seconds at start-up).

# Bump when the output of the conversion changes, so that cached conversions are redone.
CONVERTER_VERSION = 3  # 3: the tokenizer names InternVL's image tokens (start_image_token, ...)
DEFAULT_MAX_SHARD_SIZE = "5GB"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# llm_config["architectures"][0] -> LLM family (the per-family facts live in raylora.families.internvl.LLM_FAMILIES)
ARCHITECTURES = {family.architecture: name for name, family in LLM_FAMILIES.items()}
# Defaults of the original InternLM2Config (InternLM's configuration_internlm2.py, the remote code of the
# InternLM2 checkpoints), for an llm_config that leaves keys out. The other LLMs' original configs are
# transformers' own classes (Qwen2Config, LlamaConfig) or a copy of one (Phi3Config), whose defaults the
# native classes share.
INTERNLM2_CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 103168,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None: num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "bias": True,  # biases on wqkv and wo
    "rope_theta": 10000,
}

# Files copied verbatim (when present) next to the converted weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)
OTHER_FILES = ("generation_config.json",)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class ConversionError(ValueError):
    """The checkpoint cannot be converted (unsupported variant, unknown or missing weights, bad config)."""


# --------------------------------------------------------------------------------------------- detection


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _model_type(path: str | os.PathLike) -> str | None:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        return _read_json(config_file).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_original_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a checkpoint dir in the original remote-code layout (model_type internvl_chat)."""
    return _model_type(path) == "internvl_chat"


def is_native_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a checkpoint dir that transformers' native InternVL classes load."""
    return _model_type(path) == "internvl"


def llm_family(original_config: Mapping[str, Any]) -> str:
    """The LLM family (internlm2 | qwen2 | llama | phi3) of an original InternVL config."""
    llm_config = original_config.get("llm_config") or {}
    architectures = llm_config.get("architectures") or []
    for arch in architectures:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = llm_config.get("model_type")
    if model_type in LLM_FAMILIES:
        return model_type
    raise ConversionError(
        f"unsupported InternVL LLM {architectures or model_type!r}: the converter knows "
        f"{sorted(ARCHITECTURES)}"
    )


# ------------------------------------------------------------------------------------------------ config


def llm_config_with_defaults(llm_config: Mapping[str, Any], family: str) -> dict[str, Any]:
    """``llm_config`` with the original config class's defaults filled in where keys are left out."""
    if family == "internlm2":
        return {**INTERNLM2_CONFIG_DEFAULTS, **llm_config}
    return dict(llm_config)


def _rope_parameters(llm_config: Mapping[str, Any], family: str) -> dict[str, Any]:
    """transformers-5 ``rope_parameters`` of the LLM, read from the config dict the way transformers 5 reads it.

    Configs saved by transformers 5 carry one ``rope_parameters`` dict (``rope_type``, ``rope_theta`` and the
    scaling keys: ``factor``, ``short_factor`` / ``long_factor``, ...); older ones a top-level ``rope_theta``
    and an optional ``rope_scaling`` dict (``type`` plus the scaling keys). Like transformers 5, a non-empty
    ``rope_scaling`` is read before ``rope_parameters``, and what the dict lacks comes from the top level:
    ``rope_theta`` (default 10000, as in every original LLM config class) and ``partial_rotary_factor``.
    """
    scaling = llm_config.get("rope_scaling") or llm_config.get("rope_parameters") or {}
    if not isinstance(scaling, Mapping) or any(isinstance(v, Mapping) for v in scaling.values()):
        raise ConversionError(
            f"unsupported rope_scaling / rope_parameters {scaling!r}: expected one dict for all layers"
        )
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if family == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi-3's legacy names for LongRoPE (as transformers' Phi3Config maps them)
    params: dict[str, Any] = {"rope_type": rope_type, **scaling}
    if rope_type == "longrope":
        if family == "phi3":
            # Phi-3 keeps it as a top-level field (default 4096), which both the original Phi3Config and
            # transformers 5's use, even over a value inside the rope dict
            params["original_max_position_embeddings"] = llm_config.get(
                "original_max_position_embeddings", 4096
            )
        elif "original_max_position_embeddings" not in params:
            params["original_max_position_embeddings"] = llm_config.get(
                "original_max_position_embeddings", llm_config.get("max_position_embeddings")
            )
    rope_theta = params.get("rope_theta")
    if rope_theta is None:
        rope_theta = llm_config.get("rope_theta")
    params["rope_theta"] = float(10000.0 if rope_theta is None else rope_theta)
    if "partial_rotary_factor" in llm_config:
        params.setdefault("partial_rotary_factor", llm_config["partial_rotary_factor"])
    return params


def _set_dtype(config: Any, original: Mapping[str, Any]) -> None:
    """Carry the original ``torch_dtype`` over, so that ``from_pretrained(dtype="auto")`` keeps it."""
    name = original.get("torch_dtype") or original.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(dtype, torch.dtype):
        config.dtype = dtype


def convert_text_config(llm_config: Mapping[str, Any], family: str | None = None) -> Any:
    """The native transformers config of the LLM (LlamaConfig for InternLM2, else the LLM's own class)."""
    from transformers import CONFIG_MAPPING, LlamaConfig, PreTrainedConfig

    family = family or llm_family({"llm_config": llm_config})
    if family == "internlm2":
        llm = llm_config_with_defaults(llm_config, family)
        hidden_size = llm["hidden_size"]
        num_heads = llm["num_attention_heads"]
        config = LlamaConfig(
            vocab_size=llm["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=llm["intermediate_size"],
            num_hidden_layers=llm["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=llm["num_key_value_heads"] or num_heads,
            head_dim=hidden_size // num_heads,
            hidden_act=llm["hidden_act"],
            max_position_embeddings=llm["max_position_embeddings"],
            initializer_range=llm["initializer_range"],
            rms_norm_eps=llm["rms_norm_eps"],
            pad_token_id=llm["pad_token_id"],
            bos_token_id=llm["bos_token_id"],
            eos_token_id=llm["eos_token_id"],
            rope_parameters=_rope_parameters(llm, family),
            attention_bias=bool(llm["bias"]),  # InternLM2 `bias` covers wqkv and wo
            mlp_bias=False,  # InternLM2's feed_forward never has biases
            tie_word_embeddings=False,
        )
    else:
        config_class = CONFIG_MAPPING[LLM_FAMILIES[family].native_model_type]
        # Only the class's own fields: the original nested config also carries every generation default of
        # transformers 4.3x (temperature, top_k, num_beams, ...) which do not belong in a model config.
        base_fields = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        own_fields = {f.name for f in dataclasses.fields(config_class)} - base_fields
        kwargs = {k: v for k, v in llm_config.items() if k in own_fields}
        kwargs["rope_parameters"] = _rope_parameters(llm_config, family)
        kwargs["tie_word_embeddings"] = False  # lm_head is always written out (see convert_checkpoint)
        config = config_class(**kwargs)
    _set_dtype(config, llm_config)
    return config


def convert_vision_config(vision_config: Mapping[str, Any]) -> Any:
    """``InternVLVisionConfig`` from the original ``InternVisionConfig`` dict."""
    from transformers import InternVLVisionConfig

    vc = vision_config
    use_qk_norm = bool(vc.get("qk_normalization", True))
    layer_norm_eps = vc.get("layer_norm_eps", 1e-6)
    if use_qk_norm and abs(layer_norm_eps - 1e-6) > 1e-12:
        logger.warning(
            "InternViT q/k norm eps is %s but the native InternVL q/k RMSNorm uses 1e-6", layer_norm_eps
        )
    config = InternVLVisionConfig(
        hidden_size=vc["hidden_size"],
        intermediate_size=vc["intermediate_size"],
        num_attention_heads=vc["num_attention_heads"],
        num_hidden_layers=vc["num_hidden_layers"],
        image_size=vc.get("image_size", 224),  # InternVisionConfig's default
        patch_size=vc.get("patch_size", 14),
        num_channels=vc.get("num_channels", 3),
        attention_bias=bool(vc.get("qkv_bias", False)),
        use_qk_norm=use_qk_norm,
        norm_type=vc.get("norm_type", "rms_norm"),
        layer_norm_eps=layer_norm_eps,
        hidden_act=vc.get("hidden_act", "gelu"),
        layer_scale_init_value=vc.get("initializer_factor", 0.1),  # InternViT's ls1/ls2 init value
        initializer_range=vc.get("initializer_range", 0.02),
        attention_dropout=vc.get("attention_dropout", 0.0),
        projection_dropout=vc.get("dropout", 0.0),  # InternViT applies `dropout` after attn.proj
        hidden_dropout_prob=0.0,
        use_mean_pooling=True,  # no final layernorm, like InternViT
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        # drop_path_rate (stochastic depth) and use_flash_attn have no native counterpart: drop path is
        # training-only regularisation, the attention kernel is chosen at load time.
    )
    _set_dtype(config, vc)
    return config


def _image_size(original_config: Mapping[str, Any]) -> int:
    # what InternVLChatModel uses: force_image_size, else the vision config's (InternVisionConfig default 224)
    size = original_config.get("force_image_size") or original_config["vision_config"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _patch_size(original_config: Mapping[str, Any]) -> int:
    size = original_config["vision_config"].get("patch_size", 14)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def convert_config(original_config: Mapping[str, Any], image_token_id: int) -> Any:
    """The native ``InternVLConfig`` of an original ``internvl_chat`` config dict.

    ``image_token_id`` is the id of ``<IMG_CONTEXT>`` in the checkpoint's tokenizer (see
    :func:`find_image_token_id`). The original conversation template name and the dynamic-tiling settings are
    kept as ``raylora_template`` / ``raylora_original`` (plain extra config attributes).
    """
    from transformers import InternVLConfig

    if original_config.get("model_type") != "internvl_chat":
        raise ConversionError(
            f"not an original InternVL config: model_type={original_config.get('model_type')!r}"
        )
    ps_version = original_config.get("ps_version", "v1")
    if ps_version != "v2":
        # The native pixel_shuffle always does the v2 transpose; v1 models would silently get scrambled tokens.
        raise ConversionError(
            f"ps_version={ps_version!r} is not supported by the native InternVL (only 'v2')"
        )
    family = llm_family(original_config)
    text_config = convert_text_config(original_config["llm_config"], family)
    vision_config = convert_vision_config(original_config["vision_config"])
    if not 0 <= image_token_id < text_config.vocab_size:
        raise ConversionError(
            f"image token id {image_token_id} outside the LLM vocab ({text_config.vocab_size})"
        )

    downsample_ratio = float(original_config.get("downsample_ratio", 0.5))
    image_size, patch_size = _image_size(original_config), _patch_size(original_config)
    image_seq_length = int((image_size // patch_size) ** 2 * downsample_ratio**2)  # num_image_token
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=int(original_config.get("select_layer", -1)),
        vision_feature_select_strategy="default",  # drop the CLS token, like the original extract_feature
        tie_word_embeddings=False,
        raylora_template=original_config.get("template"),
        raylora_original={
            "llm_architecture": (original_config["llm_config"].get("architectures") or [None])[0],
            "llm_family": family,
            "template": original_config.get("template"),
            "force_image_size": image_size,
            "dynamic_image_size": original_config.get("dynamic_image_size", False),
            "use_thumbnail": original_config.get("use_thumbnail", False),
            "min_dynamic_patch": original_config.get("min_dynamic_patch", 1),
            "max_dynamic_patch": original_config.get("max_dynamic_patch", 6),
            "ps_version": ps_version,
            "converter_version": CONVERTER_VERSION,
        },
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    _set_dtype(config, original_config)
    return config


# ----------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class KeyMapSpec:
    """What the per-tensor mapping needs to know about the model (only InternLM2's wqkv split uses heads)."""

    llm_family: str
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0

    @classmethod
    def from_original_config(cls, original_config: Mapping[str, Any]) -> KeyMapSpec:
        family = llm_family(original_config)
        llm = llm_config_with_defaults(original_config["llm_config"], family)
        heads = int(llm["num_attention_heads"])
        return cls(
            llm_family=family,
            num_attention_heads=heads,
            num_key_value_heads=int(llm.get("num_key_value_heads") or heads),
            head_dim=int(llm.get("head_dim") or llm["hidden_size"] // heads),
        )


def split_internlm2_wqkv(
    wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused ``attention.wqkv`` weight (or bias) into q, k, v.

    The rows form ``num_kv_heads`` groups of ``heads_per_group + 2`` blocks of ``head_dim`` rows each: the
    group's query heads, then its key head, then its value head. Query head ``g * heads_per_group + i`` is
    row block ``i`` of group ``g``, which is the order Llama's grouped-query attention expects.
    """
    if num_heads % num_kv_heads:
        raise ConversionError(f"{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
    per_group = num_heads // num_kv_heads
    expected_rows = num_kv_heads * (per_group + 2) * head_dim
    if wqkv.shape[0] != expected_rows:
        raise ConversionError(f"wqkv has {wqkv.shape[0]} rows, expected {expected_rows}")
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(num_kv_heads, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, per_group].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(num_kv_heads * head_dim, *rest)
    return _own(q), _own(k), _own(v)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares no storage with the fused source (safetensors refuses shared tensors)."""
    return t.clone(memory_format=torch.contiguous_format)


_VISION_EMBEDDINGS = {
    "class_embedding": "cls_token",
    "position_embedding": "position_embeddings",
    "patch_embedding.weight": "patch_embeddings.projection.weight",
    "patch_embedding.bias": "patch_embeddings.projection.bias",
}
_VISION_LAYER = [  # (original sub-name, native sub-name) inside vision_model.encoder.layers.N.
    ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."),
    ("attn.k_norm.", "attention.k_norm."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]
_PROJECTOR = {"mlp1.0.": "layer_norm.", "mlp1.1.": "linear_1.", "mlp1.3.": "linear_2."}
_INTERNLM2_LAYER = [  # (original, native) inside language_model.model.layers.N.
    ("attention.wo.", "self_attn.o_proj."),
    ("feed_forward.w1.", "mlp.gate_proj."),
    ("feed_forward.w3.", "mlp.up_proj."),
    ("feed_forward.w2.", "mlp.down_proj."),
    ("attention_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
]
_VISION_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_LLM_LAYER_RE = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
_SKIPPED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # non-persistent buffers some old saves contain


def convert_state_dict_key_and_tensor(
    name: str, tensor: torch.Tensor, spec: KeyMapSpec
) -> list[tuple[str, torch.Tensor]]:
    """Map one original tensor to its native name(s) and tensor(s); fused tensors are split.

    Returns an empty list for tensors that are deliberately dropped (rotary ``inv_freq`` buffers) and raises
    :class:`ConversionError` for names it does not know, so that no weight is ever silently lost.
    """
    if _SKIPPED_RE.search(name):
        return []

    # ---- vision tower
    if name.startswith("vision_model.embeddings."):
        sub = name[len("vision_model.embeddings.") :]
        if sub in _VISION_EMBEDDINGS:
            return [(f"model.vision_tower.embeddings.{_VISION_EMBEDDINGS[sub]}", tensor)]
    elif m := _VISION_LAYER_RE.match(name):
        layer, sub = m.groups()
        prefix = f"model.vision_tower.encoder.layer.{layer}."
        if sub in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = sub.rsplit(".", 1)[1]
            if tensor.shape[0] % 3:
                raise ConversionError(f"{name}: {tensor.shape[0]} rows are not divisible by 3")
            q, k, v = torch.chunk(tensor, 3, dim=0)
            return [(f"{prefix}attention.{p}_proj.{kind}", _own(t)) for p, t in zip("qkv", (q, k, v))]
        if sub == "ls1":
            return [(prefix + "lambda_1", tensor)]
        if sub == "ls2":
            return [(prefix + "lambda_2", tensor)]
        for old, new in _VISION_LAYER:
            if sub.startswith(old):
                return [(prefix + new + sub[len(old) :], tensor)]

    # ---- projector
    elif name.startswith("mlp1."):
        for old, new in _PROJECTOR.items():
            if name.startswith(old):
                return [("model.multi_modal_projector." + new + name[len(old) :], tensor)]

    # ---- language model
    elif spec.llm_family == "internlm2":
        if name == "language_model.model.tok_embeddings.weight":
            return [("model.language_model.embed_tokens.weight", tensor)]
        if name == "language_model.model.norm.weight":
            return [("model.language_model.norm.weight", tensor)]
        if name == "language_model.output.weight":
            return [("lm_head.weight", tensor)]
        if m := _LLM_LAYER_RE.match(name):
            layer, sub = m.groups()
            prefix = f"model.language_model.layers.{layer}."
            if sub in ("attention.wqkv.weight", "attention.wqkv.bias"):
                kind = sub.rsplit(".", 1)[1]
                q, k, v = split_internlm2_wqkv(
                    tensor, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
                )
                return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
            for old, new in _INTERNLM2_LAYER:
                if sub.startswith(old):
                    return [(prefix + new + sub[len(old) :], tensor)]
    else:  # qwen2 / llama / phi3: native already, only the prefix changes
        if name.startswith("language_model.model."):
            return [("model.language_model." + name[len("language_model.model.") :], tensor)]
        if name.startswith("language_model.lm_head."):
            return [("lm_head." + name[len("language_model.lm_head.") :], tensor)]

    raise ConversionError(f"unknown weight {name!r} for an InternVL checkpoint with a {spec.llm_family} LLM")


def convert_tensors(
    items: Iterable[tuple[str, torch.Tensor]], spec: KeyMapSpec
) -> Iterator[tuple[str, torch.Tensor]]:
    """Lazily map ``(original name, tensor)`` pairs to native ``(name, tensor)`` pairs."""
    for name, tensor in items:
        yield from convert_state_dict_key_and_tensor(name, tensor, spec)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], original_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Convert a whole in-memory original state dict (small models and tests; big ones stream instead)."""
    return dict(convert_tensors(state_dict.items(), KeyMapSpec.from_original_config(original_config)))


def _weight_files(src: Path) -> list[Path]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (src / index_name).is_file():
            weight_map = _read_json(src / index_name)["weight_map"]
            return [src / f for f in sorted(set(weight_map.values()))]
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (src / single).is_file():
            return [src / single]
    raise ConversionError(f"no {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or {BIN_SINGLE} in {src}")


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``pytorch_model.bin`` file, unpickled with ``weights_only=True`` only.

    A pickle that holds anything but tensors and plain containers (a class, a function: unpickling
    it could run code) is refused with a :class:`ConversionError`; it is never retried unrestricted.
    """
    try:
        try:  # mmap keeps only the tensors in use resident (zip-format .bin files)
            state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else str(e).strip().splitlines()[0]
        raise ConversionError(
            f"{file}: refused to load: its pickle holds more than tensors ({what}), and unpickling it "
            "could execute code. Use the checkpoint's safetensors files, or convert this file to "
            "safetensors yourself only if you trust its source."
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise ConversionError(f"{file}: expected a dict of tensors, found {type(state_dict).__name__}")
    return state_dict


def iter_checkpoint_tensors(src: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, tensor)`` from a checkpoint's safetensors or pytorch_model.bin shards, one at a time."""
    from safetensors import safe_open

    for file in _weight_files(Path(src)):
        if file.name.endswith(".safetensors"):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state_dict = load_bin(file)
            names = list(state_dict)
            for name in names:
                yield name, state_dict.pop(name)
            del state_dict


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB`` / ``500MB`` / ``2GiB`` / an int (decimal units like transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {size!r}: use e.g. 5GB, 500MB or a number of bytes")
    number, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(number * base**power)


class _ShardWriter:
    """Accumulates tensors and writes size-bounded safetensors shards plus the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.pending_storages: set[int] = set()
        self.shards: list[list[str]] = []  # names per written shard
        self.location: dict[str, int] = {}  # name -> shard number (0-based)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.location or name in self.pending:
            raise ConversionError(f"two original weights map to {name!r}")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        storage = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or (storage in self.pending_storages and tensor.numel()):
            tensor = _own(tensor)  # e.g. tied weights stored once in a .bin file
            storage = tensor.untyped_storage().data_ptr()
        self.pending_storages.add(storage)
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        number = len(self.shards)
        save_file(self.pending, str(self._tmp_name(number)), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        for name in self.pending:
            self.location[name] = number
        self.pending, self.pending_bytes, self.pending_storages = {}, 0, set()

    def get(self, name: str) -> torch.Tensor:
        """A tensor already added (from memory or read back from its shard)."""
        from safetensors import safe_open

        if name in self.pending:
            return self.pending[name]
        with safe_open(str(self._tmp_name(self.location[name])), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    @property
    def names(self) -> set[str]:
        return set(self.location) | set(self.pending)

    def _tmp_name(self, number: int) -> Path:
        return self.out_dir / f"shard-{number:05d}.safetensors.partial"

    def finish(self) -> list[str]:
        """Flush, give shards their final names and write the index; returns the weight file names."""
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise ConversionError("the checkpoint has no weights")
        if n == 1:
            final = [SAFE_SINGLE]
        else:
            final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, file_name in enumerate(final):
            os.replace(self._tmp_name(i), self.out_dir / file_name)
        if n > 1:
            weight_map = {name: final[i] for i, names in enumerate(self.shards) for name in names}
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return final


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the native model, from a meta-device instance (no memory, fast)."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ------------------------------------------------------------------------------------- tokenizer & files


def _added_token_ids(src: Path) -> dict[str, int]:
    """content -> id for every token the tokenizer files declare (added tokens and, last, the base vocab)."""
    tokens: dict[str, int] = {}
    if (src / "added_tokens.json").is_file():
        tokens.update({str(k): int(v) for k, v in _read_json(src / "added_tokens.json").items()})
    if (src / "tokenizer_config.json").is_file():
        decoder = _read_json(src / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for token_id, token in decoder.items():
            content = token.get("content") if isinstance(token, dict) else token
            if content is not None:
                tokens[str(content)] = int(token_id)
    if (src / "tokenizer.json").is_file():
        tokenizer_json = _read_json(src / "tokenizer.json")
        for token in tokenizer_json.get("added_tokens") or []:
            tokens[token["content"]] = int(token["id"])
        vocab = (tokenizer_json.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            for content, token_id in vocab.items():
                tokens.setdefault(content, int(token_id))
    return tokens


def find_image_token_id(src: str | os.PathLike, family: str | None = None) -> int:
    """Id of ``<IMG_CONTEXT>`` read from the checkpoint's tokenizer files.

    Falls back to the published ids (92546 for InternLM2, 151667 for Qwen2.5) only if no tokenizer file
    names the token; for other LLMs that is an error.
    """
    src = Path(src)
    token_id = _added_token_ids(src).get(IMG_CONTEXT_TOKEN)
    if token_id is not None:
        return token_id
    fallback = LLM_FAMILIES[family].image_token_id if family in LLM_FAMILIES else None
    if fallback is not None:
        logger.warning(
            "%s not found in the tokenizer files of %s; using the published id %d for %s",
            IMG_CONTEXT_TOKEN,
            src,
            fallback,
            family,
        )
        return fallback
    raise ConversionError(f"{IMG_CONTEXT_TOKEN} not found in the tokenizer files of {src}")


def _sentencepiece_adds_dummy_prefix(model_file: Path) -> bool | None:
    """``normalizer_spec.add_dummy_prefix`` of a sentencepiece model (None if it cannot be read)."""
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        proto = import_protobuf().ModelProto()
        proto.ParseFromString(model_file.read_bytes())
        return bool(proto.normalizer_spec.add_dummy_prefix)
    except Exception as e:  # protobuf missing or a file that is not a sentencepiece model
        logger.warning("could not read %s as a sentencepiece model (%s)", model_file, e)
        return None


def _rewrite_tokenizer_config(out_dir: Path) -> None:
    """Make ``tokenizer_config.json`` loadable by a built-in transformers class, without remote code."""
    config_file = out_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return
    tokenizer_config = _read_json(config_file)
    changed = tokenizer_config.pop("auto_map", None) is not None  # never point at remote code
    for name, token in NAMED_TOKENS.items():  # what transformers' InternVLProcessor reads
        if tokenizer_config.get(name) != token:
            tokenizer_config[name] = token
            changed = True
    tokenizer_class = str(tokenizer_config.get("tokenizer_class") or "")
    if tokenizer_class.startswith("InternLM2Tokenizer"):
        # InternLM2Tokenizer(Fast) lives in the checkpoint's remote code (tokenization_internlm2*.py). It is a
        # plain sentencepiece BPE model with byte fallback, <unk>/<s>/</s> at ids 0/1/2, BOS added and no
        # EOS -- what transformers' built-in LlamaTokenizer builds from tokenizer.model, so we name that
        # class. The added tokens (<img>, <IMG_CONTEXT>, <|im_start|>, ...) stay in added_tokens_decoder.
        # InternLM2Tokenizer calls sentencepiece's encode() on every text span between special tokens, so
        # each span gets the model's dummy "▁" prefix if (and only if) tokenizer.model asks for one
        # (normalizer_spec.add_dummy_prefix): add_prefix_space mirrors that flag, and legacy=True makes
        # LlamaTokenizer prepend it to every span ("always") rather than only to the first one. If the file
        # cannot be parsed we assume no prefix, which is what transformers' own InternVL conversion script
        # uses for InternLM2 (prepend_scheme "never").
        # Loading a tokenizer.model needs the `sentencepiece` package, as for any Llama tokenizer.
        dummy_prefix = False
        if (out_dir / "tokenizer.model").is_file():
            read = _sentencepiece_adds_dummy_prefix(out_dir / "tokenizer.model")
            dummy_prefix = False if read is None else read
        if (out_dir / "tokenizer.model").is_file() and not (out_dir / "tokenizer.json").is_file():
            if importlib.util.find_spec("sentencepiece") is None:
                logger.warning(
                    "the converted InternLM2 tokenizer is a sentencepiece tokenizer.model: loading it needs "
                    "the `sentencepiece` package (pip install sentencepiece), which is not installed here"
                )
        tokenizer_config["tokenizer_class"] = "LlamaTokenizer"
        tokenizer_config["add_prefix_space"] = dummy_prefix
        tokenizer_config["legacy"] = True
        tokenizer_config.pop("decode_with_prefix_space", None)  # InternLM2Tokenizer-only option
        changed = True
    if changed:
        config_file.write_text(
            json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def image_processor_config(original_config: Mapping[str, Any]) -> dict[str, Any]:
    """``preprocessor_config.json`` for transformers' native InternVL image processing (GotOcr2).

    Same tiling as the original ``dynamic_preprocess`` (aspect-ratio tiles of ``force_image_size`` pixels
    plus a thumbnail when there is more than one tile), bicubic resize, ImageNet mean/std.
    """
    size = _image_size(original_config)
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": bool(original_config.get("dynamic_image_size", True)),
        "min_patches": int(original_config.get("min_dynamic_patch", 1)),
        "max_patches": int(original_config.get("max_dynamic_patch", 12)),
        "size": {"height": size, "width": size},
        "do_resize": True,
        "resample": 3,  # PIL bicubic, like the original T.Resize(..., BICUBIC)
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


# ------------------------------------------------------------------------------------------- conversion


@dataclass
class ConversionSummary:
    path: Path
    llm_family: str
    text_model_type: str
    num_tensors: int
    total_bytes: int
    weight_files: list[str]


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _convert(src: Path, dst: Path, max_shard_size: int | str, overwrite: bool) -> ConversionSummary:
    src, dst = Path(src), Path(dst)
    if not is_original_checkpoint(src):
        raise ConversionError(
            f"{src} is not an original InternVL checkpoint (config.json model_type internvl_chat)"
        )
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    if _is_nonempty_dir(dst) and not overwrite:
        raise FileExistsError(f"{dst} is not empty (pass overwrite=True / --overwrite to replace it)")
    if dst.resolve() == src.resolve():
        raise ConversionError("source and destination are the same directory")

    original_config = _read_json(src / "config.json")
    family = llm_family(original_config)
    spec = KeyMapSpec.from_original_config(original_config)
    config = convert_config(original_config, find_image_token_id(src, family))
    expected = _expected_shapes(config)

    with atomic_dir(dst, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, parse_size(max_shard_size))
        for name, tensor in convert_tensors(iter_checkpoint_tensors(src), spec):
            if name not in expected:
                raise ConversionError(f"converted weight {name!r} has no place in the native model")
            if tuple(tensor.shape) != expected[name]:
                raise ConversionError(
                    f"{name}: shape {tuple(tensor.shape)}, native model expects {expected[name]}"
                )
            writer.add(name, tensor)
        missing = set(expected) - writer.names
        if missing == {"lm_head.weight"} and original_config["llm_config"].get("tie_word_embeddings"):
            # Tied LLM saved without an lm_head: write a copy (the native config is always untied).
            writer.add("lm_head.weight", _own(writer.get("model.language_model.embed_tokens.weight")))
            missing = set()
        if missing:
            shown = ", ".join(sorted(missing)[:8])
            raise ConversionError(f"{len(missing)} native weights missing from {src}: {shown}")
        weight_files = writer.finish()

        config.save_pretrained(tmp)
        for file_name in TOKENIZER_FILES + OTHER_FILES:
            if (src / file_name).is_file():
                shutil.copy2(src / file_name, tmp / file_name)
        _rewrite_tokenizer_config(tmp)
        if original_config.get("template"):
            # the same record raylora's demo model has (raylora.sources reads it), besides config.json's entry
            (tmp / RECORD).write_text(json.dumps({"template": original_config["template"]}) + "\n")
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(image_processor_config(original_config), indent=2) + "\n", encoding="utf-8"
        )
    return ConversionSummary(
        path=dst,
        llm_family=family,
        text_model_type=config.text_config.model_type,
        num_tensors=len(expected),
        total_bytes=writer.total_bytes,
        weight_files=weight_files,
    )


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert the original InternVL checkpoint ``src`` into a native checkpoint directory ``dst``.

    Writes sharded safetensors (``max_shard_size`` per file, decimal units) with an index, ``config.json``,
    the tokenizer files, ``preprocessor_config.json`` and ``generation_config.json`` if the source has one.
    Everything is written to a temporary directory next to ``dst`` that is renamed at the end, so ``dst`` is
    either absent or complete. A non-empty ``dst`` is refused unless ``overwrite``.
    """
    return _convert(Path(src), Path(dst), max_shard_size, overwrite).path


# ------------------------------------------------------------------------------------------------ cache


def default_cache_dir() -> Path:
    """``<raylora cache>/converted``."""
    return cache_root() / "converted"


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """Short hash of an original checkpoint: config, weights index and weight files' sizes and mtimes.

    The sizes and mtimes distinguish two checkpoints with identical config and index (a fine-tune saved in
    the original layout has both in common with its base model).
    """
    path = Path(path)
    h = hashlib.sha256(f"raylora-convert-v{CONVERTER_VERSION}\n".encode())
    h.update((path / "config.json").read_bytes())
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (path / index_name).is_file():
            h.update((path / index_name).read_bytes())
    for file in _weight_files(path):
        stat = file.stat()
        h.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def ensure_native(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A native InternVL checkpoint dir for ``path``, converting an original checkpoint once into a cache.

    * native checkpoint (model_type internvl): ``path`` itself;
    * original checkpoint (model_type internvl_chat): ``<cache_dir>/<name>-<fingerprint>``, converted on the
      first call (one log line) and reused afterwards. ``cache_dir`` defaults to :func:`default_cache_dir`.
      Concurrent callers on one machine wait for a single conversion (file lock).
    """
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a checkpoint directory (no config.json); download the model first, e.g. "
            f"`huggingface-cli download OpenGVLab/InternVL2-2B --local-dir {path}`"
        )
    if is_native_checkpoint(path):
        return path
    if not is_original_checkpoint(path):
        raise ConversionError(
            f"{path} is neither a native InternVL checkpoint (model_type internvl) nor an original one "
            f"(model_type internvl_chat): model_type={_model_type(path)!r}"
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / f"{path.resolve().name}-{checkpoint_fingerprint(path)}"
    if is_native_checkpoint(target):
        return target
    with file_lock(cache / f".{target.name}.lock"):
        if is_native_checkpoint(target):  # converted by another process while we waited
            return target
        logger.info("converting original InternVL checkpoint %s -> %s (once)", path, target)
        convert_checkpoint(path, target, overwrite=True)  # a leftover non-native dir there is garbage
    return target


# -------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raylora.convert",
        description=(
            "Convert an original InternVL2/InternVL2.5 checkpoint (config.json model_type 'internvl_chat', "
            "remote code) into transformers' native InternVL layout (InternVLForConditionalGeneration): "
            "sharded safetensors, config.json, tokenizer files, preprocessor_config.json. Supports "
            "InternLM2 (converted to Llama), Qwen2, Llama and Phi-3 LLMs. No remote code is executed."
        ),
    )
    parser.add_argument(
        "src", type=Path, help="original checkpoint directory (e.g. a download of OpenGVLab/InternVL2-2B)"
    )
    parser.add_argument("dst", type=Path, help="output directory for the native checkpoint")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="maximum size of one safetensors file, e.g. 5GB or 500MB (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)

    if _is_nonempty_dir(args.dst) and not args.overwrite:
        parser.error(f"destination {args.dst} is not empty; pass --overwrite to replace it")
    try:
        parse_size(args.max_shard_size)
    except ValueError as e:
        parser.error(str(e))
    return run_command(
        lambda: _report(args),
        codes=[((ConversionError, FileExistsError, FileNotFoundError), 1)],
        command="convert",
        verbose_flag=args.verbose,
    )


def _report(args: argparse.Namespace) -> None:
    # the conversion's own progress lines (INFO); other libraries' INFO records only with --verbose
    level = logging.INFO if verbose() else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    summary = _convert(args.src, args.dst, args.max_shard_size, args.overwrite)
    size = summary.total_bytes
    shown = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
    print(
        f"converted {summary.num_tensors} tensors ({shown} in "
        f"{len(summary.weight_files)} file(s)); LLM family {summary.llm_family} -> native "
        f"{summary.text_model_type}; wrote {summary.path}"
    )


if __name__ == "__main__":
    sys.exit(main())
