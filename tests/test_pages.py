"""The HTML pages (evaluation gallery, sweep report) opened from disk in headless Chromium: every image
loads, nothing logs an error, and a screenshot is saved next to each page for people to look at
(under pytest's temporary folder: the test prints where).

Chromium is required, not optional: ``.ci/run`` installs it, and without it these tests fail saying
how to install it. The pages are built from small inputs here, without Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raylora.pages import INSTALL, PageCheck, check_page, find_chromium, save_screenshot, screenshot

FIXTURES = Path(__file__).parent / "fixtures"
COCO = FIXTURES / "coco"


@pytest.fixture(scope="module", autouse=True)
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.fail(f"Chromium is needed for the page tests; install it: {INSTALL}", pytrace=False)
    return exe


def _look(page: Path) -> PageCheck:
    """Check ``page`` and save its screenshot next to it; fail on any broken image or error."""
    png = page.with_suffix(".png")
    check = screenshot(page, png)
    print(f"screenshot: {png}")
    assert check.ok, check.problems()
    assert png.is_file() and png.stat().st_size > 1000
    return check


# ------------------------------------------------------------------------------ the checker itself


def test_broken_images_and_errors_are_reported(tmp_path: Path) -> None:
    """Negative control: a missing file, a corrupt data URI and a script error are all caught."""
    (tmp_path / "good.jpg").write_bytes(next((COCO / "val2014").glob("*.jpg")).read_bytes())
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'></head><body>"
        "<img src='good.jpg'><img src='missing.png'><img src='data:image/jpeg;base64,AAAA'>"
        "<script>console.error('bad thing'); notDefined();</script></body></html>"
    )
    check = check_page(page)
    assert check.images == 3
    assert check.broken == ["missing.png", "data:image/jpeg;base64,AAAA"]
    assert any("bad thing" in e for e in check.errors)
    assert any("notDefined" in e for e in check.errors)
    assert any("missing.png" in e for e in check.errors)
    assert not check.ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.html", "good.jpg"]  # no probe copy left


def test_clean_page_passes(tmp_path: Path) -> None:
    (tmp_path / "good.jpg").write_bytes(next((COCO / "val2014").glob("*.jpg")).read_bytes())
    page = tmp_path / "clean.html"
    page.write_text("<html><head><title>t</title></head><body><img src='good.jpg'><p>hello</p></body></html>")
    check = _look(page)
    assert check.images == 1 and check.height > 0


def test_save_screenshot_without_chromium_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import raylora.pages

    page = tmp_path / "p.html"
    page.write_text("<html><body>x</body></html>")
    monkeypatch.setattr(raylora.pages, "find_chromium", lambda: None)
    assert save_screenshot(page, "eval") is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "Chromium not found" in out and INSTALL in out
    assert not page.with_suffix(".png").exists()


def test_save_screenshot_never_raises(tmp_path: Path, capsys) -> None:
    assert save_screenshot(tmp_path / "absent.html", "sweep") is None
    assert "no screenshot of absent.html" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ the pages


def _gallery_inputs() -> tuple[list[dict], dict[int, str], dict[int, list[str]], dict[int, float]]:
    """The fixture's 6 real COCO test images, made-up captions from good to bad, their CIDEr-D."""
    from raylora.data.records import read_gt, read_karpathy
    from raylora.metrics.cider import cider_per_image

    eval_items = read_karpathy(COCO / "annotations/coco_karpathy_test.json", COCO)
    items = [{"image_id": i.image_id, "image": i.image} for i in eval_items]
    gts = read_gt(COCO / "annotations/coco_karpathy_test_gt.json", [it["image_id"] for it in items])
    made_up = ["a picture of something", "a man <b>& a</b> dog on a street", "a large white object"]
    captions = {
        iid: refs[0].lower() if k % 2 == 0 else made_up[k % len(made_up)]
        for k, (iid, refs) in enumerate(gts.items())
    }
    return items, captions, gts, cider_per_image(gts, captions)


def _trial_rows() -> list[dict]:
    """Five trials as ``trial_rows`` makes them: two batch sizes, one stopped early, one failed."""
    rows = []
    specs = [
        ("a1b2c_00000", 16, 1e-4, 8, "completed", [0.21, 0.35, 0.42, 0.47]),
        ("a1b2c_00001", 64, 3e-4, 8, "completed", [0.30, 0.52, 0.61, 0.66]),
        ("a1b2c_00002", 8, 2e-5, 16, "stopped early", [0.05]),
        ("a1b2c_00003", 32, 1.5e-4, 16, "completed", [0.25, 0.50]),
        ("a1b2c_00004", 128, 9e-4, 8, "failed", []),
    ]
    for k, (tid, rank, lr, gbs, state, curve) in enumerate(specs):
        every = 10 if gbs == 8 else 20  # a run of 40 steps at batch 8, 40 at 16: same samples
        history = [[every * (i + 1) // (gbs // 8), c] for i, c in enumerate(curve)]
        rows.append(
            {
                "trial_id": tid,
                "params": {"lora.rank": rank, "train.lr": lr, "train.global_batch_size": gbs},
                "cider": curve[-1] if curve else None,
                "steps": history[-1][0] if history else 0,
                "total_steps": 40 if gbs == 8 else 20,
                "state": state,
                "checkpoint": f"/runs/sweep/trials/{tid}/checkpoint_000003" if curve else None,
                "history": history,
                "path": f"/runs/sweep/run_trial_{tid}",
                "mlflow_run_id": f"{k:x}" * 32,
            }
        )
    return rows


def test_gallery_in_chromium(tmp_path: Path) -> None:
    from raylora.evaluate import write_gallery

    items, captions, gts, per_image = _gallery_inputs()
    page = tmp_path / "gallery.html"
    scores = {"Bleu_1": 0.61, "Bleu_4": 0.23, "METEOR": 0.21, "ROUGE_L": 0.47, "CIDEr": 0.84}
    write_gallery(
        page,
        items,
        captions,
        gts,
        per_image,
        "raylora evaluation: demo",
        model="outputs/demo/adapter",
        split="tests/fixtures/coco/annotations/coco_karpathy_test.json",
        protocol='prompt "Provide a one-sentence caption for the provided image."; greedy',
        scores=scores,
    )
    check = _look(page)
    assert check.images == len(items) == 6
    text = page.read_text()
    for shown in ("outputs/demo/adapter", "coco_karpathy_test.json", "one-sentence caption", "0.840"):
        assert shown in text
    assert "a man &lt;b&gt;&amp; a&lt;/b&gt; dog" in text  # captions are text, never markup
    worst = min(per_image, key=per_image.get)
    assert text.index(f"image {worst}<") < min(text.index(f"image {i}<") for i in per_image if i != worst)


def test_gallery_without_header_information(tmp_path: Path) -> None:
    """The old call (no model, split, protocol, scores) still makes a clean page."""
    from raylora.evaluate import write_gallery

    items, captions, gts, per_image = _gallery_inputs()
    page = tmp_path / "gallery.html"
    write_gallery(page, items[:2], captions, gts, per_image, "raylora evaluation", limit=1)
    assert _look(page).images == 1
    assert "Showing 1 of 2 images" in page.read_text()


def test_report_in_chromium(tmp_path: Path) -> None:
    from raylora.sweep import write_report

    files = write_report(_trial_rows(), tmp_path, "raylora sweep demo_sweep")
    assert {f.name for f in files} >= {"report.html", "trials.json", "cider_vs_lr.png"}
    check = _look(tmp_path / "report.html")
    assert check.images == 3
