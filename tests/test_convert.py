"""Tests for raylora.convert: original (remote-code) InternVL checkpoints -> native transformers layout.

No hub access and no remote code: each test checkpoint starts as a tiny *native* InternVLForConditionalGeneration
with random weights, which is written back in the *original* key layout (the inverse mapping, implemented here
independently of raylora.convert) with an original-style config.json and tokenizer files. Converting it must
give back exactly the native tensors, and the converted model must produce the same logits.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from raylora import convert
from raylora.convert import (
    ConversionError,
    KeyMapSpec,
    convert_checkpoint,
    convert_config,
    convert_state_dict_key_and_tensor,
    ensure_native,
    is_original_checkpoint,
    split_internlm2_wqkv,
)

VOCAB = 128
IMG_CONTEXT_ID = 120
IMAGE_SIZE, PATCH = 56, 14  # 4x4 patches -> 4 image tokens per tile after the 0.5 pixel shuffle
TOKENS_PER_TILE = 4
HEADS, KV_HEADS, HIDDEN = 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
ARCH = {
    "internlm2": "InternLM2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",  # InternVL3.5
}
TEMPLATE = {
    "internlm2": "internlm2-chat",
    "qwen2": "internvl2_5",
    "phi3": "phi3-chat",
    "qwen3": "internvl2_5",
}


# --------------------------------------------------------------------------------------- tiny models


def _text_config(family: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if family == "internlm2":  # what an InternLM2 becomes: a Llama
        common["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
        return LlamaConfig(**{**common, **overrides})
    if family == "qwen2":
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
        return Qwen2Config(**{**common, **overrides})
    if family == "qwen3":  # q/k norms, an explicit head_dim
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
        return Qwen3Config(**{**common, "head_dim": HEAD_DIM, **overrides})
    common["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    return Phi3Config(**{**common, **overrides})


def _vision_config(vit_6b: bool) -> InternVLVisionConfig:
    # InternViT-300M: layer norm, qkv bias, no q/k norm. InternViT-6B: RMS norm, no qkv bias, q/k norm.
    return InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        attention_bias=not vit_6b,
        use_qk_norm=vit_6b,
        norm_type="rms_norm" if vit_6b else "layer_norm",
        layer_norm_eps=1e-6,
    )


def build_native(
    family: str, vit_6b: bool, seed: int = 0, **text_overrides
) -> InternVLForConditionalGeneration:
    """A tiny native model with random weights; ``text_overrides`` change its text config."""
    config = InternVLConfig(
        vision_config=_vision_config(vit_6b),
        text_config=_text_config(family, **text_overrides),
        image_token_id=IMG_CONTEXT_ID,
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # distinct random values everywhere (init leaves zeros and constants)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


# ---------------------------------------------------------------------- native -> original (the inverse)


def fuse_wqkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int, head_dim: int
) -> torch.Tensor:
    """InternLM2's wqkv rows: per KV group, the group's q heads, then its k head, then its v head."""
    per_group = q.shape[0] // head_dim // kv_heads
    blocks = []
    for g in range(kv_heads):
        blocks.append(q[g * per_group * head_dim : (g + 1) * per_group * head_dim])
        blocks.append(k[g * head_dim : (g + 1) * head_dim])
        blocks.append(v[g * head_dim : (g + 1) * head_dim])
    return torch.cat(blocks)


def to_original_state_dict(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    vt, lm = "model.vision_tower.", "model.language_model."
    vision_embeddings = {
        "embeddings.cls_token": "embeddings.class_embedding",
        "embeddings.position_embeddings": "embeddings.position_embedding",
        "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
        "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
    }
    vision_layer = {
        "attention.projection_layer.": "attn.proj.",
        "attention.q_norm.": "attn.q_norm.",
        "attention.k_norm.": "attn.k_norm.",
        "layernorm_before.": "norm1.",
        "layernorm_after.": "norm2.",
        "mlp.fc1.": "mlp.fc1.",
        "mlp.fc2.": "mlp.fc2.",
        "lambda_1": "ls1",
        "lambda_2": "ls2",
    }
    internlm2_layer = {
        "self_attn.o_proj.": "attention.wo.",
        "mlp.gate_proj.": "feed_forward.w1.",
        "mlp.up_proj.": "feed_forward.w3.",
        "mlp.down_proj.": "feed_forward.w2.",
        "input_layernorm.": "attention_norm.",
        "post_attention_layernorm.": "ffn_norm.",
    }
    projector = {"layer_norm.": "mlp1.0.", "linear_1.": "mlp1.1.", "linear_2.": "mlp1.3."}
    for name, t in sd.items():
        if name.startswith(vt):
            sub = name[len(vt) :]
            if sub in vision_embeddings:
                out["vision_model." + vision_embeddings[sub]] = t
                continue
            _, _, layer, rest = sub.split(".", 3)  # encoder.layer.N.rest
            prefix = f"vision_model.encoder.layers.{layer}."
            if rest.startswith(("attention.q_proj.", "attention.k_proj.", "attention.v_proj.")):
                if rest.startswith("attention.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    parts = [sd[f"{vt}encoder.layer.{layer}.attention.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{prefix}attn.qkv.{kind}"] = torch.cat(parts)
                continue
            for new, old in vision_layer.items():
                if rest.startswith(new):
                    out[prefix + old + rest[len(new) :]] = t
                    break
            else:
                raise AssertionError(name)
        elif name.startswith("model.multi_modal_projector."):
            sub = name[len("model.multi_modal_projector.") :]
            new = next(k for k in projector if sub.startswith(k))
            out[projector[new] + sub[len(new) :]] = t
        elif name == "lm_head.weight":
            out[
                "language_model.output.weight" if family == "internlm2" else "language_model.lm_head.weight"
            ] = t
        elif family != "internlm2":
            out["language_model.model." + name[len(lm) :]] = t
        else:
            sub = name[len(lm) :]
            if sub == "embed_tokens.weight":
                out["language_model.model.tok_embeddings.weight"] = t
            elif sub == "norm.weight":
                out["language_model.model.norm.weight"] = t
            else:
                _, layer, rest = sub.split(".", 2)
                prefix = f"language_model.model.layers.{layer}."
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    q, k, v = (sd[f"{lm}layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv")
                    out[f"{prefix}attention.wqkv.{kind}"] = fuse_wqkv(q, k, v, KV_HEADS, HEAD_DIM)
                elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                    continue
                else:
                    new = next(k for k in internlm2_layer if rest.startswith(k))
                    out[prefix + internlm2_layer[new] + rest[len(new) :]] = t
    return {k: v.clone() for k, v in out.items()}


def original_config(native: InternVLForConditionalGeneration, family: str, vit_6b: bool) -> dict:
    vc, tc = native.config.vision_config, native.config.text_config
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vc.hidden_size,
        "intermediate_size": vc.intermediate_size,
        "num_attention_heads": vc.num_attention_heads,
        "num_hidden_layers": vc.num_hidden_layers,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "num_channels": 3,
        "qkv_bias": not vit_6b,
        "qk_normalization": vit_6b,
        "norm_type": "rms_norm" if vit_6b else "layer_norm",
        "layer_norm_eps": 1e-6,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "hidden_act": "gelu",
        "use_flash_attn": False,
        "torch_dtype": "float32",
    }
    llm = {
        "architectures": [ARCH[family]],
        "model_type": family,
        "hidden_size": HIDDEN,
        "intermediate_size": tc.intermediate_size,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": tc.num_hidden_layers,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": tc.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
        "attn_implementation": "eager",
        # transformers-4.3x generation defaults the original config.json carries along
        "temperature": 1.0,
        "top_k": 50,
        "num_beams": 1,
        "transformers_version": "4.37.2",
    }
    if family == "internlm2":
        llm.update(
            auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config"},
            bias=False,
            rope_scaling={"type": "dynamic", "factor": 2.0},
        )
    elif family == "qwen2":
        llm.update(use_sliding_window=False, sliding_window=64, max_window_layers=2)
    elif family == "qwen3":  # InternVL3.5's llm_config names its head_dim (Qwen3's is not hidden / heads)
        llm.update(head_dim=HEAD_DIM, attention_bias=False, use_sliding_window=False)
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat",
        "template": TEMPLATE[family],
        "select_layer": -1,
        "force_image_size": IMAGE_SIZE,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "torch_dtype": "float32",
        "vision_config": vision,
        "llm_config": llm,
    }


def _sentencepiece_model(add_dummy_prefix: bool) -> bytes:
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    for piece, kind in [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("▁a", 1), ("b", 1)]:
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, kind
    proto.trainer_spec.model_type = 2  # BPE
    proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    return proto.SerializeToString()


def write_tokenizer(out: Path, family: str) -> None:
    special = {118: "<img>", 119: "</img>", IMG_CONTEXT_ID: "<IMG_CONTEXT>"}
    if family == "internlm2":  # real InternLM2 checkpoints: tokenizer.model + remote-code tokenizer class
        (out / "tokenizer.model").write_bytes(_sentencepiece_model(add_dummy_prefix=True))
        decoder = {
            str(i): {
                "content": c,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, c in special.items()
        }
        tokenizer_config = {
            "tokenizer_class": "InternLM2Tokenizer",
            "auto_map": {
                "AutoTokenizer": [
                    "tokenization_internlm2.InternLM2Tokenizer",
                    "tokenization_internlm2_fast.InternLM2TokenizerFast",
                ]
            },
            "added_tokens_decoder": decoder,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "decode_with_prefix_space": False,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        return
    vocab = {f"t{i}": i for i in range(VOCAB)}
    for i, content in special.items():
        del vocab[f"t{i}"]
        vocab[content] = i
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2")
    fast.add_special_tokens({"additional_special_tokens": list(special.values())})
    fast.save_pretrained(out)


def write_original_checkpoint(
    out: Path, native: InternVLForConditionalGeneration, family: str, vit_6b: bool, fmt: str
) -> dict[str, torch.Tensor]:
    """Original-layout checkpoint in two shards (safetensors or pytorch_model.bin) with an index."""
    out.mkdir(parents=True)
    sd = to_original_state_dict(native.state_dict(), family)
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, half in enumerate(halves):
        file_name = f"{stem}-{i + 1:05d}-of-00002.{ext}"
        shard = {k: sd[k] for k in half}
        if fmt == "safetensors":
            save_file(shard, str(out / file_name), metadata={"format": "pt"})
        else:
            torch.save(shard, out / file_name)
        weight_map.update(dict.fromkeys(half, file_name))
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (out / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(original_config(native, family, vit_6b), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "max_new_tokens": 32}))
    write_tokenizer(out, family)
    return sd


def edit_llm_config(checkpoint: Path, drop: tuple[str, ...] = (), **changes) -> dict:
    """Rewrite the ``llm_config`` of an original checkpoint's config.json; returns the new llm_config."""
    config = json.loads((checkpoint / "config.json").read_text())
    llm = config["llm_config"]
    for key in drop:
        del llm[key]
    llm.update(changes)
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    return llm


def assert_same_logits(native: InternVLForConditionalGeneration, converted_dir: Path) -> None:
    """The converted checkpoint loads cleanly and gives the native model's logits (images and text)."""
    model, info = AutoModelForImageTextToText.from_pretrained(
        converted_dir, dtype=torch.float32, output_loading_info=True
    )
    assert isinstance(model, InternVLForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.text_config.model_type == native.config.text_config.model_type
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)  # two tiles
    ids = (
        [1, 5, 118]
        + [IMG_CONTEXT_ID] * TOKENS_PER_TILE
        + [7]
        + [IMG_CONTEXT_ID] * TOKENS_PER_TILE
        + [119, 9, 10]
    )
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        ref = native.eval()(input_ids=input_ids, pixel_values=pixel_values).logits
        got = model.eval()(input_ids=input_ids, pixel_values=pixel_values).logits
        text_only = model(input_ids=torch.tensor([[1, 5, 9, 10]])).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(text_only[0, -1], got[0, -1])  # images matter
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def read_converted(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                tensors[name] = f.get_tensor(name)
    return tensors


CASES = {  # family -> (vision tower flavour, source weight format)
    "internlm2": (False, "safetensors"),
    "qwen2": (False, "bin"),
    "phi3": (True, "safetensors"),  # InternViT-6B flavour: q/k norm, RMS norm, no qkv bias
    "qwen3": (False, "safetensors"),  # InternVL3.5's LLM
}


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """family -> (source native model, original-layout checkpoint dir), built once per module."""
    built = {}

    def make(family: str):
        if family not in built:
            vit_6b, fmt = CASES[family]
            root = tmp_path_factory.mktemp(family)
            native = build_native(family, vit_6b)
            write_original_checkpoint(root / "orig", native, family, vit_6b, fmt)
            built[family] = (native, root / "orig")
        return built[family]

    return make


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, original_checkpoint):
    family = request.param
    native, orig = original_checkpoint(family)
    # a small shard size forces several output shards and an index
    out = convert_checkpoint(orig, orig.parent / "native", max_shard_size="100KB")
    return family, native, orig, out


# ----------------------------------------------------------------------------------------------- tests


def test_internlm2_wqkv_split_puts_the_right_rows_into_q_k_v():
    heads, kv_heads, head_dim, hidden = 6, 2, 2, 3
    # every row of q, k and v is distinct and identifies its source
    q = torch.arange(heads * head_dim * hidden, dtype=torch.float32).view(-1, hidden)
    k = 1000 + torch.arange(kv_heads * head_dim * hidden, dtype=torch.float32).view(-1, hidden)
    v = 2000 + torch.arange(kv_heads * head_dim * hidden, dtype=torch.float32).view(-1, hidden)
    # the documented layout, written out block by block: group g = [q(3g), q(3g+1), q(3g+2), k(g), v(g)]
    rows = []
    for g in range(kv_heads):
        for i in range(heads // kv_heads):
            head = g * (heads // kv_heads) + i
            rows.append(q[head * head_dim : (head + 1) * head_dim])
        rows.append(k[g * head_dim : (g + 1) * head_dim])
        rows.append(v[g * head_dim : (g + 1) * head_dim])
    wqkv = torch.cat(rows)
    assert torch.equal(wqkv, fuse_wqkv(q, k, v, kv_heads, head_dim))

    sq, sk, sv = split_internlm2_wqkv(wqkv, heads, kv_heads, head_dim)
    assert torch.equal(sq, q) and torch.equal(sk, k) and torch.equal(sv, v)
    # bias (1-D) too, through the per-key mapping
    spec = KeyMapSpec("internlm2", heads, kv_heads, head_dim)
    bias = wqkv[:, 0].contiguous()
    out = dict(
        convert_state_dict_key_and_tensor("language_model.model.layers.3.attention.wqkv.bias", bias, spec)
    )
    assert torch.equal(out["model.language_model.layers.3.self_attn.q_proj.bias"], q[:, 0])
    assert torch.equal(out["model.language_model.layers.3.self_attn.k_proj.bias"], k[:, 0])
    assert torch.equal(out["model.language_model.layers.3.self_attn.v_proj.bias"], v[:, 0])


def test_per_key_mapping():
    spec = KeyMapSpec("qwen2", HEADS, KV_HEADS, HEAD_DIM)
    t = torch.zeros(2)
    assert (
        convert_state_dict_key_and_tensor("mlp1.3.bias", t, spec)[0][0]
        == "model.multi_modal_projector.linear_2.bias"
    )
    assert (
        convert_state_dict_key_and_tensor("language_model.lm_head.weight", t, spec)[0][0] == "lm_head.weight"
    )
    assert convert_state_dict_key_and_tensor("vision_model.encoder.layers.5.ls2", t, spec)[0][0] == (
        "model.vision_tower.encoder.layer.5.lambda_2"
    )
    qkv = torch.arange(12.0).view(6, 2)
    out = dict(convert_state_dict_key_and_tensor("vision_model.encoder.layers.0.attn.qkv.weight", qkv, spec))
    assert torch.equal(out["model.vision_tower.encoder.layer.0.attention.k_proj.weight"], qkv[2:4])
    assert (
        convert_state_dict_key_and_tensor(
            "language_model.model.layers.0.self_attn.rotary_emb.inv_freq", t, spec
        )
        == []
    )
    with pytest.raises(ConversionError, match="unknown weight"):
        convert_state_dict_key_and_tensor("language_model.base_model.model.lora_A.weight", t, spec)
    with pytest.raises(ConversionError, match="unknown weight"):
        convert_state_dict_key_and_tensor("vision_model.encoder.layers.0.attn.inner_attn.weight", t, spec)
    internlm2 = KeyMapSpec("internlm2", HEADS, KV_HEADS, HEAD_DIM)
    with pytest.raises(ConversionError, match="unknown weight"):
        convert_state_dict_key_and_tensor("language_model.model.layers.0.attention.wq.weight", t, internlm2)


def test_convert_config_internvl2_2b_like():
    llm = {
        "architectures": ["InternLM2ForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_hidden_layers": 24,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "vocab_size": 92553,
        "bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "temperature": 1.0,
    }
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 448,
        "patch_size": 14,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "initializer_factor": 1.0,
    }
    orig = {
        "model_type": "internvl_chat",
        "template": "internlm2-chat",
        "select_layer": -1,
        "force_image_size": 448,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "torch_dtype": "bfloat16",
        "max_dynamic_patch": 12,
        "llm_config": llm,
        "vision_config": vision,
    }
    config = convert_config(orig, 92546)
    assert config.image_seq_length == 256 and config.image_token_id == 92546
    assert config.vision_feature_layer == -1 and config.downsample_ratio == 0.5
    assert config.tie_word_embeddings is False and config.text_config.tie_word_embeddings is False
    assert config.text_config.model_type == "llama" and config.text_config.head_dim == 128
    assert config.text_config.num_key_value_heads == 8 and config.text_config.attention_bias is False
    assert config.text_config.rope_parameters["rope_type"] == "dynamic"
    assert config.text_config.rope_parameters["factor"] == 2.0
    assert config.text_config.rope_parameters["rope_theta"] == 1e6
    assert config.vision_config.attention_bias and not config.vision_config.use_qk_norm
    assert config.vision_config.layer_scale_init_value == 1.0
    assert config.raylora_template == "internlm2-chat" and config.dtype == torch.bfloat16
    assert not hasattr(config.text_config, "temperature") or config.text_config.temperature is None

    with pytest.raises(ConversionError, match="ps_version"):
        convert_config({**orig, "ps_version": "v1"}, 92546)
    with pytest.raises(ConversionError, match="outside the LLM vocab"):
        convert_config(orig, 100000)
    bad = {**orig, "llm_config": {**llm, "architectures": ["MixtralForCausalLM"]}}
    with pytest.raises(ConversionError, match="unsupported InternVL LLM"):
        convert_config(bad, 92546)

    # Phi-3 (InternVL2-4B): legacy "su" rope scaling becomes native LongRoPE
    phi3 = {
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": 32,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "long_factor": [1.5] * 48, "short_factor": [1.0] * 48},
        "sliding_window": 262144,
        "vocab_size": 32020,
    }
    config = convert_config({**orig, "template": "phi3-chat", "llm_config": phi3}, 32013)
    rope = config.text_config.rope_parameters
    assert config.text_config.model_type == "phi3" and rope["rope_type"] == "longrope"
    assert rope["original_max_position_embeddings"] == 4096 and rope["long_factor"] == [1.5] * 48


def test_converted_tensors_equal_the_native_ones(converted):
    family, native, orig, out = converted
    assert is_original_checkpoint(orig) and not is_original_checkpoint(out)
    tensors = read_converted(out)
    expected = native.state_dict()
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    # sharded output with an index that covers every tensor
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected) and len(set(index["weight_map"].values())) > 1
    assert not list(out.parent.glob(".native.tmp-*"))  # temp dir renamed away

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["image_token_id"] == IMG_CONTEXT_ID
    assert config["raylora_template"] == TEMPLATE[family]
    assert json.loads((out / "raylora.json").read_text()) == {"template": TEMPLATE[family]}
    assert config["text_config"]["model_type"] == ("llama" if family == "internlm2" else family)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 7]


def test_converted_model_gives_the_same_logits(converted):
    family, native, _, out = converted
    assert_same_logits(native, out)


def test_tokenizer_and_image_processor(converted):
    family, _, _, out = converted
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__.startswith("GotOcr2ImageProcessor")
    assert processor.crop_to_patches and processor.max_patches == 6 and processor.min_patches == 1
    assert processor.size.height == IMAGE_SIZE and list(processor.image_mean) == [0.485, 0.456, 0.406]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer_config
    if family == "internlm2":
        assert (out / "tokenizer.model").is_file()
        assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer"
        assert tokenizer_config["add_prefix_space"] is True  # read from tokenizer.model
        assert tokenizer_config["legacy"] is True
        assert tokenizer_config["added_tokens_decoder"][str(IMG_CONTEXT_ID)]["content"] == "<IMG_CONTEXT>"
    else:
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == IMG_CONTEXT_ID


def test_ensure_native_converts_once_and_reuses_the_cache(tmp_path, monkeypatch, caplog):
    native = build_native("qwen2", vit_6b=False, seed=3)
    src = tmp_path / "InternVL2_5-tiny"
    write_original_checkpoint(src, native, "qwen2", False, "safetensors")
    cache = tmp_path / "cache"

    with caplog.at_level(logging.INFO, logger="raylora.convert"):
        first = ensure_native(src, cache_dir=cache)
    assert first.parent == cache and first.name.startswith("InternVL2_5-tiny-")
    lines = [
        r.getMessage() for r in caplog.records if "converting original InternVL checkpoint" in r.getMessage()
    ]
    assert len(lines) == 1 and str(first) in lines[0] and lines[0].endswith("(once)")
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(convert, "convert_checkpoint", fail)
    assert ensure_native(src, cache_dir=cache) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp
    assert ensure_native(first) == first  # native: returned unchanged
    monkeypatch.undo()

    monkeypatch.setenv("RAYLORA_CACHE", str(tmp_path / "env-cache"))
    via_env = ensure_native(src)
    assert via_env.parent == tmp_path / "env-cache" / "converted" and via_env.name == first.name

    other = tmp_path / "not-internvl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="neither"):
        ensure_native(other)
    with pytest.raises(FileNotFoundError):
        ensure_native(tmp_path / "missing")


def test_cli(original_checkpoint, tmp_path, capsys):
    _, orig = original_checkpoint("internlm2")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        convert.main([str(orig), str(dst)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").is_file()
    with pytest.raises(FileExistsError):
        convert_checkpoint(orig, dst)

    assert convert.main([str(orig), str(dst), "--overwrite", "--max-shard-size", "1GB"]) == 0
    printed = capsys.readouterr().out
    assert "internlm2" in printed and "llama" in printed and str(dst) in printed
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()

    with pytest.raises(SystemExit) as exc:
        convert.main(["--help"])
    assert exc.value.code == 0 and "--max-shard-size" in capsys.readouterr().out


def test_tied_lm_head_is_materialized_and_bad_weights_are_refused(tmp_path):
    native = build_native("qwen2", vit_6b=False, seed=5)
    src = tmp_path / "orig"
    sd = write_original_checkpoint(src, native, "qwen2", False, "safetensors")
    for f in src.glob("model*.safetensors*"):
        f.unlink()
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = True  # e.g. a Qwen2-0.5B LLM saved without lm_head
    (src / "config.json").write_text(json.dumps(config))
    del sd["language_model.lm_head.weight"]
    save_file(sd, str(src / "model.safetensors"))  # single file, no index

    out = convert_checkpoint(src, tmp_path / "tied")
    tensors = read_converted(out)
    assert not (out / "model.safetensors.index.json").exists()
    assert torch.equal(tensors["lm_head.weight"], native.model.language_model.embed_tokens.weight)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    save_file({**sd, "language_model.model.extra.weight": torch.zeros(1)}, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="no place in the native model"):
        convert_checkpoint(src, tmp_path / "extra")
    bad = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.1.norm2.bias"}
    save_file(bad, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="missing"):
        convert_checkpoint(src, tmp_path / "missing")
    bad = {**sd, "mlp1.1.weight": sd["mlp1.1.weight"][:, :-1].contiguous()}
    save_file(bad, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="shape"):
        convert_checkpoint(src, tmp_path / "shape")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orig", "tied"]  # no partial outputs left


# ------------------------------------------------------------------------- llm_config forms and defaults


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 1e6},
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    ],
    ids=["default", "linear"],
)
def test_llm_config_saved_by_transformers_5_with_only_rope_parameters(tmp_path, rope_parameters):
    # transformers 5 saves one rope_parameters dict and neither rope_theta nor rope_scaling
    native = build_native("qwen2", vit_6b=False, seed=7, rope_parameters=dict(rope_parameters))
    src = tmp_path / "orig"
    write_original_checkpoint(src, native, "qwen2", False, "safetensors")
    edit_llm_config(src, drop=("rope_theta", "rope_scaling"), rope_parameters=rope_parameters)

    out = convert_checkpoint(src, tmp_path / "native")
    assert_same_logits(native, out)
    assert json.loads((out / "config.json").read_text())["text_config"]["rope_parameters"] == rope_parameters


def test_internlm2_llm_config_without_bias_or_pad_token_id_gets_the_original_defaults(tmp_path):
    # the original InternLM2Config defaults to bias=True (wqkv and wo have biases) and pad_token_id=0
    native = build_native("internlm2", vit_6b=False, seed=8, attention_bias=True)
    src = tmp_path / "orig"
    sd = write_original_checkpoint(src, native, "internlm2", False, "safetensors")
    assert "language_model.model.layers.0.attention.wqkv.bias" in sd
    assert "language_model.model.layers.0.attention.wo.bias" in sd
    edit_llm_config(src, drop=("bias", "pad_token_id"))

    out = convert_checkpoint(src, tmp_path / "native")
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    assert text_config["attention_bias"] is True and text_config["mlp_bias"] is False
    assert text_config["pad_token_id"] == 0
    tensors, expected = read_converted(out), native.state_dict()
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    assert_same_logits(native, out)


def _llm_config(family: str, **rope) -> dict:
    return {
        "architectures": [ARCH[family]],
        "hidden_size": HIDDEN,
        "intermediate_size": 96,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "vocab_size": VOCAB,
        **rope,
    }


_FACTORS = {"short_factor": [1.0] * (HEAD_DIM // 2), "long_factor": [2.0] * (HEAD_DIM // 2)}


@pytest.mark.parametrize(
    "family, rope",
    [
        ("qwen2", {"rope_theta": 1e6, "rope_scaling": None}),
        ("qwen2", {"rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}}),
        ("qwen2", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 5e5}}),
        # the dict's rope_theta wins over a top-level one; a dict without one takes the top-level one
        (
            "qwen2",
            {"rope_theta": 1e4, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
        ),
        ("qwen2", {"rope_theta": 1e6, "rope_parameters": {"type": "linear", "factor": 2.0}}),
        # transformers 5 reads a legacy rope_scaling dict before rope_parameters
        (
            "qwen2",
            {
                "rope_theta": 1e6,
                "rope_scaling": {"type": "linear", "factor": 3.0},
                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5},
            },
        ),
        (
            "qwen2",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
        ),
        # Phi-3 LongRoPE in both forms; original_max_position_embeddings is the top-level field (default 4096)
        ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, **_FACTORS}}),
        (
            "phi3",
            {
                "original_max_position_embeddings": 64,
                "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, **_FACTORS},
            },
        ),
        ("phi3", {"rope_theta": 1e4, "rope_scaling": {"type": "longrope", **_FACTORS}}),
    ],
)
def test_rope_parameters_are_read_like_transformers_5_reads_them(family, rope):
    from transformers import CONFIG_MAPPING

    llm = _llm_config(family, **rope)
    reference = dict(CONFIG_MAPPING[family](**json.loads(json.dumps(llm))).rope_parameters)
    reference.pop("type", None)  # legacy alias transformers keeps next to rope_type
    assert convert.convert_text_config(json.loads(json.dumps(llm)), family).rope_parameters == reference


@pytest.mark.parametrize(
    "rope, expected",
    [
        ({"rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, ("dynamic", 2.0, 1e6)),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, ("default", None, 1e6)),
        # what transformers 5 saves for the remote-code InternLM2Config: rope_theta beside rope_parameters
        ({"rope_theta": 1e6, "rope_parameters": {"type": "linear", "factor": 2.0}}, ("linear", 2.0, 1e6)),
        ({}, ("default", None, 10000.0)),
    ],
)
def test_internlm2_rope_parameters(rope, expected):
    params = convert.convert_text_config(_llm_config("internlm2", **rope), "internlm2").rope_parameters
    assert (params["rope_type"], params.get("factor"), params["rope_theta"]) == expected


def test_per_layer_rope_parameters_are_refused():
    nested = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    with pytest.raises(ConversionError, match="rope_parameters"):
        convert.convert_text_config(_llm_config("qwen2", rope_parameters=nested), "qwen2")


def test_vision_config_defaults_follow_intern_vision_config():
    # InternVisionConfig defaults image_size to 224; InternVLChatModel uses force_image_size or that
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
    orig = {
        "model_type": "internvl_chat",
        "ps_version": "v2",
        "llm_config": _llm_config("qwen2", rope_theta=1e6),
        "vision_config": vision,
    }
    config = convert_config(orig, IMG_CONTEXT_ID)
    assert tuple(config.vision_config.image_size) == (224, 224)
    assert config.image_seq_length == (224 // 14) ** 2 // 4
    assert config.vision_config.use_qk_norm and config.vision_config.norm_type == "rms_norm"
    assert not config.vision_config.attention_bias and config.vision_config.layer_scale_init_value == 0.1


def test_a_converted_checkpoint_gets_processor_files_plain_transformers_load(converted, tmp_path):
    """Found by running the merge on a converted original checkpoint: the converted tokenizer did not
    name InternVL's image tokens, so transformers' InternVLProcessor could not be built and the merge
    failed (AttributeError: ... has no attribute start_image_token). Now the converted tokenizer names
    them and the family's processor files load with AutoProcessor and expand an image."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from raylora.families import family_of

    _, _, _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.context_image_token == "<IMG_CONTEXT>" and tokenizer.start_image_token == "<img>"
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    family_of(out).save_processor(tmp_path / "merged", out, tokenizer, jinja)
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    image = Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    ids = processor(text=["<IMG_CONTEXT>\nhi"], images=[image], return_tensors="np")["input_ids"][0]
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum() == TOKENS_PER_TILE
    # a checkpoint converted before the converter named the tokens (its cache): the family names them
    old = tmp_path / "old"
    shutil.copytree(out, old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    for name in ("start_image_token", "end_image_token", "context_image_token", "video_token"):
        config.pop(name, None)
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    family_of(old).save_processor(tmp_path / "merged_old", old, AutoTokenizer.from_pretrained(old), jinja)
    assert (
        AutoProcessor.from_pretrained(tmp_path / "merged_old").tokenizer.context_image_token
        == "<IMG_CONTEXT>"
    )
