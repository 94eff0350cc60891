"""Model builders: load a native checkpoint of any family, wrap its LLM in PEFT LoRA, save adapters.

Plain functions, as in torchtune: the train recipe, evaluation, merge and caption all call these.
torch, transformers and peft are imported inside the functions that need them, so that CLIs start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylora.config import Config
from raylora.families import Family, family_of_model

RECORD = "raylora.json"  # template, system message, base model, LoRA variant: what raylora needs beside the weights
ADAPTER = "default"  # the one PEFT adapter name raylora trains


def torch_dtype(name: str, device_type: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def attn_implementation(name: str, device_type: str) -> str:
    if name != "auto":
        return name
    if device_type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def attention_for_layout(attn: str, structured: bool, device_type: str) -> tuple[Any, str, str | None]:
    """(``attn_implementation`` to load with, the text model's backend, a one-line notice or None).

    A structured layout (grouped captions, packed rows) needs an exact mask. On a GPU the text model
    then always runs flex_attention, whatever ``auto`` resolved to: flash_attention_2 cannot express a
    shared prefix, and sdpa would compute every masked block of a ~8k-token packed row with a dense
    mask; flex_attention's block mask skips them (the vision tower keeps sdpa: it needs no mask).
    ``eager``, asked for by name, stays (a debugging choice). On a CPU: sdpa with a 4D mask
    (flex_attention's backward does not run on a CPU).
    """
    if not structured:
        return attn, attn, None
    if attn == "flex_attention" and device_type != "cuda":
        raise ValueError("model.attn_implementation=flex_attention needs a GPU; use sdpa (or auto) on a CPU")
    flex = {"text_config": "flex_attention", "vision_config": "sdpa"}
    if device_type == "cuda" and attn in ("flash_attention_2", "sdpa"):
        why = (
            "cannot express grouped captions or packed rows"
            if attn == "flash_attention_2"
            else ("would compute every masked block of grouped or packed rows")
        )
        return flex, "flex_attention", f"{attn} {why}: text attention uses flex_attention (skips them)"
    if attn == "flash_attention_2":
        return "sdpa", "sdpa", "flash_attention_2 needs a GPU: attention uses sdpa with a 4D mask"
    if attn == "flex_attention":
        return flex, "flex_attention", None
    return attn, attn, None


def attention_line(attn: Any) -> str:
    """Which attention each sub-model runs, for a load-time ``attn_implementation``."""
    text, vision = (attn["text_config"], attn["vision_config"]) if isinstance(attn, dict) else (attn, attn)
    return f"attention: text model {text}, vision model {vision}"


def load_base_model(model_dir: str | Path, dtype: Any = None, attn: Any = "sdpa"):
    """A native checkpoint of any family with transformers' own classes (no remote code)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)


def peft_init(name: str) -> bool | str:
    """PEFT's ``init_lora_weights`` for a ``lora.init`` value ("default" is PEFT's True: B = 0)."""
    return True if name == "default" else name


def init_mutates_base(init: bool | str) -> bool:
    """Whether a PEFT ``init_lora_weights`` moves the adapter's initial value out of the base weights
    (PiSSA, OLoRA): base + adapter is then only right on the *modified* base."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def apply_lora(model: Any, cfg: Config, family: Family | None = None) -> Any:
    """Freeze the base, wrap in PEFT LoRA on ``family``'s targets (default: the model's family) (with ``lora.use_dora``, ``use_rslora``, ``init``);
    optionally train the projector and/or lm_head fully.

    With ``lora.init`` pissa/olora, PEFT subtracts the adapter's initial components from the base
    linear weights here; take :func:`lora_init_snapshot` before training to save a usable adapter.
    """
    from peft import LoraConfig, get_peft_model

    family = family or family_of_model(model)
    modules_to_save = []
    if cfg.lora.train_projector:
        modules_to_save.append(family.projector_module)
    if cfg.lora.train_lm_head:
        modules_to_save.append("lm_head")
    lcfg = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=family.lora_target_regex(model.config, cfg.lora.target_modules, cfg.lora.vision_lora),
        modules_to_save=modules_to_save or None,
        bias="none",
        use_dora=cfg.lora.use_dora,
        use_rslora=cfg.lora.use_rslora,
        init_lora_weights=peft_init(cfg.lora.init),
    )
    return get_peft_model(model, lcfg, adapter_name=ADAPTER)


def lora_init_snapshot(model: Any) -> dict[str, Any] | None:
    """CPU copies of the initial lora_A / lora_B when the init changed the base weights (pissa,
    olora), else None. Take it right after :func:`apply_lora`, before any training step."""
    if not init_mutates_base(model.peft_config[ADAPTER].init_lora_weights):
        return None
    return {
        n: p.detach().cpu().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and (".lora_A." in n or ".lora_B." in n)
    }


def lora_state_dict(model: Any) -> dict[str, Any]:
    """Every trainable tensor in full, on the CPU (a collective call under ZeRO-3: all ranks call it)."""
    import deepspeed

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in params}


def plain_lora_state(state: dict[str, Any], initial: dict[str, Any]) -> dict[str, Any]:
    """A PiSSA/OLoRA adapter's state as a plain LoRA of twice the rank for the original base.

    PEFT's conversion (``LoraModel.subtract_mutated_init``): training ran on W_res = W - s B0 A0 with
    adapter s B A, so the change to the original W is s (B A - B0 A0) = s [B | -B0] [A ; A0]. Other
    tensors (DoRA magnitudes, fully trained modules) are kept: unlike PEFT's own conversion, which
    keeps only lora_A/lora_B. The scaling s stays the same when r and alpha are adjusted as in
    :func:`save_adapter`.
    """
    import torch

    missing = sorted(set(initial) - set(state))
    if missing:
        raise ValueError(f"the initial adapter has tensors the trained one lacks: {missing[:3]}")
    out = {}
    for name, t in state.items():
        if name not in initial:
            out[name] = t
        elif ".lora_A." in name:
            out[name] = torch.cat([t, initial[name].to(t.dtype)], dim=0)
        else:
            out[name] = torch.cat([t, -initial[name].to(t.dtype)], dim=1)
    return out


def save_adapter(
    model: Any, out: str | Path, state: dict[str, Any], initial: dict[str, Any] | None = None
) -> None:
    """Save the PEFT adapter of ``model`` with the weights of ``state`` (every trainable tensor in
    full, gathered under ZeRO-3) so that it applies to the *original* base checkpoint.

    ``initial`` (:func:`lora_init_snapshot`) converts a pissa/olora adapter into a plain LoRA of rank
    2r (alpha 2 alpha, or sqrt(2) alpha with rsLoRA: same scaling) with ``init_lora_weights: true``,
    as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does; loading it
    never touches the base weights. ``raylora.json`` records the LoRA settings the run trained with.
    """
    from peft import LoraConfig

    out = Path(out)
    trained = model.peft_config[ADAPTER]
    if init_mutates_base(trained.init_lora_weights) and initial is None:
        raise ValueError(
            f"init_lora_weights={trained.init_lora_weights!r} changed the base weights: pass the "
            "initial adapter (lora_init_snapshot) to save an adapter usable on the original base"
        )
    if initial is not None:
        state = plain_lora_state(state, initial)
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    record = {
        "rank": trained.r,
        "alpha": trained.lora_alpha,
        "use_dora": trained.use_dora,
        "use_rslora": trained.use_rslora,
        "init": "default" if trained.init_lora_weights is True else str(trained.init_lora_weights),
    }
    if initial is not None:
        saved = LoraConfig.from_pretrained(out)
        saved.r = 2 * trained.r
        saved.lora_alpha = trained.lora_alpha * (2**0.5 if trained.use_rslora else 2)
        saved.init_lora_weights = True
        saved.save_pretrained(out)
        record["saved_as"] = (
            f"plain LoRA of rank {saved.r} for the original base (initial components subtracted)"
        )
    path = out / RECORD
    existing = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**existing, "lora": record}, indent=2) + "\n")


def count_trainable(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
