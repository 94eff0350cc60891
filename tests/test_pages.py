"""The HTML pages (evaluation gallery, sweep report) opened from disk in headless Chromium: every image
loads, nothing logs an error, and a screenshot is saved next to each page for people to look at
(under pytest's temporary folder: the test prints where).

Chromium is required, not optional: ``.ci/run`` installs it, and without it these tests fail saying
how to install it. The pages are built from small inputs here, without Ray.
"""

from __future__ import annotations

import json
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
    """Five trials as ``trial_rows`` makes them: two batch sizes, one stopped early, one failed; the
    champion's best validation is before its last."""
    rows = []
    specs = [
        ("a1b2c_00000", 16, 1e-4, 8, "completed", [0.21, 0.35, 0.42, 0.47]),
        ("a1b2c_00001", 64, 3e-4, 8, "completed", [0.30, 0.66, 0.61, 0.52]),
        ("a1b2c_00002", 8, 2e-5, 16, "stopped early", [0.05]),
        ("a1b2c_00003", 32, 1.5e-4, 16, "completed", [0.25, 0.50]),
        ("a1b2c_00004", 128, 9e-4, 8, "failed", []),
    ]
    for k, (tid, rank, lr, gbs, state, curve) in enumerate(specs):
        every = 10 if gbs == 8 else 20  # a run of 40 steps at batch 8, 40 at 16: same samples
        history = [[every * (i + 1) // (gbs // 8), c] for i, c in enumerate(curve)]
        best = max(history, key=lambda h: h[1]) if history else [None, None]
        rows.append(
            {
                "trial_id": tid,
                "params": {"lora.rank": rank, "train.lr": lr, "train.global_batch_size": gbs},
                "cider": best[1],
                "best_step": best[0],
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
    """Champion marked and registered, each trial linked to its run on the server, curves by samples."""
    from raylora.sweep import write_report

    rows = _trial_rows()
    files = write_report(
        rows,
        tmp_path,
        "raylora sweep demo_sweep",
        tracking_uri="http://127.0.0.1:5000",
        experiment_id="7",
        registered=("raylora-demo-lora", 3, True),
    )
    assert {f.name for f in files} == {
        "cider_vs_lr.png",
        "cider_vs_rank.png",
        "learning_curves.png",
        "report.html",
        "trials.json",
    }
    check = _look(tmp_path / "report.html")
    assert check.images == 3
    text = (tmp_path / "report.html").read_text()
    assert "<table>" in text and "<pre>" not in text
    assert text.count("<tr class='best'>") == 1
    assert "Best trial a1b2c_00001</b>: val CIDEr 0.660 at step 20" in text  # its best, not its last
    assert "<td class='num'>0.660</td><td class='num'>20</td><td class='num'>40 / 40</td>" in text
    assert "version 3 and is now the registry's <b>champion</b>" in text
    for k in range(5):
        assert f"href='http://127.0.0.1:5000/#/experiments/7/runs/{f'{k:x}' * 32}'" in text
    assert "mlflow ui" not in text
    assert "samples seen" in text and "<td class='num'>320</td>" in text  # 40 steps x batch 8
    assert json.loads((tmp_path / "trials.json").read_text()) == rows


def test_report_local_store_and_unsearched_batch_size(tmp_path: Path) -> None:
    """A local store: run ids and one ``mlflow ui`` hint. Batch size from the base config."""
    from raylora.sweep import write_report

    rows = _trial_rows()
    for r in rows:
        r["params"].pop("train.global_batch_size")
    uri = "sqlite:////data/mlflow/mlflow.db"
    registered = ("raylora-demo-lora", 4, False)
    write_report(
        rows,
        tmp_path,
        "sweep",
        tracking_uri=uri,
        experiment_id="1",
        global_batch_size=4,
        registered=registered,
    )
    assert _look(tmp_path / "report.html").images == 3
    text = (tmp_path / "report.html").read_text()
    assert text.count(f"mlflow ui --backend-store-uri {uri}") == 1 and "href=" not in text
    assert f"<code>{'0' * 32}</code>" in text
    assert "champion stays on an earlier version" in text
    assert "<td class='num'>160</td>" in text  # 40 steps x batch 4


def test_report_old_call_and_no_scored_trial(tmp_path: Path) -> None:
    """``write_report(rows, out, title)`` as before; a sweep where every trial failed still has a page."""
    from raylora.sweep import write_report

    rows = [r for r in _trial_rows() if r["state"] == "failed"]
    write_report(rows, tmp_path, "raylora sweep")
    assert _look(tmp_path / "report.html").images == 3
    text = (tmp_path / "report.html").read_text()
    assert "No trial reported a validation CIDEr" in text and f"<code>{'4' * 32}</code>" in text


def test_report_curves_by_step_when_batch_size_unknown(tmp_path: Path) -> None:
    from raylora.sweep import write_report

    rows = _trial_rows()
    for r in rows:
        r["params"].pop("train.global_batch_size")
    write_report(rows, tmp_path, "raylora sweep")
    text = (tmp_path / "report.html").read_text()
    assert "against optimizer step;" in text and "<td class='num'>-</td><td><span class='state" in text
    assert check_page(tmp_path / "report.html").ok
