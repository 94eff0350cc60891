"""Annotation formats besides the chat JSONL: COCO captions JSON and LLaVA JSON lists give the JSONL's
records row for row (exported by scripts/export_formats.py), and their bad rows reach the ledger."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from raylora.data.prepare import prepare
from raylora.data.records import DataError, detect_format

from .conftest import COCO

REPO = Path(__file__).resolve().parent.parent
TRAIN = COCO / "annotations" / "coco_karpathy_train.jsonl"
SAME = ("images", "conversations", "tiles", "input_ids", "labels", "image_at", "length", "label_tokens")


def _export(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("export_formats", REPO / "scripts" / "export_formats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.export(TRAIN, out) == {"rows": 40, "images": 8, "files": ["captions.json", "llava.json"]}


def test_exported_formats_give_the_jsonl_records(demo_settings, tmp_path, capsys):
    """The same rows from a COCO captions file and a LLaVA list as from the JSONL: same images,
    conversations and tokens (so the same first-step loss), told apart by content alone; data check
    --json accepts each, row for row."""
    from raylora.data.__main__ import main

    _export(tmp_path)
    assert [detect_format(p) for p in (TRAIN, tmp_path / "captions.json", tmp_path / "llava.json")] == [
        "jsonl",
        "coco",
        "llava",
    ]
    ref = prepare(TRAIN, COCO, demo_settings, use_ray=False).table
    for name in ("captions.json", "llava.json"):
        got = prepare(tmp_path / name, COCO, demo_settings, use_ray=False).table
        assert all(got.column(c).to_pylist() == ref.column(c).to_pylist() for c in SAME), name
        assert main(["check", str(tmp_path / name), "--root", str(COCO), "--model", "demo", "--json"]) == 0
        stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert stats["rows_ok"] == stats["rows_total"] == 40


def test_coco_images_are_found_beside_the_annotations_in_the_split_folder(demo_settings, tmp_path):
    """COCO's own layout, no --root: annotations/captions_train2014.json and train2014/ beside it."""
    _export(tmp_path / "export")
    coco = json.loads((tmp_path / "export" / "captions.json").read_text())
    for image in coco["images"]:
        image["file_name"] = image["file_name"].split("/", 1)[1]  # "train2014/X.jpg" -> "X.jpg"
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2014.json").write_text(json.dumps(coco))
    shutil.copytree(COCO / "train2014", tmp_path / "train2014")
    got = prepare(tmp_path / "annotations" / "captions_train2014.json", None, demo_settings, use_ray=False)
    assert got.rows_ok == 40 and not got.rejects
    assert all(p[0].startswith(str(tmp_path / "train2014")) for p in got.table.column("images").to_pylist())


def test_bad_coco_and_llava_rows_are_accounted_for_row_by_row(demo_settings, tmp_path):
    image = "train2014/COCO_train2014_000000034181.jpg"
    coco = {
        "images": [{"id": 1, "file_name": image}, {"id": 2, "file_name": "train2014/missing.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a room"},  # ok
            "not an object",
            {"id": 12, "image_id": 1, "caption": None},
            {"id": 13, "image_id": 1, "caption": 5},
            {"id": 14, "image_id": 99, "caption": "an image id without an image"},
            {"id": 15, "image_id": 2, "caption": "its file is missing"},
            {"id": 16, "image_id": 1, "caption": "   "},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    got = prepare(tmp_path / "captions.json", COCO, demo_settings, use_ray=False)
    assert got.rows_ok == 1 and got.rows_total == 7
    assert {r.line: r.reason for r in got.rejects} == {
        2: "bad_fields",
        3: "empty_caption",
        4: "bad_fields",
        5: "bad_fields",
        6: "image_missing",
        7: "empty_caption",
    }
    assert all(r.source == str(tmp_path / "captions.json") and r.row for r in got.rejects)

    ok = {
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
    }
    llava = [
        ok,
        "a string",
        {"image": image},
        {
            "image": image,
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": ""}],
        },
        {**ok, "image": "train2014/missing.jpg"},
        {**ok, "image": "../../outside.jpg"},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    got = prepare(tmp_path / "llava.json", COCO, demo_settings, use_ray=False)
    assert got.rows_ok == 1 and got.rows_total == 6
    assert {r.line: r.reason for r in got.rejects} == {
        2: "bad_fields",
        3: "bad_fields",
        4: "empty_caption",
        5: "image_missing",
        6: "image_outside_root",
    }

    (tmp_path / "broken.json").write_text('[{"image": "a.jpg",\n "conversations": [}')
    with pytest.raises(DataError, match=r"broken.json:2: invalid LLaVA JSON"):
        prepare(tmp_path / "broken.json", COCO, demo_settings, use_ray=False)
    with pytest.raises(DataError, match="is a JSON list of rows"):
        prepare(tmp_path / "captions.json", COCO, demo_settings, use_ray=False, fmt="llava")


def test_a_second_validation_of_the_same_data_is_reused(demo_settings, tmp_path, monkeypatch, capsys):
    """The records and rejects of a validation are cached by content: the same annotation, images
    (path, size, mtime) and settings reuse them (one line says so); a touched image checks again."""
    import os

    monkeypatch.setenv("RAYLORA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "coco"
    shutil.copytree(COCO, root)
    annotation = root / "annotations" / "coco_karpathy_train.jsonl"
    with open(annotation, "a") as f:
        f.write('{"image": "train2014/nowhere.jpg", "conversations": []}\n')  # one reject to keep too
    first = prepare(annotation, root, demo_settings, use_ray=False, progress=True)
    assert "checking 8 images" in capsys.readouterr().err
    again = prepare(annotation, root, demo_settings, use_ray=False, progress=True)
    assert "validation reused: 40 rows ok, 1 rejected" in capsys.readouterr().err
    assert again.table.equals(first.table) and again.rejects == first.rejects
    assert again.rows_total == first.rows_total == 41
    image = next((root / "train2014").iterdir())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    prepare(annotation, root, demo_settings, use_ray=False, progress=True)
    assert "checking 8 images" in capsys.readouterr().err
