"""Annotation formats besides the chat JSONL: COCO captions JSON and LLaVA JSON lists give the JSONL's
records row for row (exported by scripts/export_formats.py), and their bad rows reach the ledger."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from raylora.data.prepare import line_chunks, prepare
from raylora.data.records import DataError, detect_format

from .conftest import COCO

REPO = Path(__file__).resolve().parent.parent
TRAIN = COCO / "annotations" / "coco_karpathy_train.jsonl"
SAME = ("images", "conversations", "tiles", "input_ids", "labels", "image_at", "length", "label_tokens")


def _exporter():
    """scripts/export_formats.py as a module."""
    spec = importlib.util.spec_from_file_location("export_formats", REPO / "scripts" / "export_formats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _export(out: Path) -> None:
    module = _exporter()
    files = ["captions.json", "llava.json", "parquet", "webdataset"]
    assert module.export(TRAIN, out) == {"rows": 40, "images": 8, "files": files}


def test_exported_formats_give_the_jsonl_records(demo_settings, tmp_path, capsys):
    """The same rows from a COCO captions file, a LLaVA list, a folder of Parquet files (image bytes
    inside) and a folder of WebDataset shards as from the JSONL: same conversations, tokens, tiles
    and pixels (so the same first-step loss), in the same order, told apart by content alone; data
    check --json accepts each, given as the file or folder itself, row for row."""
    from raylora.data.__main__ import main
    from raylora.data.records import load_rgb

    _export(tmp_path)
    formats = {
        "captions.json": "coco",
        "llava.json": "llava",
        "parquet": "parquet",
        "webdataset": "webdataset",
    }
    assert detect_format(TRAIN) == "jsonl"
    assert {name: detect_format(tmp_path / name) for name in formats} == formats
    ref = prepare(TRAIN, COCO, demo_settings, use_ray=False).table
    pixels = {
        p: np.asarray(load_rgb(p)) for p in set(ref.column("images").to_pylist()[i][0] for i in range(40))
    }
    for name, kind in formats.items():
        got = prepare(
            tmp_path / name, COCO if kind in ("coco", "llava") else None, demo_settings, use_ray=False
        )
        got = got.table
        same = SAME if kind in ("coco", "llava") else tuple(c for c in SAME if c != "images")
        assert all(got.column(c).to_pylist() == ref.column(c).to_pylist() for c in same), name
        for mine, theirs in zip(got.column("images").to_pylist(), ref.column("images").to_pylist()):
            assert np.array_equal(np.asarray(load_rgb(mine[0])), pixels[theirs[0]]), (name, mine)
        assert got.column("group_key").to_pylist() != [""] * 40  # captions of an image still share it
        assert len(set(got.column("group_key").to_pylist())) == 8
        root = ["--root", str(COCO)] if kind in ("coco", "llava") else []
        rejects = ["--rejects", str(tmp_path / f"{name}.rejects.jsonl")]  # not into the current folder
        assert main(["check", str(tmp_path / name), *root, *rejects, "--model", "demo", "--json"]) == 0
        stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert stats["rows_ok"] == stats["rows_total"] == 40, name


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


def test_bad_parquet_rows_are_accounted_for_row_by_row(demo_settings, tmp_path):
    """Wrong column types, missing images and captions, undecodable bytes, a file that is not Parquet
    and one cut short: each row (or the rest of a file) is a reject naming the file and the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = (COCO / "train2014" / "COCO_train2014_000000034181.jpg").read_bytes()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    folder = tmp_path / "parquet"
    folder.mkdir()
    images = [
        {"bytes": jpeg, "path": "a.jpg"},  # 1 ok
        {"bytes": b"not an image", "path": "b.jpg"},  # 2 image_unreadable
        {"bytes": jpeg[:2000], "path": "c.jpg"},  # 3 image_truncated
        None,  # 4 bad_fields: no image
        {"bytes": None, "path": "missing.jpg"},  # 5 image_missing (a path under the folder)
        {"bytes": jpeg, "path": "f.jpg"},  # 6 empty_caption
        {"bytes": jpeg, "path": "g.jpg"},  # 7 empty_caption (an empty string in the list)
    ]
    sentences = [["a room"], ["x"], ["x"], ["x"], ["x"], [], ["a", " "]]
    pq.write_table(
        pa.table(
            {"image": pa.array(images, image_type), "sentences": pa.array(sentences, pa.list_(pa.string()))}
        ),
        folder / "a.parquet",
    )
    pq.write_table(pa.table({"image": pa.array([jpeg]), "caption": pa.array([7])}), folder / "b.parquet")
    pq.write_table(
        pa.table({"image": pa.array([jpeg]), "text": pa.array(["no caption column"])}), folder / "c.parquet"
    )
    (folder / "d.parquet").write_bytes(b"PAR1 this is not parquet")
    whole = (folder / "a.parquet").read_bytes()
    (folder / "e.parquet").write_bytes(whole[: len(whole) // 2])  # cut short: the footer is gone
    got = prepare(folder, None, demo_settings, use_ray=False)
    reasons = {(Path(r.source).name, r.line): r.reason for r in got.rejects}
    assert reasons == {
        ("a.parquet", 2): "image_unreadable",
        ("a.parquet", 3): "image_truncated",
        ("a.parquet", 4): "bad_fields",
        ("a.parquet", 5): "image_missing",
        ("a.parquet", 6): "empty_caption",
        ("a.parquet", 7): "empty_caption",
        ("b.parquet", 1): "bad_fields",
        ("c.parquet", 1): "bad_fields",
        ("d.parquet", 1): "shard_unreadable",
        ("e.parquet", 1): "shard_unreadable",
    }
    assert got.rows_ok == 1 and got.table.column("line").to_pylist() == [1]
    assert "the caption must be a string or a list of strings, not 7" in got.rejects[6].detail
    assert "no column caption or sentences" in got.rejects[7].detail
    assert all(r.row or r.reason == "shard_unreadable" for r in got.rejects)
    assert all(len(r.row) < 400 for r in got.rejects)  # image bytes are not copied into the ledger
    assert '"bytes": "<2000 bytes>"' in got.rejects[1].row or "#row=2&column=image" in got.rejects[1].row


def test_bad_webdataset_samples_are_accounted_for_row_by_row(demo_settings, tmp_path):
    """A member without caption, a sample without image, undecodable bytes, a caption that is not
    UTF-8 or a .json without 'caption', a shard cut short mid-member and a file that is not a tar:
    each sample is a reject naming the shard, the sample number and its members."""
    import io
    import tarfile

    jpeg = (COCO / "train2014" / "COCO_train2014_000000034181.jpg").read_bytes()
    folder = tmp_path / "shards"
    folder.mkdir()

    def shard(name: str, members: list[tuple[str, bytes]]) -> Path:
        with tarfile.open(folder / name, "w") as tar:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return folder / name

    shard(
        "a.tar",
        [
            ("s1.jpg", jpeg),
            ("s1.txt", b"a room"),  # 1 ok
            ("s2.jpg", jpeg),  # 2 no caption member
            ("s3.txt", b"no image"),  # 3 bad_fields
            ("s4.jpg", b"garbage"),
            ("s4.txt", b"undecodable"),  # 4 image_unreadable
            ("s5.jpg", jpeg),
            ("s5.txt", b"caf\xe9"),  # 5 not_utf8
            ("s6.jpg", jpeg),
            ("s6.json", b'{"text": "x"}'),  # 6 bad_fields
            ("s7.png", jpeg),
            ("s7.json", b'{"caption": ["one", "two"]}'),  # 7 ok, two rows
            ("s8.jpg", jpeg),
            ("s8.txt", b"   "),  # 8 empty_caption
        ],
    )
    cut = shard("b.tar", [("t1.jpg", jpeg), ("t1.txt", b"kept"), ("t2.jpg", jpeg), ("t2.txt", b"cut")])
    data = cut.read_bytes()
    cut.write_bytes(data[: 512 + len(jpeg) + 512 + 512 + 512 + 3000])  # t2.jpg's data cut short
    (folder / "c.tar").write_bytes(b"this is not a tar file at all" * 40)
    got = prepare(folder, None, demo_settings, use_ray=False)
    reasons = {(Path(r.source).name, r.line): r.reason for r in got.rejects}
    assert reasons == {
        ("a.tar", 2): "empty_caption",
        ("a.tar", 3): "bad_fields",
        ("a.tar", 4): "image_unreadable",
        ("a.tar", 5): "not_utf8",
        ("a.tar", 6): "bad_fields",
        ("a.tar", 8): "empty_caption",
        ("b.tar", 2): "shard_unreadable",
        ("c.tar", 1): "shard_unreadable",
    }
    kept = sorted(zip(got.table.column("source").to_pylist(), got.table.column("line").to_pylist()))
    assert [(Path(s).name, n) for s, n in kept] == [("a.tar", 1), ("a.tar", 7), ("a.tar", 7), ("b.tar", 1)]
    assert "s2.jpg" in next(r.detail for r in got.rejects if r.line == 2 and r.source.endswith("a.tar"))


def test_a_second_validation_of_the_same_data_is_reused(demo_settings, tmp_path, monkeypatch, capsys):
    """The records and rejects of a validation are cached by content: the same annotation, images
    (path, size, mtime) and settings reuse them (one line says so); a touched image checks again, and
    so does data with a missing image (the file may appear: then its row is accepted)."""
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
    assert "validation reused: 41 rows, 40 ok, 1 rejected" in capsys.readouterr().err
    assert again.table.equals(first.table) and again.rejects == first.rejects
    assert again.rows_total == first.rows_total == 41
    image = next((root / "train2014").iterdir())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    prepare(annotation, root, demo_settings, use_ray=False, progress=True)
    assert "checking 8 images" in capsys.readouterr().err
    row = {
        "image": "train2014/later.jpg",
        "conversations": json.loads(annotation.read_text().split("\n")[0])["conversations"],
    }
    with open(annotation, "a") as f:
        f.write(json.dumps(row) + "\n")
    for _ in range(2):
        missing = prepare(annotation, root, demo_settings, use_ray=False, progress=True)
        assert "checking 8 images" in capsys.readouterr().err
        assert missing.rejects[-1].reason == "image_missing"
    shutil.copy(image, root / "train2014" / "later.jpg")
    assert prepare(annotation, root, demo_settings, use_ray=False).rows_ok == 41


def test_a_large_jsonl_is_checked_as_a_ray_data_job(
    ray_cluster, demo_settings, tmp_path, monkeypatch, capsys
):
    """Cut into chunks of whole lines that Ray Data actors check and tokenize, an annotation gives the
    records and rejects (with the file's line numbers) of the driver's own read, and the ledger is
    written as the chunks finish."""
    lines = TRAIN.read_text().splitlines(keepends=True)
    bad = [
        '{"image": "train2014/nowhere.jpg", "conversations": []}\n',
        "{not json\n",
        "\n",
        "\ufeff" + lines[0],
    ]
    annotation = tmp_path / "big.jsonl"
    with open(annotation, "w", encoding="utf-8") as f:
        for n in range(6):
            f.writelines(lines)
            f.write(bad[n % len(bad)])
    monkeypatch.setenv("RAYLORA_CACHE", str(tmp_path / "cache-driver"))
    alone = prepare(annotation, COCO, demo_settings, use_ray=False)
    monkeypatch.setenv("RAYLORA_CACHE", str(tmp_path / "cache-ray"))
    ledger = tmp_path / "ledger.jsonl"
    together = prepare(
        annotation, COCO, demo_settings, use_ray=True, progress=True, ledger=ledger, chunk_bytes=4096
    )
    chunks = len(line_chunks(str(annotation), 4096))
    assert chunks > 10 and f"in {chunks} chunks, 2 Ray Data actor(s)" in capsys.readouterr().err
    assert together.table.equals(alone.table) and together.rows_total == alone.rows_total == 245
    assert together.rejects == alone.rejects and [r.line for r in alone.rejects] == [41, 82, 205, 246]
    assert sorted(ledger.read_text().splitlines()) == sorted(r.to_json() for r in alone.rejects)


def test_shards_are_checked_a_shard_per_ray_data_task(
    ray_cluster, demo_settings, tmp_path, monkeypatch, capsys
):
    """A folder of Parquet files or tar shards: each file checked and tokenized by a Ray Data actor,
    the same records and rejects as the driver's own read."""
    _export(tmp_path / "export")
    for name in ("parquet", "webdataset"):
        monkeypatch.setenv("RAYLORA_CACHE", str(tmp_path / f"cache-driver-{name}"))
        alone = prepare(tmp_path / "export" / name, None, demo_settings, use_ray=False)
        monkeypatch.setenv("RAYLORA_CACHE", str(tmp_path / f"cache-ray-{name}"))
        together = prepare(
            tmp_path / "export" / name, None, demo_settings, use_ray=True, progress=True, chunk_bytes=1024
        )
        assert "in 2 shards, 2 Ray Data actor(s)" in capsys.readouterr().err, name
        assert together.table.equals(alone.table) and together.rejects == alone.rejects, name
        assert together.rows_total == alone.rows_total == 40
