"""The official COCO caption protocol: pycocoevalcap's scorers (Java PTB tokenizer, BLEU, METEOR,
ROUGE-L, CIDEr; no SPICE) run on a results file as ``COCOEvalCap.evaluate`` runs them."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from typing import Any

# pycocoevalcap and pycocotools are imported inside the functions: training's fast CIDEr never needs them.

__all__ = [
    "METRICS",
    "load_gt_and_results",
    "coco_caption_evaluation",
    "coco_caption_scores",
    "format_scores",
]

# the scores coco_caption_evaluation and coco_caption_scores return, in this order
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def load_gt_and_results(results_path: str, gt_path: str) -> tuple[dict, dict]:
    """``gts`` and ``res`` exactly as ``COCOEvalCap.evaluate`` builds them (image id -> annotations),
    restricted to the images of the results file, in the ground truth's image order."""
    with open(results_path) as f:
        results = json.load(f)
    if not isinstance(results, list) or not results:
        raise ValueError(f"{results_path}: expected a non-empty list of {{image_id, caption}}")
    try:
        from pycocotools.coco import COCO
    except ImportError:  # pragma: no cover - pycocotools is a dependency of pycocoevalcap
        COCO = None
    if COCO is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(gt_path)
            try:
                coco_res = coco.loadRes(results_path)
            except AssertionError as e:
                raise ValueError(f"{results_path}: image ids not in {gt_path}") from e
        img_ids = coco_res.getImgIds()
        return (
            {i: coco.imgToAnns[i] for i in img_ids},
            {i: coco_res.imgToAnns[i] for i in img_ids},
        )
    # The same dicts as pycocotools' COCO.createIndex / loadRes, without it.
    with open(gt_path) as f:
        gt = json.load(f)
    gt_anns: dict[Any, list] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        gt_anns.setdefault(ann["image_id"], []).append(ann)
    res_anns: dict[Any, list] = {}
    for idx, ann in enumerate(results):
        if ann["image_id"] not in gt_anns:
            raise ValueError(f"{results_path}: image id {ann['image_id']!r} not in {gt_path}")
        res_anns.setdefault(ann["image_id"], []).append({**ann, "id": idx + 1})
    img_ids = [img["id"] for img in gt["images"] if img["id"] in res_anns]
    return {i: gt_anns[i] for i in img_ids}, {i: res_anns[i] for i in img_ids}


def coco_caption_evaluation(results_path: str, gt_path: str) -> tuple[dict[str, float], dict[Any, float]]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of a results file ``[{"image_id", "caption"}]`` against
    COCO caption ground truth, computed as pycocoevalcap's ``COCOEvalCap.evaluate`` does (Java PTB
    tokenizer, official scorers; no SPICE), over the images present in the results file.

    Returns the scores and each image's CIDEr from the same run (image id -> CIDEr, in the ground
    truth's image order: ``COCOEvalCap.imgToEval[image_id]["CIDEr"]``); their mean is the CIDEr.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts, res = load_gt_and_results(results_path, gt_path)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(gts)
    res = tokenizer.tokenize(res)
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    meteor = Meteor()
    try:
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    finally:
        del meteor  # its __del__ stops the Java process
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    cider, per_image = Cider().compute_score(gts, res)
    scores["CIDEr"] = float(cider)
    # COCOEvalCap.setImgToEvalImgs: the scorer's per-image scores belong to gts' image ids, in order
    return scores, dict(zip(gts, map(float, per_image)))


def coco_caption_scores(results_path: str, gt_path: str) -> dict[str, float]:
    """The scores of ``coco_caption_evaluation`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr; no SPICE)."""
    return coco_caption_evaluation(results_path, gt_path)[0]


def format_scores(scores: Mapping[str, float]) -> str:
    """One ``name: value`` line per metric (3 decimals), as the COCO caption tutorial prints them."""
    return "\n".join(f"{name}: {value:.3f}" for name, value in scores.items())
