"""Image-once training: grouped and packed layouts give the same loss and gradients as the plain rows.

CPU, fp32, the demo base with LoRA on real COCO rows (five captions per image). Each layout is
compared with the same rows run one per micro-batch; two deliberately wrong layouts (contiguous
position ids, captions that see each other) must fail the same check.
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
from raylora.data.plan import make_plan, plan_microbatches, plan_units, unit_lengths
from raylora.data.prepare import prepare
from raylora.loss import allowed_attention, forward_loss

from .conftest import COCO

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def coco(demo_settings):
    settings = replace(demo_settings, max_seq_length=1024)  # real photos at the demo's 112 px tiles
    prepared = prepare(COCO / "annotations" / "coco_karpathy_train.jsonl", COCO, settings, use_ray=False)
    return prepared.table, settings


@pytest.fixture(scope="module")
def lora_model(demo_base_model):
    import copy

    from raylora.cli import load
    from raylora.model import apply_lora

    torch.manual_seed(0)
    model = apply_lora(copy.deepcopy(demo_base_model), load("demo"))
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


def build(records: pa.Table, settings, units: list[list[int]], budget: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in build_microbatch(records, units, settings, budget).items()}


def loss_and_grads(model, batches: list[dict[str, torch.Tensor]]) -> tuple[float, dict[str, torch.Tensor]]:
    """Summed token cross-entropy over ``batches`` (divided by their label tokens) and its gradients."""
    model.zero_grad(set_to_none=True)
    total = sum(int(b["label_tokens"]) for b in batches)
    loss = 0.0
    for b in batches:
        loss_sum, _ = forward_loss(model, b, torch.float32)
        (loss_sum / total).backward()
        loss += loss_sum.item() / total
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def max_relative_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Over tensors: max |g - ref| / max |ref|."""
    return max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)


def groups(records: pa.Table, count: int) -> list[list[int]]:
    units = plan_units(records, group_by_image=True)
    chosen = [u for u in units if len(u) == 5][:count]
    assert len(chosen) == count
    return chosen


def test_grouping_by_image_finds_cocos_five_captions(coco):
    records, _ = coco
    units = plan_units(records, group_by_image=True)
    assert len(units) == len({tuple(i) for i in records.column("images").to_pylist()}) == 8
    assert sorted(len(u) for u in units) == [5] * 8
    tokens, labels = unit_lengths(records, units)
    rows = records.column("length").to_pylist()
    prefix = records.column("prefix_length").to_pylist()
    assert tokens[0] == prefix[units[0][0]] + sum(rows[r] - prefix[r] for r in units[0])
    assert sum(labels) == sum(records.column("label_tokens").to_pylist())


@pytest.mark.parametrize(
    ("name", "count", "budget"),
    [("one image, 5 captions", 1, 0), ("a pack of 3 groups", 3, 4096), ("2 packed sequences", 3, 700)],
)
def test_grouped_and_packed_gradients_equal_plain_rows(coco, lora_model, name, count, budget):
    records, settings = coco
    units = groups(records, count)
    layout = build(records, settings, units, budget)
    rows_in_layout = {"one image, 5 captions": 1, "a pack of 3 groups": 1, "2 packed sequences": 2}[name]
    assert layout["input_ids"].shape[0] == rows_in_layout and int(layout["structured"]) == 1
    ref_loss, ref = loss_and_grads(lora_model, [build(records, settings, [[r]]) for u in units for r in u])
    loss, grads = loss_and_grads(lora_model, [layout])
    assert abs(loss - ref_loss) / ref_loss <= TOLERANCE, (loss, ref_loss)
    assert max_relative_error(grads, ref) <= TOLERANCE


def test_plain_rows_packed_without_grouping_equal_padded_rows(coco, lora_model):
    records, settings = coco
    rows = [[r] for u in groups(records, 2) for r in u]
    _, ref = loss_and_grads(lora_model, [build(records, settings, rows)])
    packed = build(records, settings, rows, budget=1024)
    assert packed["input_ids"].shape[0] < len(rows) and int(packed["structured"]) == 1
    _, grads = loss_and_grads(lora_model, [packed])
    assert max_relative_error(grads, ref) <= TOLERANCE


@pytest.mark.parametrize("wrong", ["contiguous positions", "captions see each other"])
def test_wrong_layouts_fail_the_same_check(coco, lora_model, wrong):
    """Negative controls: the check above is sharp enough to catch each mistake."""
    records, settings = coco
    units = groups(records, 1)
    _, ref = loss_and_grads(lora_model, [build(records, settings, [[r]]) for u in units for r in u])
    layout = build(records, settings, units)
    if wrong == "contiguous positions":
        contiguous = torch.arange(layout["input_ids"].shape[1]).expand_as(layout["input_ids"])
        layout["position_ids"] = contiguous[:, None]  # (rows, 1 position axis, L)
    else:
        layout["branch_ids"] = layout["branch_ids"].clamp(max=0)  # every caption in the shared branch
    _, grads = loss_and_grads(lora_model, [layout])
    assert max_relative_error(grads, ref) > 100 * TOLERANCE


def test_mask_rule_and_padding_rows():
    """Causal, block-diagonal between units, captions see the prefix and themselves; padding sees itself."""
    segment = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0, 0, -1]])
    m = allowed_attention(segment, branch)[0]
    assert m[3].tolist() == [True, True, True, True, False, False, False, False]  # caption 1
    assert m[4].tolist() == [True, True, False, False, True, False, False, False]  # caption 2: not caption 1
    assert m[6].tolist() == [False] * 5 + [True, True, False]  # second unit: only itself
    assert m[7].tolist() == [False] * 7 + [True]  # padding: the diagonal, never an empty row
    assert bool(m.any(dim=-1).all())


def test_vision_tower_runs_once_per_image(coco, lora_model):
    records, settings = coco
    units = groups(records, 3)
    seen: list[int] = []
    tower = lora_model.get_base_model().model.vision_tower

    def count(_module, args, kwargs, _out):
        seen.append(int((args[0] if args else kwargs["pixel_values"]).shape[0]))

    hook = tower.register_forward_hook(count, with_kwargs=True)
    try:
        batch = build(records, settings, units, budget=4096)
        with torch.no_grad():
            forward_loss(lora_model, batch, torch.float32)
    finally:
        hook.remove()
    tiles = records.column("tiles").to_pylist()
    assert seen == [sum(sum(tiles[u[0]]) for u in units)]  # each image's tiles once, not once per caption


def test_plan_counts_images_and_step_label_tokens(coco):
    records, _ = coco
    units = plan_units(records, group_by_image=True)
    plan = make_plan(len(units), 4, 1, 2, epochs=1)
    planned = plan_microbatches(records, plan, seed=0, units=units)
    assert planned.num_rows == plan.total_steps * plan.microbatches_per_step == 8
    per_step = np.asarray(planned.column("label_tokens")).reshape(-1, plan.microbatches_per_step)
    steps = np.asarray(planned.column("step_label_tokens")).reshape(-1, plan.microbatches_per_step)
    assert (steps == per_step.sum(axis=1, keepdims=True)).all()
    all_rows = sorted(r for mb in planned.column("rows").to_pylist() for unit in mb for r in unit)
    assert all_rows == list(range(records.num_rows))  # every caption of every image, once per epoch


def test_packing_budget_below_a_sequence_is_an_error(coco):
    records, settings = coco
    units = groups(records, 1)
    with pytest.raises(ValueError, match="max_packed_tokens=64"):
        build(records, settings, units, budget=64)


def test_data_check_reports_groups(tmp_path, demo_tokenizer_dir, capsys):
    from raylora.data.__main__ import main

    code = main(
        [
            "check",
            str(COCO / "annotations" / "coco_karpathy_train.jsonl"),
            "--root",
            str(COCO),
            "--model",
            str(demo_tokenizer_dir),
            "--rejects",
            str(tmp_path / "rejects.jsonl"),
            "--json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["groups"]["images"] == 8 and report["groups"]["captions_per_image"] == {"5": 8}
    assert set(report["groups"]["tokens_per_sequence"]) == {"p50", "p95", "max"}
    assert "grouped by image: 8 images" in out
    assert Path(tmp_path / "rejects.jsonl").is_file()


def test_attention_backend_for_each_layout():
    from raylora.model import attention_for_layout

    assert attention_for_layout("flash_attention_2", False, "cuda") == (
        "flash_attention_2",
        "flash_attention_2",
        None,
    )
    chosen, text, note = attention_for_layout("flash_attention_2", True, "cuda")
    assert chosen == {"text_config": "flex_attention", "vision_config": "sdpa"} and text == "flex_attention"
    assert "flash_attention_2 cannot express" in note
    assert attention_for_layout("sdpa", True, "cpu") == ("sdpa", "sdpa", None)
    with pytest.raises(ValueError, match="flex_attention needs a GPU"):
        attention_for_layout("flex_attention", True, "cpu")
    assert attention_for_layout("sdpa", False, "cuda") == ("sdpa", "sdpa", None)


def test_structured_rows_on_a_gpu_always_get_flex_attention():
    """Bug report: without flash-attn, ``auto`` resolves to sdpa on a GPU, and a structured layout kept
    sdpa with a dense mask over ~7,800-token packed rows (no masked block skipped, nothing printed)."""
    from raylora.model import attention_for_layout, attention_line, attn_implementation

    auto = attn_implementation("auto", "cuda")  # sdpa, or flash_attention_2 where flash-attn is installed
    for attn in (auto, "sdpa"):
        chosen, text, note = attention_for_layout(attn, True, "cuda")
        assert (
            chosen == {"text_config": "flex_attention", "vision_config": "sdpa"} and text == "flex_attention"
        )
        assert note.startswith(attn) and "text attention uses flex_attention" in note
    assert "sdpa would compute every masked block" in attention_for_layout("sdpa", True, "cuda")[2]
    assert attention_line(chosen) == "attention: text model flex_attention, vision model sdpa"
    assert attention_line("sdpa") == "attention: text model sdpa, vision model sdpa"
    assert attention_for_layout("eager", True, "cuda") == ("eager", "eager", None)  # asked by name
