"""Evaluation: batched generation equals batch-1, and the metrics equal pycocoevalcap's own run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from raylora.config import load_config
from raylora.data.records import read_karpathy
from raylora.generation import GenerationSettings, generate_captions

from .conftest import COCO


def test_batched_generation_equals_batch_one(demo_root, demo_settings, demo_base_model):
    """Left padding must not change greedy output: demo scenes and real COCO photos mixed."""
    items = read_karpathy(demo_root / "data/annotations/demo_test.json", demo_root / "data", limit=6)
    paths = [i.image for i in items] + [str(p) for p in sorted((COCO / "val2014").glob("*.jpg"))[:4]]
    ct = demo_settings.conversation_tokenizer()
    batched = generate_captions(demo_base_model, ct, demo_settings, paths, GenerationSettings(batch_size=10))
    single = generate_captions(demo_base_model, ct, demo_settings, paths, GenerationSettings(batch_size=1))
    assert batched == single
    assert all(len(c.split()) >= 3 for c in batched[:6])


def _direct_pycocoevalcap(results_path, gt_path) -> dict[str, float]:
    """pycocoevalcap's scorers run by hand on the same files (the COCOEvalCap recipe, no SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    results = json.loads(results_path.read_text())
    ids = {r["image_id"] for r in results}
    gt = json.loads(gt_path.read_text())
    gts = {i: [{"caption": a["caption"]} for a in gt["annotations"] if a["image_id"] == i] for i in ids}
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    tok = PTBTokenizer()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    out = {}
    for scorer, names in (
        (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        (Meteor(), ["METEOR"]),
        (Rouge(), ["ROUGE_L"]),
        (Cider(), ["CIDEr"]),
    ):
        score, _ = scorer.compute_score(gts, res)
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            out[name] = value
    return out


@pytest.mark.slow
def test_evaluate_coco_fixture_matches_pycocoevalcap(ray_cluster, tracking_uri, tmp_path, demo_root, capsys):
    from raylora.evaluate import evaluate

    cfg = load_config("demo", ["eval.batch_size=4"])
    items, gt = COCO / "annotations/coco_karpathy_test.json", COCO / "annotations/coco_karpathy_test_gt.json"
    out = tmp_path / "eval"
    metrics = evaluate(str(demo_root / "base"), cfg, str(items), str(gt), str(COCO), out)
    printed = capsys.readouterr().out
    direct = _direct_pycocoevalcap(out / "results.json", gt)
    for name, value in direct.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
        assert f"{name}: {value:.3f}" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["image_id"] for r in results] == [i["image_id"] for i in json.loads(items.read_text())]
    page = (out / "gallery.html").read_text()
    assert page.count("class='card'") == len(results) and "data:image/jpeg;base64" in page
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["CIDEr"] == pytest.approx(direct["CIDEr"])


def test_eval_settings_follow_the_model(demo_root):
    from raylora.evaluate import eval_settings

    s = eval_settings(str(demo_root / "base"), load_config("demo"))
    assert s.image_size == 112 and s.tokens_per_tile == 16 and s.template == "Hermes-2"
    assert replace(s, max_num=1).max_num == 1


def test_protocol_line_names_prompt_tokens_tiles_template(demo_root):
    from raylora.evaluate import eval_settings, protocol
    from raylora.generation import GenerationSettings

    line = protocol(GenerationSettings(), eval_settings(str(demo_root / "base"), load_config("demo")))
    assert line.startswith('prompt "Provide a one-sentence caption for the provided image."; greedy, 8 to 30')
    assert "tiles of 112 px" in line and line.endswith("template Hermes-2")


def test_demo_base_loads_with_auto_classes(demo_root):
    """The demo base is a plain transformers checkpoint, processor included (16 tokens per 112 px tile)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_root / "base")
    assert processor.image_seq_length == 16
    assert processor.image_processor.size["height"] == 112 and processor.image_processor.crop_to_patches
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n") and "<IMG_CONTEXT>" in text
