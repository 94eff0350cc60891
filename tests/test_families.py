"""Model families beside the demo's: InternVL3.5 (-hf, Qwen3 LLM), Qwen2.5-VL and Qwen3-VL, each a tiny
random checkpoint of the real architecture built offline (``python -m raylora.demo build``).

Checked per family: the checkpoint is recognised and its chat template read; the first loss equals
transformers' own processor + model on the same rows (plain and grouped layouts); grouped and packed
layouts give the gradients of plain rows (and wrong multimodal positions do not); the Qwen-VL
positions equal transformers' ``get_rope_index``; and the whole path runs: train (CLI), merge, plain
``AutoModelForImageTextToText`` + ``AutoProcessor`` captioning, evaluation, captioning.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from raylora.data.pipeline import build_microbatch
from raylora.data.plan import plan_units
from raylora.data.prepare import prepare
from raylora.loss import forward_loss
from raylora.sources import image_settings

from .conftest import COCO

FAMILIES = ["internvl3_5", "qwen2_5_vl", "qwen3_vl"]
QWEN = ["qwen2_5_vl", "qwen3_vl"]
TOLERANCE = 1e-5
TRAIN = COCO / "annotations" / "coco_karpathy_train.jsonl"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from raylora.demo import build_checkpoint

    root = tmp_path_factory.mktemp("families")
    return {f: build_checkpoint(f, root / f, log=lambda *_: None) for f in FAMILIES}


@pytest.fixture(scope="module")
def family_data(tiny_checkpoints):
    """Each family's settings (the checkpoint's own template) and the COCO fixture's records."""
    out = {}
    for family, path in tiny_checkpoints.items():
        settings = replace(image_settings(path), max_seq_length=2048)
        out[family] = (prepare(TRAIN, COCO, settings, use_ray=False).table, settings)
    return out


def _model(path: Path, lora: bool):
    from transformers import AutoModelForImageTextToText

    from raylora.cli import load
    from raylora.model import apply_lora

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if not lora:
        return model.eval()
    torch.manual_seed(0)
    model = apply_lora(model, load("demo"))
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def _batch(records: pa.Table, settings, units: list[list[int]], budget: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in build_microbatch(records, units, settings, budget).items()}


def _one_group(records: pa.Table) -> list[int]:
    return next(u for u in plan_units(records, group_by_image=True) if len(u) == 5)


def reference_loss(path: Path, records: pa.Table, rows: list[int]) -> float:
    """Mean cross-entropy per label token (each caption and the end-of-turn token after it) of
    ``rows``, by transformers' own processor (its chat template, image processor) and model."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = _model(path, lora=False)
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    for r in rows:
        turns = json.loads(records.column("conversations")[r].as_py())
        prompt = turns[0]["value"].replace("<image>\n", "")
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        answer = {"role": "assistant", "content": [{"type": "text", "text": turns[1]["value"]}]}
        with Image.open(records.column("images")[r].as_py()[0]) as im:
            image = im.convert("RGB")
        full = processor(
            text=[processor.apply_chat_template([user, answer])], images=[image], return_tensors="pt"
        )
        start = processor(
            text=[processor.apply_chat_template([user], add_generation_prompt=True)], images=[image]
        )["input_ids"][0]
        ids = full["input_ids"][0]
        end = len(start) + int((ids[len(start) :] == end_of_turn).nonzero()[0]) + 1
        with torch.no_grad():
            logits = model(**full).logits[0].float()
        targets = ids[len(start) : end]
        total += float(
            torch.nn.functional.cross_entropy(logits[len(start) - 1 : end - 1], targets, reduction="sum")
        )
        count += len(targets)
    return total / count


def test_families_are_recognised_with_their_own_templates(tiny_checkpoints):
    from raylora.families import family_of

    got = {f: (type(family_of(p)).__name__, image_settings(p).template) for f, p in tiny_checkpoints.items()}
    assert {f: name for f, (name, _) in got.items()} == {
        "internvl3_5": "InternVL",
        "qwen2_5_vl": "QwenVL",
        "qwen3_vl": "QwenVL",
    }
    assert got["qwen2_5_vl"][1].default_system == "You are a helpful assistant."  # inserted by its template
    assert got["qwen3_vl"][1].default_system is None  # Qwen3-VL's template has none
    assert (
        got["qwen3_vl"][1].sep == "<|im_end|>\n"
        and got["qwen3_vl"][1].assistant_role == "<|im_start|>assistant\n"
    )
    assert family_of(tiny_checkpoints["internvl3_5"]).text_model_type == "qwen3"


@pytest.mark.parametrize("family", QWEN)
def test_mrope_positions_equal_transformers(tiny_checkpoints, family):
    """Two images of different sizes between text: the (3, L) positions of get_rope_index."""
    from raylora.families.qwen_vl import mrope_positions

    model = _model(tiny_checkpoints[family], lora=False)
    image_id, start, end = (
        model.config.image_token_id,
        model.config.vision_start_token_id,
        model.config.vision_end_token_id,
    )
    grids = torch.tensor([[1, 4, 6], [1, 8, 4]])
    ids = [105, 106, start] + [image_id] * 6 + [end, 107, 108, 109, start] + [image_id] * 8 + [end, 110]
    input_ids = torch.tensor([ids])
    ref, _ = model.model.get_rope_index(input_ids, (input_ids == image_id).int(), image_grid_thw=grids)
    ours = mrope_positions(np.asarray(ids), grids.tolist(), image_id, 2)
    assert np.array_equal(ours, ref[:, 0].numpy())


@pytest.mark.parametrize("layout", ["plain", "grouped"])
@pytest.mark.parametrize("family", FAMILIES)
def test_first_loss_equals_transformers_processor_and_model(tiny_checkpoints, family_data, family, layout):
    """raylora's loss of one image's five captions (LoRA at init: the base model) equals the mean
    cross-entropy per label token that transformers' own processor and model give for those rows."""
    records, settings = family_data[family]
    rows = _one_group(records)
    units = [[r] for r in rows] if layout == "plain" else [rows]
    batch = _batch(records, settings, units)
    model = _model(tiny_checkpoints[family], lora=False)
    with torch.no_grad():
        loss_sum, tokens = forward_loss(model, batch, torch.float32)
    ours = float(loss_sum) / tokens
    ref = reference_loss(tiny_checkpoints[family], records, rows)
    # Qwen-VL: the same image processor, float noise (3e-7 measured); InternVL: raylora's tiles are
    # within one grey level of transformers' GotOcr2 processor's (1.6e-5 measured)
    tolerance = 1e-5 if family in QWEN else 1e-4
    assert abs(ours - ref) <= tolerance * abs(ref), (ours, ref)


def _loss_and_grads(model, batches) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    total = sum(int(b["label_tokens"]) for b in batches)
    for b in batches:
        loss_sum, _ = forward_loss(model, b, torch.float32)
        (loss_sum / total).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_relative_error(grads, ref) -> float:
    return max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_and_packed_gradients_equal_plain_rows(tiny_checkpoints, family_data, family):
    """Image-once and packing (Qwen-VL: with multimodal rotary positions): each caption gets exactly
    the position ids of its own row, so LoRA gradients equal the plain rows'; giving every caption of
    a group the prefix's next positions in one run (as a plain row of all five would) does not."""
    records, settings = family_data[family]
    units = [u for u in plan_units(records, group_by_image=True) if len(u) == 5][:2]
    model = _model(tiny_checkpoints[family], lora=True)
    ref = _loss_and_grads(model, [_batch(records, settings, [[r]]) for u in units for r in u])
    grouped = _batch(records, settings, units)
    packed = _batch(records, settings, units, budget=2048)
    assert int(grouped["structured"]) == 1 and packed["input_ids"].shape[0] == 1
    assert _max_relative_error(_loss_and_grads(model, [grouped]), ref) <= TOLERANCE
    assert _max_relative_error(_loss_and_grads(model, [packed]), ref) <= TOLERANCE
    wrong = dict(grouped)
    contiguous = wrong["position_ids"].clone()
    for r in range(contiguous.shape[0]):  # each caption continues where the previous one ended
        n = int(grouped["attention_mask"][r].sum())
        last_prefix = int((grouped["branch_ids"][r, :n] == 0).sum())
        start = int(contiguous[r, :, last_prefix - 1].max()) + 1
        contiguous[r, :, last_prefix:n] = torch.arange(start, start + n - last_prefix)
    wrong["position_ids"] = contiguous
    assert _max_relative_error(_loss_and_grads(model, [wrong]), ref) > 100 * TOLERANCE


def test_data_check_reports_image_tokens(tiny_checkpoints, capsys):
    """``data check`` of a Qwen-VL checkpoint: its pixel bounds and the image-token distribution."""
    from raylora.data.__main__ import main

    code = main(["check", str(TRAIN), "--root", str(COCO), "--model", str(tiny_checkpoints["qwen2_5_vl"])])
    out = capsys.readouterr().out
    assert code == 0 and "image tokens of 28x28 px" in out and "image tokens per image:" in out


def _one_image_annotation(records: pa.Table, out: Path) -> list[int]:
    """An annotation of one COCO image's five captions (the records' lines of the fixture file)."""
    rows = _one_group(records)
    lines = TRAIN.read_text(encoding="utf-8").splitlines()
    out.write_text("".join(lines[records.column("line")[r].as_py() - 1] + "\n" for r in rows))
    return rows


def _transformers_caption(merged: Path, image: str, max_new_tokens: int) -> str:
    """What plain transformers make of the merged folder: Auto classes, the processor's own chat
    template, greedy decoding with the saved generation config."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from raylora.generation import GenerationSettings

    processor = AutoProcessor.from_pretrained(merged)
    model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    prompt = GenerationSettings().prompt
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    with Image.open(image) as im:
        inputs = processor(
            text=[processor.apply_chat_template([user], add_generation_prompt=True)],
            images=[im.convert("RGB")],
            return_tensors="pt",
        )
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, min_new_tokens=8, max_new_tokens=max_new_tokens)
    new = out[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_merges_serves_and_captions(
    family, tiny_checkpoints, family_data, tracking_uri, tmp_path, monkeypatch, capsys
):
    """The demo config on the family's checkpoint (everything else from the checkpoint: family, chat
    template, image settings): trains (its first loss is transformers' own), validates, merges into a
    folder plain transformers load and caption with as raylora does, registers it as an MLflow pyfunc
    whose captions equal ``raylora.caption``'s."""
    import base64

    import mlflow
    import pandas as pd

    from raylora import tracking
    from raylora.caption import main as caption_main
    from raylora.merge import merge_adapter
    from raylora.train import main as train_main

    records, _ = family_data[family]
    annotation = tmp_path / "one_image.jsonl"
    rows = _one_image_annotation(records, annotation)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    out = tmp_path / "out"
    argv = [
        "--no-ray",
        "--config",
        "demo",
        "--output",
        str(out),
        f"model.path={tiny_checkpoints[family]}",
        f"data.train={annotation}",
        f"data.root={COCO}",
        f"data.val={COCO / 'annotations' / 'coco_karpathy_test.json'}",
        f"data.val_gt={COCO / 'annotations' / 'coco_karpathy_test_gt.json'}",
        f"data.val_root={COCO}",
        "data.val_size=2",
        "train.max_steps=2",
        "train.global_batch_size=1",
        "train.per_device_batch_size=1",
        "cluster.num_workers=1",
        "train.log_every_n_steps=1",
        "train.checkpoint_every_n_steps=2",
        "eval.every_n_steps=2",
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={tracking_uri}",
    ]
    assert train_main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    history = tracking.client(tracking_uri).get_metric_history(summary["mlflow_run_id"], "loss")
    first = next(m.value for m in history if m.step == 1)
    ref = reference_loss(tiny_checkpoints[family], records, rows)
    assert abs(first - ref) <= (1e-5 if family in QWEN else 1e-4) * ref, (first, ref)
    capsys.readouterr()

    image = str(COCO / records.column("images")[rows[0]].as_py()[0])
    name = f"family-{family}-{tmp_path.name[-6:]}"
    report = merge_adapter(
        out / "adapter",
        tmp_path / "merged",
        verify_images=[image],
        register=True,
        name=name,
        log=lambda *_: None,
    )
    assert report["max_abs_diff"] <= report["tolerance"] and report.get("processor_prompt_matches", True)

    assert caption_main(["--model", str(out / "adapter"), image]) == 0
    adapter_caption = capsys.readouterr().out.strip().split("\t", 1)[1]
    assert caption_main(["--model", str(tmp_path / "merged"), image]) == 0
    merged_caption = capsys.readouterr().out.strip().split("\t", 1)[1]
    assert merged_caption == adapter_caption
    assert _transformers_caption(tmp_path / "merged", image, 30) == adapter_caption

    served = mlflow.pyfunc.load_model(f"models:/{name}-merged@champion")
    data = base64.b64encode(Path(image).read_bytes()).decode("ascii")
    assert served.predict(pd.DataFrame({"image": [data]})) == [adapter_caption]


def test_internvl_with_a_gpt_oss_llm_gets_attention_lora():
    """InternVL3.5-GPT-OSS as transformers' native classes build it: LoRA on the attention projections
    (the experts are fused parameters and stay frozen); a forward and backward run."""
    from transformers import (
        GptOssConfig,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
    )

    from raylora.cli import load
    from raylora.families import family_of_model
    from raylora.model import apply_lora

    text = GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    vision = InternVLVisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[56, 56],
        patch_size=[14, 14],
    )
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=5, image_seq_length=4)
    model = InternVLForConditionalGeneration(config)
    assert family_of_model(model).text_model_type == "gpt_oss"
    model = apply_lora(model, load("demo"))
    trained = {
        n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad
    }
    assert trained == {"q_proj", "k_proj", "v_proj", "o_proj"}
    out = model(input_ids=torch.tensor([[1, 2, 5, 5, 5, 5, 3]]), pixel_values=torch.randn(1, 3, 56, 56))
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
