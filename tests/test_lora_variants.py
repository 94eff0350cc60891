"""LoRA variants (DoRA, rsLoRA, gaussian, PiSSA, OLoRA init): trained, saved the way training saves,
merged, and the merged checkpoint equals the model as it was trained (CPU, no Ray, the demo base).

PiSSA and OLoRA subtract the adapter's initial components from the base weights, so the adapter of
a run is only right on the original base once converted (``raylora.model.save_adapter``); the
reference here is the trained model in memory, not base + adapter reloaded, which a wrong
conversion could still match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylora.config import ConfigError, load_config

from .test_merge import COCO_IMAGES, prompt_logits, quiet

VARIANTS = {
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "gaussian": ["lora.init=gaussian"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    # the conversion must keep what is not lora_A/lora_B: DoRA magnitudes, a fully trained projector
    "pissa_niter+dora+rslora+projector": [
        "lora.init=pissa_niter_2",
        "lora.use_dora=true",
        "lora.use_rslora=true",
        "lora.train_projector=true",
    ],
}
STEPS = 3


def demo_micro_batch(demo_root: Path, settings):
    """One demo training micro-batch (4 samples) as torch tensors, built by the plain pipeline."""
    from raylora.data.pipeline import iter_microbatches, to_torch
    from raylora.data.plan import make_plan, plan_microbatches
    from raylora.data.prepare import prepare

    prepared = prepare(
        demo_root / "data/annotations/demo_train.jsonl", demo_root / "data", settings, use_ray=False
    )
    plan = make_plan(prepared.rows_ok, 4, 4, 1, epochs=1, max_steps=1)
    planned = plan_microbatches(prepared.table, plan)
    return to_torch(next(iter_microbatches(prepared.table, planned, settings)))


@pytest.fixture(scope="module")
def micro_batch(demo_root: Path, demo_settings):
    return demo_micro_batch(demo_root, demo_settings)


def train_and_save(base_dir: Path, overrides: list[str], batch, out: Path):
    """apply_lora, a few AdamW steps, then the recipe's save path: (trained model, adapter dir)."""
    import torch

    from raylora.demo import demo_image_settings
    from raylora.loss import forward_loss
    from raylora.model import apply_lora, load_base_model, lora_init_snapshot, lora_state_dict, save_adapter
    from raylora.sources import complete_adapter_dir

    torch.manual_seed(0)
    model = apply_lora(load_base_model(base_dir), load_config("demo", overrides))
    initial = lora_init_snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss_sum, tokens = forward_loss(model, batch, torch.float32)
        (loss_sum / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    save_adapter(model, out, lora_state_dict(model), initial)
    complete_adapter_dir(out, base_dir, demo_image_settings(base_dir))
    return model, out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_saves_and_merges(variant, demo_root, micro_batch, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from raylora.merge import merge_adapter, tolerance_for
    from raylora.sources import load_model, resolve_source

    overrides = VARIANTS[variant]
    cfg = load_config("demo", overrides)
    base_dir = demo_root / "base"
    trained, adapter = train_and_save(base_dir, overrides, micro_batch, tmp_path / "adapter")

    peft_cfg = json.loads((adapter / "adapter_config.json").read_text())
    record = json.loads((adapter / "raylora.json").read_text())
    assert record["lora"] == {
        **{"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "use_dora": cfg.lora.use_dora},
        **{"use_rslora": cfg.lora.use_rslora, "init": cfg.lora.init},
        **({"saved_as": record["lora"].get("saved_as")} if "saved_as" in record["lora"] else {}),
    }
    assert record["template"] == "Hermes-2"  # complete_adapter_dir kept the LoRA record
    assert peft_cfg["use_dora"] == cfg.lora.use_dora and peft_cfg["use_rslora"] == cfg.lora.use_rslora
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
        a_shape = f.get_slice(next(n for n in names if "lora_A" in n)).get_shape()
    assert any("lora_magnitude_vector" in n for n in names) == cfg.lora.use_dora
    assert any("multi_modal_projector" in n for n in names) == cfg.lora.train_projector
    if cfg.lora.init.startswith("pissa") or cfg.lora.init == "olora":
        # a plain LoRA for the original base: twice the rank, same scaling, nothing to redo on load
        assert peft_cfg["init_lora_weights"] is True and peft_cfg["r"] == 2 * cfg.lora.rank
        factor = 2**0.5 if cfg.lora.use_rslora else 2
        assert peft_cfg["lora_alpha"] == pytest.approx(factor * cfg.lora.alpha)
        assert a_shape[0] == 2 * cfg.lora.rank and "original base" in record["lora"]["saved_as"]
    else:
        assert peft_cfg["r"] == cfg.lora.rank and a_shape[0] == cfg.lora.rank
        assert peft_cfg["init_lora_weights"] == (True if cfg.lora.init == "default" else cfg.lora.init)

    out = tmp_path / "merged"
    report = merge_adapter(adapter, out, "fp32", verify_images=COCO_IMAGES[:1], log=quiet)
    assert report["max_abs_diff"] <= report["tolerance"]  # merge's own check: merged vs base + adapter

    assert report["adapter_effect"] > 100 * report["tolerance"]  # the adapter is not a no-op

    source = resolve_source(adapter)
    settings = source.image_settings()
    images = COCO_IMAGES[2:3]  # not the image the merge verified on
    want = prompt_logits(trained, settings, images)  # the model as trained, in memory
    loaded = prompt_logits(load_model(source), settings, images)  # original base + saved adapter
    merged = prompt_logits(AutoModelForImageTextToText.from_pretrained(out).eval(), settings, images)
    print(
        f"{variant}: vs the trained model: base + adapter {(loaded - want).abs().max():.3g}, "
        f"merged {(merged - want).abs().max():.3g}; adapter effect {report['adapter_effect']:.3g}"
    )
    tolerance = tolerance_for("fp32", want)  # merge's fp32 rule: 1e-4, or 1e-5 x max |logit|
    assert float((loaded - want).abs().max()) < tolerance
    assert float((merged - want).abs().max()) < tolerance


def test_pissa_needs_its_initial_adapter_to_save(demo_root, tmp_path):
    from raylora.model import apply_lora, load_base_model, lora_init_snapshot, lora_state_dict, save_adapter

    model = apply_lora(load_base_model(demo_root / "base"), load_config("demo", ["lora.init=olora"]))
    assert lora_init_snapshot(model)
    with pytest.raises(ValueError, match="changed the base weights"):
        save_adapter(model, tmp_path / "adapter", lora_state_dict(model))
    plain = apply_lora(load_base_model(demo_root / "base"), load_config("demo"))
    assert lora_init_snapshot(plain) is None


def test_unconverted_pissa_adapters_are_flagged(demo_root, tmp_path):
    """An adapter saved by plain PEFT after a pissa init: PEFT redoes the SVD when loading it."""
    from raylora.demo import demo_image_settings
    from raylora.model import apply_lora, load_base_model
    from raylora.sources import SourceError, complete_adapter_dir, resolve_source

    for init in ("pissa", "pissa_niter_2"):
        model = apply_lora(load_base_model(demo_root / "base"), load_config("demo", [f"lora.init={init}"]))
        adapter = tmp_path / init
        model.save_pretrained(adapter)
        complete_adapter_dir(adapter, demo_root / "base", demo_image_settings(demo_root / "base"))
        if init == "pissa":
            with pytest.warns(UserWarning, match="not converted"):
                resolve_source(adapter)
        else:
            with pytest.raises(SourceError, match="randomized SVD"):
                resolve_source(adapter)


def test_lora_init_is_checked():
    from peft import LoraConfig

    from raylora.config import LORA_INITS
    from raylora.model import peft_init

    with pytest.raises(ConfigError) as e:
        load_config("demo", ["lora.init=pisa"])
    assert "lora.init 'pisa'" in str(e.value) and all(name in str(e.value) for name in LORA_INITS)
    for bad in ("pissa_niter_", "pissa_niter_x", "loftq", "true"):
        with pytest.raises(ConfigError, match="lora.init"):
            load_config("demo", [f"lora.init={bad}"])
    for name in ("default", "gaussian", "pissa", "pissa_niter_4", "olora"):
        cfg = load_config("demo", [f"lora.init={name}"])
        LoraConfig(r=4, init_lora_weights=peft_init(cfg.lora.init))  # the installed PEFT takes it


ZERO3_SCRIPT = r"""
import json, sys
from pathlib import Path
import deepspeed, torch
from peft import PeftModel
from raylora.config import load_config
from raylora.families.internvl.tiling import normalize
from raylora.loss import forward_loss
from raylora.model import apply_lora, load_base_model, lora_init_snapshot, lora_state_dict, save_adapter
from raylora.recipe import deepspeed_config
from raylora.demo import demo_image_settings
from tests.test_lora_variants import demo_micro_batch

base_dir, out, image = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = load_config("demo", ["lora.use_dora=true", "lora.init=pissa", "train.zero_stage=3",
                           "train.per_device_batch_size=4", "train.global_batch_size=4", "cluster.num_workers=1"])
torch.manual_seed(0)
model = apply_lora(load_base_model(base_dir), cfg)
initial = lora_init_snapshot(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
deepspeed.init_distributed(dist_backend="gloo")
ds = deepspeed_config(cfg, 1, 1, False)
ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the demo's small tensors
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
settings = demo_image_settings(base_dir)
batch = demo_micro_batch(base_dir.parent, settings)
engine.train()
for _ in range(3):
    loss_sum, tokens = forward_loss(engine, batch, torch.float32)
    engine.backward(loss_sum / tokens)
    engine.step()
partitioned = sum(p.numel() == 0 for p in engine.module.parameters())
save_adapter(engine.module, out, lora_state_dict(engine.module), initial)

from raylora.generation import GenerationSettings, prompt_batch
prompt = prompt_batch(settings.conversation_tokenizer(), settings, [image], GenerationSettings().prompt)
def logits(m):
    with torch.no_grad():
        return m(input_ids=torch.from_numpy(prompt["input_ids"]), attention_mask=torch.from_numpy(prompt["attention_mask"]),
                 pixel_values=normalize(torch.from_numpy(prompt["pixel_values"]))).logits
engine.eval()
want = logits(engine.module)
got = logits(PeftModel.from_pretrained(load_base_model(base_dir), str(out)).eval())
print(json.dumps({"partitioned": partitioned, "max_abs_diff": float((got - want).abs().max()),
                  "max_logit": float(want.abs().max())}))
"""


def test_zero3_dora_pissa_adapter(demo_root, tmp_path):
    """DeepSpeed ZeRO-3 (one CPU process, every parameter partitioned): DoRA's magnitudes are trained
    and gathered, the PiSSA adapter is converted from the gathered state, and the saved adapter on
    the original base gives the logits of the trained, partitioned model."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors import safe_open

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"},
        **{"LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"},
    }
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, "-c", ZERO3_SCRIPT, str(demo_root / "base"), str(out), COCO_IMAGES[0]],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["partitioned"] > 0  # ZeRO-3 really partitioned the model
    assert result["max_abs_diff"] < max(1e-4, 1e-5 * result["max_logit"])
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    magnitudes = {k.split(".lora_")[0]: v for k, v in tensors.items() if "lora_magnitude_vector" in k}
    lora_b = {k.split(".lora_")[0]: v for k, v in tensors.items() if "lora_B" in k}
    assert magnitudes and magnitudes.keys() == lora_b.keys()
    assert all(magnitudes[m].shape == (lora_b[m].shape[0],) for m in magnitudes)  # gathered, not partitioned
    assert all(b.abs().sum() > 0 for b in lora_b.values())
