"""raylora.metrics against pycocoevalcap: the Java PTB tokenizer, CIDEr-D and the COCO protocol."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from raylora import metrics
from raylora.metrics import (
    cider,
    cider_per_image,
    coco_caption_evaluation,
    coco_caption_scores,
    format_scores,
    ptb_tokenize,
    ptb_tokenize_lines,
)
from raylora.metrics.coco import METRICS, load_gt_and_results

FIXTURES = Path(__file__).parent / "fixtures"
GT_FILES = [
    FIXTURES / "coco_karpathy_val_gt_full.json",
    FIXTURES / "coco_karpathy_test_gt_full.json",
    FIXTURES / "coco" / "annotations" / "coco_karpathy_test_gt.json",
]

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer needs Java")

# Captions with the cases a PTB tokenizer gets wrong most easily. Order matters: a caption ending in
# a single letter and a period ("Route A.") splits the period off before "A ..." on the next line.
EDGE_CASES = [
    "A dog's toy isn't on the man's bed, it's under the kids' table.",
    "Don't stop: we'll, you're, they've, I'd, can't, won't, ain't, y'all, o'clock, ma'am.",
    "a cannot gonna wanna gotta lemme gimme 'tis 'twas dunno sentence",
    "A black-and-white photo of a 3-year-old with a T-shirt, x-ray and e-mail.",
    "A sign says \"STOP\" and 'yield' with “curly” ‘quotes’ and «guillemets».",
    "Salt & pepper, R&B, AT&T, S&P-500 and &amp; entities &lt;3 &quot;x&quot;",
    "his/her 8th Ave/CTH D. 22 3/4 St and 1/2 or ½ cup, 24/7 and 12/25/2014",
    "Wait... what?! no!! a....b . . . end… x -- y --- z — w – v",
    "A man (left) with [brackets] and {braces} and <b>tags</b> in a < b > c",
    "  leading and trailing spaces  ",
    "double  spaces\tand\ttabs and\u00a0no-break spaces",
    "Café naïve Zürich ÉCOLE Москва 東京 ß emoji 😀 here",
    "3.5 1,000 .5 -5 +3 10:30 p.m. 5'11 '80s 1980s 2nd 555-1234 (555) 555-1234",
    "Mr. Smith on St. Patrick's Ave. and Mt. Fuji, Dr. Who, U.S. The end, e.g. a.k.a. etc. The",
    "fig. 5 No. 5 Inc. Co. Ltd. Jan. Feb. Mass. mass. Ill. ill. vs. cf. approx. 5",
    "http://www.example.com/a?b=1 www.coco.org foo@bar.com #hashtag @user c++ C# file.jpg 12.x",
    ":) :-( ;) =D ^_^ (^_^) x_x :P :o :]",
    "Route A.",
    "A dog on the road.",
    "fig.",
    "5 figs in a bowl",
    "a soft\u00adhyphen and a zero\u200bwidth space",
    "",
    ".",
    "Is that you're",
]


def _real_captions() -> list[str]:
    caps = [
        c
        for v in json.loads((FIXTURES / "coco_karpathy_train_captions.json").read_text()).values()
        for c in v
    ]
    for path in GT_FILES:
        caps += [a["caption"] for a in json.loads(path.read_text())["annotations"]]
    return caps


def _java_tokenize(lines: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer on ``lines``, as one input file in this order."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(lines)})
    return [out[i][0] for i in range(len(lines))]


def _pycocoevalcap_cider(gts: dict, res: dict) -> tuple[float, np.ndarray]:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    g = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
    r = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    score, scores = Cider().compute_score(g, r)
    return float(score), np.asarray(scores)


def _synthetic_captions(rng: random.Random, n: int) -> list[str]:
    """Simple sentences of varied length and vocabulary, some with punctuation and contractions."""
    subjects = "a man|A woman|two dogs|The cat|a young boy|Three people|a red bus|an old truck".split("|")
    verbs = "is riding|sits on|holds|is standing next to|looks at|walks past|isn't near|eats".split("|")
    objects = "a bike|the table|a frisbee|some pizza|a big umbrella|the street|a kite|bananas".split("|")
    extras = [
        "in the park",
        "on a sunny day",
        ", near the water",
        "with a friend's dog",
        "while it's raining",
        "(at night)",
        "by a black-and-white sign",
        "next to 2 benches",
        'that says "STOP"',
        "& a ball",
        "...",
        "in the U.S.",
    ]
    out = []
    for _ in range(n):
        words = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
        words += rng.sample(extras, rng.randint(0, 3))
        s = " ".join(words).replace(" ,", ",")
        s += rng.choice([".", ".", "", " .", "!", "?"])
        out.append(s[0].upper() + s[1:] if rng.random() < 0.5 else s)
    return out


@pytest.fixture(scope="module")
def reference_tokens() -> tuple[list[str], list[str]]:
    """All real captions, the edge cases and synthetic ones, and the Java tokenizer's output (one run)."""
    lines = _real_captions() + EDGE_CASES + _synthetic_captions(random.Random(1), 300) + ["you're"]
    return lines, _java_tokenize(lines)


def test_ptb_tokenize_equals_java_tokenizer(reference_tokens):
    lines, expected = reference_tokens
    assert ptb_tokenize_lines(lines) == expected
    got = [ptb_tokenize(c, lines[i + 1] if i + 1 < len(lines) else None) for i, c in enumerate(lines)]
    assert got == expected
    metrics.clear_caches()  # and again from a cold cache, one caption at a time
    for i, c in enumerate(lines):
        assert ptb_tokenize(c, lines[i + 1] if i + 1 < len(lines) else None) == expected[i], c


def test_ptb_tokenize_examples():
    assert ptb_tokenize("A man's hat isn't red.") == "a man 's hat is n't red"
    assert ptb_tokenize("Don't (really) go.") == "do n't -lrb- really -rrb- go"
    assert ptb_tokenize("  A  dog, a cat... ") == "a dog a cat"
    assert ptb_tokenize("22 3/4 street") == "22\u00a03/4 street"
    # a single letter before "A ..." on the next line loses its period (and is kept at the end)
    assert ptb_tokenize("Route A.", next_line="A dog") == "route a"
    assert ptb_tokenize("Route A.") == "route a."
    # at the very end of the file the tokenizer splits a contraction differently
    assert ptb_tokenize("you're", next_line="x") == "you 're"
    assert ptb_tokenize("you're") == "you re"


def _leave_one_out() -> tuple[dict, dict]:
    groups = dict(json.loads((FIXTURES / "coco_karpathy_train_captions.json").read_text()))
    for path in GT_FILES[:2]:
        for a in json.loads(path.read_text())["annotations"]:
            groups.setdefault(f"{path.stem}/{a['image_id']}", []).append(a["caption"])
    gts = {k: v[1:] for k, v in groups.items()}
    res = {k: [v[0]] for k, v in groups.items()}
    return gts, res


def test_cider_equals_pycocoevalcap_on_real_captions():
    gts, res = _leave_one_out()
    assert len(gts) == 220
    expected, per_image = _pycocoevalcap_cider(gts, res)
    assert cider(gts, res) == pytest.approx(expected, abs=1e-6)
    ours = cider_per_image(gts, res)
    assert list(ours) == list(gts)
    np.testing.assert_allclose([ours[k] for k in gts], per_image, rtol=0, atol=1e-9)


def test_cider_equals_pycocoevalcap_on_synthetic_captions():
    rng = random.Random(7)
    caps = _synthetic_captions(rng, 6 * 150)
    gts = {i: caps[6 * i : 6 * i + 5] for i in range(150)}
    res = {i: [caps[6 * i + 5]] for i in range(150)}
    gts[3] = gts[3][:2]  # any number of references
    expected, per_image = _pycocoevalcap_cider(gts, res)
    assert cider(gts, res) == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(list(cider_per_image(gts, res).values()), per_image, rtol=0, atol=1e-9)
    # other n and sigma: pycocoevalcap's scorer always cooks 1..4-grams, so make it cook 1..2-grams
    import pycocoevalcap.cider.cider_scorer as cider_scorer

    precook = cider_scorer.precook
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cider_scorer, "precook", lambda s, n=4, out=False: precook(s, 2, out))
        scorer = cider_scorer.CiderScorer(n=2, sigma=3.0)
        for k in gts:
            scorer += (ptb_tokenize(res[k][0]), [ptb_tokenize(c) for c in gts[k]])
        expected2, _ = scorer.compute_score()
    assert cider(gts, res, n=2, sigma=3.0) == pytest.approx(float(expected2), abs=1e-6)


def test_cider_per_image_mean_is_cider_and_inputs():
    gts, res = _leave_one_out()
    per_image = cider_per_image(gts, res)
    assert np.mean(list(per_image.values())) == pytest.approx(cider(gts, res), abs=1e-12)
    # plain strings and {"caption": ...} entries are accepted
    plain = {k: v[0] for k, v in res.items()}
    dicts = {k: [{"caption": c} for c in v] for k, v in gts.items()}
    assert cider(dicts, plain) == pytest.approx(cider(gts, res), abs=1e-12)
    # the right candidates score higher than shuffled ones
    refs = {1: ["a dog runs on the grass"], 2: ["a cat sleeps on a bed"], 3: ["two birds fly over a lake"]}
    right = {k: v[0] for k, v in refs.items()}
    wrong = {1: right[2], 2: right[3], 3: right[1]}
    assert cider(refs, right) > cider(refs, wrong) >= 0
    with pytest.raises(ValueError):
        cider({1: ["a"]}, {2: "a"})
    with pytest.raises(ValueError):
        cider({1: []}, {1: "a"})
    with pytest.raises(ValueError):
        cider({1: ["a"]}, {1: ["a", "b"]})


class _NoSpice:
    """SPICE needs the Stanford models (a download): COCOEvalCap runs with this stand-in."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.fixture(scope="module")
def coco_case(tmp_path_factory):
    """A results file for some of the fixture's images, and ``COCOEvalCap``'s own run on it (SPICE
    stubbed out). One METEOR process (a Java start-up of several seconds) serves every run."""
    import pycocoevalcap.eval as coco_eval
    import pycocoevalcap.meteor.meteor as meteor_module
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    gt_path = GT_FILES[2]
    gt = json.loads(gt_path.read_text())
    rng = random.Random(3)
    results = []
    for img in gt["images"][:4]:  # only some of the images: scores are over the results' images
        caps = [a["caption"] for a in gt["annotations"] if a["image_id"] == img["id"]]
        results.append(
            {"image_id": img["id"], "caption": " ".join(rng.choice(caps).split()[: rng.randint(4, 9)])}
        )
    results_path = tmp_path_factory.mktemp("coco") / "results.json"
    results_path.write_text(json.dumps(results))

    shared = meteor_module.Meteor()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", lambda: shared)
        mp.setattr(coco_eval, "Meteor", lambda: shared)
        mp.setattr(coco_eval, "Spice", _NoSpice)
        coco = COCO(str(gt_path))
        coco_res = coco.loadRes(str(results_path))
        evaluator = COCOEvalCap(coco, coco_res)
        evaluator.params["image_id"] = coco_res.getImgIds()
        evaluator.evaluate()
        yield str(results_path), str(gt_path), evaluator


def test_coco_caption_scores_equals_cocoevalcap(coco_case, monkeypatch):
    results_path, gt_path, evaluator = coco_case
    ours = coco_caption_scores(results_path, gt_path)
    expected = {k: v for k, v in evaluator.eval.items() if k != "SPICE"}
    assert list(ours) == list(METRICS)
    assert ours == pytest.approx(expected, abs=1e-12)
    assert 0 < ours["CIDEr"] and 0 < ours["Bleu_1"] <= 1

    # the same dicts without pycocotools
    with_coco = load_gt_and_results(results_path, gt_path)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    without = load_gt_and_results(results_path, gt_path)
    assert [list(d) for d in without] == [list(d) for d in with_coco]
    assert [[[a["caption"] for a in v] for v in d.values()] for d in without] == [
        [[a["caption"] for a in v] for v in d.values()] for d in with_coco
    ]


def test_coco_caption_evaluation_per_image_cider_is_cocoevalcaps(coco_case):
    results_path, gt_path, evaluator = coco_case
    scores, per_image = coco_caption_evaluation(results_path, gt_path)
    assert scores == pytest.approx({k: v for k, v in evaluator.eval.items() if k != "SPICE"}, abs=1e-12)
    assert list(per_image) == list(evaluator.imgToEval) and len(per_image) == 4
    assert per_image == {i: e["CIDEr"] for i, e in evaluator.imgToEval.items()}
    assert float(np.mean(list(per_image.values()))) == pytest.approx(scores["CIDEr"], abs=1e-15)
    assert len(set(per_image.values())) > 1  # really per image


def test_format_scores():
    text = format_scores({"Bleu_4": 0.31234, "CIDEr": 1.3119})
    assert text == "Bleu_4: 0.312\nCIDEr: 1.312"
