"""Evaluation: batched generation equals batch-1, and the metrics equal pycocoevalcap's own run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from raylora.config import ConfigError, load_config
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


def test_batched_beam_search_equals_batch_one(demo_root, demo_settings, demo_base_model, monkeypatch):
    """Beam search (3 beams) with left padding: batched output equals batch-1 output too."""
    items = read_karpathy(demo_root / "data/annotations/demo_test.json", demo_root / "data", limit=4)
    paths = [i.image for i in items] + [str(p) for p in sorted((COCO / "val2014").glob("*.jpg"))[:3]]
    ct = demo_settings.conversation_tokenizer()
    beams: list[int] = []
    generate = demo_base_model.generate

    def spy(*args, **kwargs):
        beams.append(kwargs["num_beams"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(demo_base_model, "generate", spy)
    beam = GenerationSettings(num_beams=3)
    batched = generate_captions(demo_base_model, ct, demo_settings, paths, replace(beam, batch_size=7))
    single = generate_captions(demo_base_model, ct, demo_settings, paths, replace(beam, batch_size=1))
    assert batched == single
    assert beams == [3] * 8  # one batched call, seven single ones: all beam search
    assert all(len(c.split()) >= 3 for c in batched[:4])


def test_generation_protocol_is_recorded(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from raylora.evaluate import log_evaluation, write_gallery

    cfg = load_config("demo", ["eval.num_beams=5"])
    gen = GenerationSettings.from_config(cfg.eval)
    assert (gen.num_beams, gen.decoding, GenerationSettings().decoding) == (5, "beam 5", "greedy")
    assert gen.describe() == f"beam 5, 8-30 new tokens, prompt {cfg.eval.prompt!r}"
    protocol = gen.protocol()
    assert protocol == {
        "decoding": "beam 5",
        "num_beams": 5,
        "min_new_tokens": 8,
        "max_new_tokens": 30,
        "prompt": cfg.eval.prompt,
    }
    image = str(sorted((COCO / "val2014").glob("*.jpg"))[0])
    write_gallery(
        tmp_path / "gallery.html",
        [{"image_id": 1, "image": image}],
        {1: "a cat"},
        {1: ["a cat on a mat"]},
        {1: 0.5},
        "title",
        protocol=gen.describe(),
    )
    assert "beam 5, 8-30 new tokens" in (tmp_path / "gallery.html").read_text()
    for name in ("results.json", "metrics.json"):
        (tmp_path / name).write_text("{}")
    cfg.tracking.uri = tracking_uri
    run_id = log_evaluation(cfg, "demo", "split.json", tmp_path, {"CIDEr": 0.5}, protocol)
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.data.params["decoding"] == "beam 5" and run.data.params["num_beams"] == "5"
    assert run.data.params["min_new_tokens"] == "8" and run.data.params["prompt"] == cfg.eval.prompt
    assert run.data.tags["decoding"] == "beam 5"
    with pytest.raises(ConfigError, match="eval.num_beams"):
        load_config("demo", ["eval.num_beams=0"])


def test_caption_cli_beam_search(demo_root, demo_settings, demo_base_model, capsys):
    from raylora.caption import main

    items = read_karpathy(demo_root / "data/annotations/demo_test.json", demo_root / "data", limit=2)
    images = [i.image for i in items]
    assert main(["--model", str(demo_root / "base"), "--num-beams", "3", "--batch-size", "2", *images]) == 0
    printed = [line.split("\t")[1] for line in capsys.readouterr().out.strip().splitlines()]
    ct = demo_settings.conversation_tokenizer()
    gen = GenerationSettings(num_beams=3, batch_size=1)
    assert printed == generate_captions(demo_base_model, ct, demo_settings, images, gen)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(demo_root / "base"), "--num-beams", "0", images[0]])
    assert e.value.code == 2


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
    assert "greedy, 8 to 30 new tokens" in page
    assert json.loads((out / "metrics.json").read_text())["generation"]["decoding"] == "greedy"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["CIDEr"] == pytest.approx(direct["CIDEr"])


def test_eval_settings_follow_the_model(demo_root):
    from raylora.evaluate import eval_settings

    s = eval_settings(str(demo_root / "base"), load_config("demo"))
    assert s.family.image_size == 112 and s.tokens_per_unit == 16 and s.template.name == "Hermes-2"
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
