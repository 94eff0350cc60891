"""Data layer: tiling against transformers, templates and label masks, validation and rejects,
the micro-batch plan, and the Ray Data pipeline end to end."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from raylora.data.pipeline import iter_microbatches, iter_rank_batches, rank_dataset, to_torch
from raylora.data.plan import grad_accum_steps, make_plan, plan_microbatches
from raylora.data.prepare import prepare
from raylora.data.records import REASONS, DataError, load_rgb, read_specs
from raylora.data.settings import ImageSettings
from raylora.data.templates import IGNORE_INDEX, ConversationTokenizer, RowRejected
from raylora.families.internvl import InternVL, tiling
from raylora.families.internvl.templates import TEMPLATES, image_tokens

from .conftest import COCO

SIZES = [
    (640, 480),
    (480, 640),
    (500, 375),
    (640, 427),
    (333, 500),
    (1000, 100),
    (100, 1000),
    (448, 448),
    (896, 448),
    (900, 300),
    (300, 900),
    (1200, 700),
    (50, 60),
    (2000, 1000),
    (1344, 896),
    (447, 449),
    (500, 400),
    (640, 640),
    (1, 1),
]


# ------------------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("max_num", [1, 4, 6, 12])
def test_grid_matches_transformers(max_num):
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    for w, h in SIZES + [(w * 7, h * 3) for w, h in SIZES[:6]]:
        assert tiling.choose_grid(w, h, 448, 1, max_num) == get_optimal_tiled_canvas(
            (h, w), (448, 448), 1, max_num
        ), (w, h)


def test_coco_640x480_gives_seven_tiles():
    assert tiling.choose_grid(640, 480) == (3, 2)
    assert tiling.num_tiles(640, 480) == 7
    tiles = tiling.tile_image(Image.new("RGB", (640, 480)))
    assert tiles.shape == (7, 3, 448, 448) and tiles.dtype == np.uint8


def _transformers_tiles(image: Image.Image, max_num: int) -> np.ndarray:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_num,
        do_rescale=False,
        do_normalize=False,
    )
    return np.asarray(proc(images=image, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("path", sorted((COCO / "train2014").glob("*.jpg"))[:4], ids=lambda p: p.name[-10:])
def test_pixels_match_transformers_on_real_coco(path):
    """Same grid and tile order; pixels within 1 grey level (both PIL bicubic)."""
    image = load_rgb(str(path))
    ours = tiling.tile_image(image, 448, 1, 6, True).astype(np.float32)
    theirs = _transformers_tiles(image, 6)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1.0


@pytest.mark.parametrize("size", [(300, 900), (1000, 100), (896, 448)])
def test_pixels_match_transformers_on_synthetic(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ours = tiling.tile_image(image, 448, 1, 6, True).astype(np.float32)
    theirs = _transformers_tiles(image, 6)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1.0


def _internvl_dynamic_preprocess(image: Image.Image, min_num=1, max_num=6, image_size=448) -> np.ndarray:
    """InternVL's own ``dynamic_preprocess`` (use_thumbnail=True), written directly in PIL as in its
    repository: the checkpoints were trained on these pixels. -> uint8 (N, 3, S, S)."""
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), orig_width * orig_height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    target_width, target_height = image_size * best_ratio[0], image_size * best_ratio[1]
    blocks = best_ratio[0] * best_ratio[1]
    resized_img = image.resize((target_width, target_height), Image.BICUBIC)
    cols = target_width // image_size
    processed = [
        resized_img.crop(
            (
                (i % cols) * image_size,
                (i // cols) * image_size,
                (i % cols + 1) * image_size,
                (i // cols + 1) * image_size,
            )
        )
        for i in range(blocks)
    ]
    if len(processed) != 1:
        processed.append(image.resize((image_size, image_size), Image.BICUBIC))
    return np.stack([np.asarray(t) for t in processed]).transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
    "path", sorted(COCO.glob("*/*.jpg")), ids=lambda p: f"{p.parent.name[:3]}-{p.name[-10:-4]}"
)
def test_pixels_match_internvl_pil_reference_on_real_coco(path):
    """Every fixture COCO image, as it is and turned to portrait (where recent Pillow resizes the
    thumbnail vertical pass first): same tiles as InternVL's PIL code, within 1 grey level."""
    assert tiling._pil_pass_order() is not None  # the PIL + torch path, not the all-PIL fallback
    image = load_rgb(str(path))
    for im in (image, image.transpose(Image.Transpose.TRANSPOSE)):
        ours = tiling.tile_image(im, 448, 1, 6, True).astype(np.int16)
        theirs = _internvl_dynamic_preprocess(im).astype(np.int16)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1


@pytest.mark.parametrize("size", [(1, 1), (50, 60), (447, 449), (2000, 1000), (16, 64), (40, 640)])
def test_pixels_match_internvl_pil_reference_on_synthetic(size):
    """Noise (every rounding and clipping case) at sizes that take one pass, two, upscale, downscale."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = tiling.tile_image(image, 448, 1, 6, True).astype(np.int16)
    theirs = _internvl_dynamic_preprocess(image).astype(np.int16)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1


def test_normalize_imagenet():
    import torch

    tiles = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = tiling.normalize(tiles)
    expected = [(1 - m) / s for m, s in zip(tiling.IMAGENET_MEAN, tiling.IMAGENET_STD)]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    im = Image.new("RGB", (60, 40), (10, 200, 30)).convert(mode)
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    im.save(path)
    rgb = load_rgb(str(path))
    assert rgb.mode == "RGB" and rgb.size == (60, 40)


# ---------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_expansion_and_labels(demo_tokenizer_dir, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    t = TEMPLATES[name]
    ct = ConversationTokenizer(tok, t, image_tokens(256), max_seq_length=8192)
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle"}]
    ids, labels = ct.encode_conversation(conv, [7])
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (ids == img).sum() == 7 * 256
    start = int(np.where(ids == tok.convert_tokens_to_ids("<img>"))[0][0])
    end = int(np.where(ids == tok.convert_tokens_to_ids("</img>"))[0][0])
    assert end - start - 1 == 7 * 256 and (ids[start + 1 : end] == img).all()
    supervised = ids[labels != IGNORE_INDEX]
    assert tok.decode(supervised) == "a red circle" + t.sep.rstrip()  # not the newline after it
    where = np.nonzero(labels != IGNORE_INDEX)[0]
    assert (labels[: where[0]] == IGNORE_INDEX).all() and (np.diff(where) == 1).all()  # only the answer
    full = tok.decode(ids)
    assert full.startswith(t.system_text(None)) and (t.assistant_role + "a red circle") in full


def test_multi_turn_supervises_every_answer(demo_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    ct = ConversationTokenizer(tok, TEMPLATES["internlm2-chat"], image_tokens(4))
    conv = [
        {"from": "human", "value": "<image>\nfirst"},
        {"from": "gpt", "value": "one"},
        {"from": "human", "value": "second"},
        {"from": "gpt", "value": "two"},
    ]
    ids, labels = ct.encode_conversation(conv, [1])
    assert tok.decode(ids[labels != IGNORE_INDEX]) == "one<|im_end|>two<|im_end|>"


def test_too_long_is_rejected_not_truncated(demo_tokenizer_dir):
    from transformers import AutoTokenizer

    ct = ConversationTokenizer(
        AutoTokenizer.from_pretrained(demo_tokenizer_dir),
        TEMPLATES["Hermes-2"],
        image_tokens(256),
        max_seq_length=1000,
    )
    with pytest.raises(RowRejected) as e:
        ct.encode_conversation([{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}], [7])
    assert e.value.reason == "too_long"


def test_generation_prompt_matches_training_prefix(demo_tokenizer_dir):
    from transformers import AutoTokenizer

    ct = ConversationTokenizer(
        AutoTokenizer.from_pretrained(demo_tokenizer_dir),
        TEMPLATES["Hermes-2"],
        image_tokens(16),
        system_message="sys",
    )
    prompt = "Provide a one-sentence caption for the provided image."
    train_ids, labels = ct.encode_conversation(
        [{"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": "a cat"}], [1]
    )
    gen_ids = ct.encode_prompt(prompt, [1])
    assert (train_ids[: len(gen_ids)] == gen_ids).all()
    assert (labels[: len(gen_ids)] == IGNORE_INDEX).all() and labels[len(gen_ids)] != IGNORE_INDEX


# -------------------------------------------------------------------------------------- validation


def _coco_settings(demo_tokenizer_dir, max_seq_length=4096):
    return ImageSettings(
        str(demo_tokenizer_dir),
        TEMPLATES["internlm2-chat"],
        InternVL(image_size=448, tokens_per_tile=256),
        max_seq_length=max_seq_length,
    )


@dataclass
class Corpus:
    """An annotation with one row per kind of input, and what must become of each line."""

    path: Path
    root: Path
    kinds: dict[str, tuple[int, str]] = field(default_factory=dict)  # kind -> (line, "ok" or reason)

    @property
    def rejected(self) -> dict[int, str]:
        return {line: out for line, out in self.kinds.values() if out != "ok"}

    @property
    def ok(self) -> list[int]:
        return sorted(line for line, out in self.kinds.values() if out == "ok")

    @property
    def total(self) -> int:
        return len(self.kinds)

    def line(self, kind: str) -> int:
        return self.kinds[kind][0]


def _row(
    image,
    caption="a caption",
    human="<image>\nProvide a one-sentence caption for the provided image.",
    id=None,
) -> str:
    row = {"id": id} if id is not None else {}
    row["image"] = image
    row["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]
    return json.dumps(row)


# the corpus' 100-megapixel PNG is rejected from its header, after PIL's warning on opening it
_huge_image_warns = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _bad_dataset(tmp_path) -> Corpus:
    """Good COCO rows plus one row of every kind of bad (or odd but usable) input.

    Each kind is one row of the same file; blank lines in between are not rows but keep their line
    numbers. ``too_long`` is not here: it needs a small max_seq_length (see its own test).
    """
    root = tmp_path / "coco"
    shutil.copytree(COCO, root)
    good = (COCO / "annotations" / "coco_karpathy_train.jsonl").read_text().splitlines()[:6]
    img = json.loads(good[0])["image"]
    train = root / "train2014"
    (train / "truncated.jpg").write_bytes((root / img).read_bytes()[:4000])
    (train / "garbage.jpg").write_bytes(b"not an image at all")
    Image.new("L", (320, 240), 128).save(train / "gray.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).convert("CMYK").save(train / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (1, 2, 3, 100)).save(train / "rgba.png")
    Image.new("P", (64, 64)).save(train / "palette.png")
    Image.new("LA", (64, 64), (100, 200)).save(train / "la.png")
    Image.new("I;16", (64, 64), 40000).save(train / "gray16.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(train / "one_pixel.png")
    Image.new("RGB", (80, 60), (9, 99, 9)).save(train / "photo.webp")
    Image.new("RGB", (80, 60), (9, 99, 9)).save(train / "really_a_png.jpg", format="PNG")
    (train / "empty.jpg").write_bytes(b"")
    (train / "bomb.png").write_bytes(_png_header(30_000, 30_000))  # 900 MP, 2.7 GB decoded
    (train / "huge.png").write_bytes(_png_header(10_000, 10_000))  # 100 MP: only a PIL warning
    os.mkfifo(train / "fifo.jpg")  # opening it would block forever

    corpus = Corpus(root / "annotations" / "mixed.jsonl", root)
    lines: list[bytes] = []

    def add(kind: str | None, line: str | bytes, outcome: str = "ok") -> None:
        lines.append(line.encode() if isinstance(line, str) else line)
        if kind is not None:
            assert kind not in corpus.kinds, kind
            corpus.kinds[kind] = (len(lines), outcome)

    add("good_with_utf8_bom", "\ufeff" + good[0])  # saved by an editor that writes a BOM
    for i, g in enumerate(good[1:], 1):
        add(f"good_{i}", g)
    add(None, "")  # blank lines are skipped, not counted
    add("malformed_json", '{"id": 3, "image": "train2014/x.jpg", ', "malformed_json")
    add("bad_fields", json.dumps({"id": 4, "image": img}), "bad_fields")
    add("empty_caption", _row(img, caption="   "), "empty_caption")
    add("too_many_placeholders", _row(img, human="<image>\n<image>\ncaption this"), "too_many_placeholders")
    add(None, "   \t")
    add("image_outside_root", _row("../../etc/passwd"), "image_outside_root")
    add("image_missing", _row("train2014/does_not_exist.jpg"), "image_missing")
    add("image_unreadable", _row("train2014/garbage.jpg"), "image_unreadable")
    add("image_truncated", _row("train2014/truncated.jpg"), "image_truncated")
    latin1 = _row(img, caption="cafe").encode().replace(b"cafe", b"caf\xe9")
    add("not_utf8_byte", latin1, "not_utf8")
    add("utf8_bom_mid_file", "\ufeff" + _row(img))  # two files concatenated, the second with a BOM
    add("crlf_line_end", _row(img) + "\r")  # written on Windows
    add(None, "\r")
    add("deeply_nested_json", "[" * 100_000, "malformed_json")
    add("huge_integer", '{"id": ' + "9" * 5000 + "}", "malformed_json")
    add("gray_image", _row("train2014/gray.jpg"))
    add("cmyk_image", _row("train2014/cmyk.jpg"))
    add("rgba_image", _row("train2014/rgba.png"))
    add("palette_image", _row("train2014/palette.png"))
    add("la_image", _row("train2014/la.png"))
    add("16_bit_image", _row("train2014/gray16.png"))
    add("1x1_image", _row("train2014/one_pixel.png"))  # InternVL resizes it: one tile
    add("webp_image", _row("train2014/photo.webp"), "ok" if features.check("webp") else "image_unreadable")
    add("png_named_jpg", _row("train2014/really_a_png.jpg"))  # PIL goes by content, not extension
    add("image_is_directory", _row("train2014"), "image_missing")
    add("image_path_too_long", _row("train2014/" + "x" * 5000 + ".jpg"), "image_missing")
    add("image_path_with_nul", _row("train2014/a\u0000b.jpg"), "image_missing")
    add("image_is_fifo", _row("train2014/fifo.jpg"), "image_unreadable")
    add("image_empty_file", _row("train2014/empty.jpg"), "image_unreadable")
    add("decompression_bomb", _row("train2014/bomb.png"), "image_too_large")
    add("over_pixel_limit", _row("train2014/huge.png"), "image_too_large")
    add("no_placeholder", _row(img, human="Provide a caption."))  # InternVL prepends <image>
    add("duplicate_id", _row(img, caption="another caption", id=2))  # good_2's id: kept, counted
    add("bare_image_prompt", _row(img, human="<image>"))  # InternVL accepts an image-only turn
    add("empty_prompt", _row(img, human=""))  # becomes a bare <image> turn
    add("two_images", _row([img, "train2014/gray.jpg"], human="Compare."))
    add("null_caption", _row(img, caption=None), "empty_caption")
    add("numeric_caption", _row(img, caption=42), "bad_fields")
    add("lone_surrogate", _row(img, caption="x").replace('"x"', '"\\ud800"'), "not_utf8")
    add(
        "no_gpt_turn",
        json.dumps({"image": img, "conversations": [{"from": "human", "value": "hi"}]}),
        "bad_fields",
    )
    add("row_is_a_list", "[1, 2]", "bad_fields")
    add("truncated_last_line", _row(img)[:-3], "malformed_json")  # no closing brace, no newline
    corpus.path.write_bytes(b"\n".join(lines))
    return corpus


@_huge_image_warns
def test_every_reject_reason_is_recorded(tmp_path, demo_tokenizer_dir):
    corpus = _bad_dataset(tmp_path)
    prepared = prepare(corpus.path, corpus.root, _coco_settings(demo_tokenizer_dir), use_ray=False)
    got = {r.line: r.reason for r in prepared.rejects}
    assert got == corpus.rejected
    assert sorted(prepared.table.column("line").to_pylist()) == corpus.ok
    assert prepared.rows_ok + len(prepared.rejects) == prepared.rows_total == corpus.total
    assert set(corpus.rejected.values()) | {"too_long", "shard_unreadable"} == set(
        REASONS
    )  # shards: test_formats
    assert all(r.source == str(corpus.path) and r.detail for r in prepared.rejects)
    convs = {
        line: json.loads(c)
        for line, c in zip(
            prepared.table.column("line").to_pylist(), prepared.table.column("conversations").to_pylist()
        )
    }
    # accepted as InternVL accepts them: odd image modes and a missing placeholder
    assert convs[corpus.line("no_placeholder")][0]["value"] == "<image>\nProvide a caption."
    assert convs[corpus.line("bare_image_prompt")][0]["value"] == "<image>"
    assert convs[corpus.line("empty_prompt")][0]["value"] == "<image>\n"
    assert convs[corpus.line("two_images")][0]["value"] == "<image>\n<image>\nCompare."
    tiles = dict(zip(prepared.table.column("line").to_pylist(), prepared.table.column("tiles").to_pylist()))
    assert tiles[corpus.line("1x1_image")] == [1]


@_huge_image_warns
def test_reject_details_say_what_to_fix(tmp_path, demo_tokenizer_dir):
    corpus = _bad_dataset(tmp_path)
    prepared = prepare(corpus.path, corpus.root, _coco_settings(demo_tokenizer_dir), use_ray=False)
    detail = {r.line: r.detail for r in prepared.rejects}
    raw = {r.line: r.row for r in prepared.rejects}
    line = corpus.line("not_utf8_byte")
    assert "byte 0xe9" in detail[line] and "UTF-8" in detail[line] and "caf\\xe9" in raw[line]
    assert (
        detail[corpus.line("malformed_json")]
        == "Expecting property name enclosed in double quotes at column 39"
    )
    assert "truncated" in detail[corpus.line("truncated_last_line")]
    assert detail[corpus.line("huge_integer")].endswith("value has 5000 digits")
    assert "nested too deeply" in detail[corpus.line("deeply_nested_json")]
    assert "\\ud800" in detail[corpus.line("lone_surrogate")]
    assert "null" in detail[corpus.line("null_caption")]
    assert "is a directory" in detail[corpus.line("image_is_directory")]
    assert "File name too long" in detail[corpus.line("image_path_too_long")]
    for kind, pixels in (("decompression_bomb", "900,000,000"), ("over_pixel_limit", "100,000,000")):
        assert pixels in detail[corpus.line(kind)] and "MAX_IMAGE_PIXELS" in detail[corpus.line(kind)]


@_huge_image_warns
@pytest.mark.parametrize("side", [10_000, 30_000])
def test_huge_image_rejected_without_decoding(tmp_path, monkeypatch, side):
    from PIL import ImageFile

    from raylora.data.records import inspect_image

    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(side, side))

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(RowRejected) as e:
        inspect_image(str(path))
    assert e.value.reason == "image_too_large" and f"{side * side:,} pixels" in e.value.detail


@_huge_image_warns
def test_too_long_rows_rejected_with_reason(tmp_path, demo_tokenizer_dir):
    corpus = _bad_dataset(tmp_path)
    prepared = prepare(
        corpus.path, corpus.root, _coco_settings(demo_tokenizer_dir, max_seq_length=1000), use_ray=False
    )
    too_long = [r for r in prepared.rejects if r.reason == "too_long"]
    assert too_long and "max_seq_length 1000" in too_long[0].detail
    assert prepared.rows_ok + len(prepared.rejects) == prepared.rows_total


def test_strict_names_file_line_and_reason(tmp_path, demo_tokenizer_dir):
    corpus = _bad_dataset(tmp_path)
    first = min(corpus.rejected)
    with pytest.raises(DataError, match=rf"mixed.jsonl:{first}: {corpus.rejected[first]}"):
        prepare(corpus.path, corpus.root, _coco_settings(demo_tokenizer_dir), strict=True, use_ray=False)


@_huge_image_warns
def test_check_cli_json_and_rejects_file(tmp_path, demo_tokenizer_dir, capsys):
    from raylora.data.__main__ import main

    corpus = _bad_dataset(tmp_path)
    path, root = corpus.path, corpus.root
    rejects = tmp_path / "rejects.jsonl"
    code = main(
        [
            "check",
            str(path),
            "--root",
            str(root),
            "--rejects",
            str(rejects),
            "--json",
            "--model",
            str(demo_tokenizer_dir),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["rows_total"] == corpus.total
    assert report["rows_ok"] == len(corpus.ok)
    assert report["rows_ok"] + report["rows_rejected"] == report["rows_total"]
    assert report["rejects"] == dict(Counter(corpus.rejected.values()))
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert sorted(x["line"] for x in lines) == sorted(corpus.rejected)
    assert report["tiles"]["7"] >= 1 and set(report["tokens"]) == {"p50", "p95", "max"}
    assert report["duplicate_ids"] == 1
    assert "duplicate ids: 1 rows reuse an earlier row's id (rows kept" in out
    assert f"first: {path}:{corpus.line('duplicate_id')}: id '2' (first at line 3)" in out
    assert (
        main(["check", str(path), "--root", str(root), "--strict", "--model", str(demo_tokenizer_dir)]) == 1
    )


def test_meta_file_with_repeat_time(tmp_path, demo_tokenizer_dir):
    ann = COCO / "annotations" / "coco_karpathy_train.jsonl"
    n = len(ann.read_text().splitlines())
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps(
            {
                "coco_full": {"root": str(COCO), "annotation": str(ann), "repeat_time": 2},
                "coco_half": {"root": str(COCO), "annotation": str(ann), "repeat_time": 0.5},
            }
        )
    )
    prepared = prepare(meta, None, _coco_settings(demo_tokenizer_dir), use_ray=False)
    assert prepared.rows_ok == 2 * n + n // 2
    assert prepared.stats()["duplicate_ids"] == 0  # repeat_time copies are not duplicates


def _meta(tmp_path, text: str | bytes) -> Path:
    meta = tmp_path / "meta.json"
    meta.write_bytes(text.encode() if isinstance(text, str) else text)
    return meta


def test_meta_file_with_utf8_bom(tmp_path, demo_tokenizer_dir):
    ann = tmp_path / "ann.jsonl"
    ann.write_bytes(b"\xef\xbb\xbf" + (COCO / "annotations" / "coco_karpathy_train.jsonl").read_bytes())
    entry = {"root": str(COCO), "annotation": ann.name}  # relative to the meta file
    meta = _meta(tmp_path, "\ufeff" + json.dumps({"coco": entry}))
    prepared = prepare(meta, None, _coco_settings(demo_tokenizer_dir), use_ray=False)
    assert prepared.rows_ok == prepared.rows_total == 40 and not prepared.rejects


_ANN = str(COCO / "annotations" / "coco_karpathy_train.jsonl")


@pytest.mark.parametrize(
    "entry, error, message",
    [
        (
            {"root": str(COCO), "annotation": "missing.jsonl"},
            FileNotFoundError,
            "annotation 'missing.jsonl' not found",
        ),
        ({"root": str(COCO), "annotation": str(COCO)}, FileNotFoundError, "not found"),  # a directory
        (
            {"root": "no/such/root", "annotation": _ANN},
            FileNotFoundError,
            "image root 'no/such/root' not found",
        ),
        (
            {"root": str(COCO), "annotation": _ANN, "repeat_time": 0},
            DataError,
            r"repeat_time must be a number > 0 \(got 0\)",
        ),
        ({"root": str(COCO), "annotation": _ANN, "repeat_time": -1}, DataError, r"> 0 \(got -1\)"),
        ({"root": str(COCO), "annotation": _ANN, "repeat_time": "2"}, DataError, r"> 0 \(got '2'\)"),
        ({"root": str(COCO), "annotation": None}, DataError, "needs 'annotation'"),
        ({"annotation": _ANN}, DataError, "needs 'root'"),
    ],
    ids=[
        "missing_annotation",
        "annotation_is_dir",
        "missing_root",
        "repeat_0",
        "repeat_negative",
        "repeat_string",
        "annotation_null",
        "no_root",
    ],
)
def test_meta_dataset_problems_name_meta_file_and_dataset(tmp_path, entry, error, message):
    meta = _meta(tmp_path, json.dumps({"good": {"root": str(COCO), "annotation": _ANN}, "broken": entry}))
    with pytest.raises(error, match=rf"meta.json: dataset 'broken'.*{message}"):
        read_specs(meta)


@pytest.mark.parametrize(
    "text, message",
    [
        (b'{"coco": {"root": "caf\xe9"}}', r"meta.json:1: byte 0xe9 is not valid UTF-8"),
        ("{}".encode("utf-16"), "UTF-16"),
        ("{}", "maps dataset names"),
        (
            '{"a": 1}\n{"b": 2}\n',
            "meta.json:2: invalid meta JSON: Extra data; a JSONL annotation must end in .jsonl",
        ),
        (
            f'{{"coco": {{"root": "a"}}, "coco": {json.dumps({"root": str(COCO), "annotation": _ANN})}}}',
            "'coco' is listed twice",
        ),
    ],
    ids=["not_utf8", "utf16", "empty", "jsonl_named_json", "dataset_twice"],
)
def test_meta_file_problems_name_the_file(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_specs(_meta(tmp_path, text))


def test_check_cli_meta_errors(tmp_path, demo_tokenizer_dir, capsys):
    from raylora.data.__main__ import main

    meta = _meta(tmp_path, json.dumps({"broken": {"root": str(COCO), "annotation": "missing.jsonl"}}))
    assert main(["check", str(meta), "--model", str(demo_tokenizer_dir)]) == 2
    assert "meta.json: dataset 'broken': annotation 'missing.jsonl' not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- planning


def test_grad_accum_arithmetic():
    assert grad_accum_steps(512, 4, 8) == 16  # the recipe
    assert grad_accum_steps(32, 16, 2) == 1
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accum_steps(100, 4, 8)


def test_plan_equal_counts_and_resume(demo_settings, demo_root):
    prepared = prepare(
        demo_root / "data/annotations/demo_train.jsonl", demo_root / "data", demo_settings, use_ray=False
    )
    plan = make_plan(prepared.rows_ok, 64, 8, 2, epochs=2)
    full = plan_microbatches(prepared.table, plan, seed=1, group_by_length=True)
    assert full.num_rows == plan.total_steps * plan.microbatches_per_step
    assert full.column("index").to_pylist() == list(range(full.num_rows))
    rows = full.column("rows").to_pylist()
    assert all(len(r) == 8 and all(len(unit) == 1 for unit in r) for r in rows)  # 8 units of one record
    epoch0 = [i for r, e in zip(rows, full.column("epoch").to_pylist()) if e == 0 for unit in r for i in unit]
    assert len(set(epoch0)) == len(epoch0)  # no record twice within an epoch
    resumed = plan_microbatches(prepared.table, plan, seed=1, group_by_length=True, start_step=5)
    assert resumed.column("rows").to_pylist() == rows[5 * plan.microbatches_per_step :]
    again = plan_microbatches(prepared.table, plan, seed=1, group_by_length=True)
    assert again.column("rows").to_pylist() == rows


def test_plain_iterator_feeds_the_model(demo_settings, demo_root, demo_base_model):

    prepared = prepare(
        COCO / "annotations" / "coco_karpathy_train.jsonl",
        COCO,
        _coco_like_demo(demo_settings),
        use_ray=False,
    )
    plan = make_plan(prepared.rows_ok, 4, 4, 1, epochs=1, max_steps=1)
    batch = next(
        iter_microbatches(
            prepared.table, plan_microbatches(prepared.table, plan), _coco_like_demo(demo_settings)
        )
    )
    assert batch["pixel_values"].dtype == np.uint8
    tiles = prepared.table.column("tiles").to_pylist()
    assert batch["pixel_values"].shape[0] == sum(sum(tiles[i]) for i in batch["record_index"])
    assert np.isfinite(_loss(demo_base_model, batch))


def _loss(model, batch) -> float:
    """The mean token loss of a pipeline micro-batch (tiles normalised on the device, as in training)."""
    import torch

    from raylora.loss import forward_loss

    with torch.no_grad():
        loss_sum, tokens = forward_loss(model, to_torch(batch), torch.float32)
    return loss_sum.item() / tokens


def _coco_like_demo(demo_settings):
    """Real COCO photos at the demo model's tile size (112 px, 16 tokens per tile)."""
    from dataclasses import replace

    return replace(demo_settings, max_seq_length=1024)


def test_ray_pipeline_end_to_end(ray_cluster, demo_settings, demo_base_model):
    """Real COCO through Ray Data: each rank's own actor pool delivers exactly its planned
    micro-batches (index % world == rank), in plan order, equal to the in-process builder's."""
    settings = _coco_like_demo(demo_settings)
    prepared = prepare(COCO / "annotations" / "coco_karpathy_train.jsonl", COCO, settings, use_ray=True)
    plan = make_plan(prepared.rows_ok, 8, 2, 2, epochs=1)
    planned = plan_microbatches(prepared.table, plan, seed=0)
    first = 2 * plan.microbatches_per_step  # a rank restarting at step 2

    @ray_cluster.remote(num_cpus=0)
    def consume(records, planned, rank):
        ds = rank_dataset(records, planned, rank, 2, first + rank, settings, cpus_per_actor=0.5)
        return [{k: v.numpy() for k, v in b.items()} for b in iter_rank_batches(ds, first + rank, 2)]

    refs = ray_cluster.put(prepared.table), ray_cluster.put(planned)
    per_rank = ray_cluster.get([consume.remote(*refs, r) for r in (0, 1)])
    assert [len(x) for x in per_rank] == [(planned.num_rows - first) // 2] * 2
    local = list(iter_microbatches(prepared.table, planned, settings))
    for rank, batches in enumerate(per_rank):
        for k, batch in enumerate(batches):
            expected = local[first + rank + 2 * k]
            assert int(batch["index"]) == first + rank + 2 * k  # the plan's index, checked on arrival too
            assert set(batch) - {"index"} == set(expected)
            assert all(np.array_equal(batch[c], expected[c]) for c in expected)
    batch = per_rank[0][0]
    tiles = prepared.table.column("tiles").to_pylist()
    assert batch["input_ids"].shape[0] == 2
    assert batch["pixel_values"].shape[0] == sum(sum(tiles[i]) for i in batch["record_index"])
    assert np.isfinite(_loss(demo_base_model, batch))


def test_rank_batches_fail_loudly_on_a_gap():
    """A micro-batch arriving out of plan order stops the rank instead of training on wrong data."""

    class Stream:
        def iter_torch_batches(self, **_):
            import torch

            for index in (1, 3, 7):
                yield {"index": torch.tensor(index), "input_ids": torch.zeros(1, 2)}

    got = []
    with pytest.raises(RuntimeError, match="micro-batch 7 arrived where the plan expects 5"):
        for batch in iter_rank_batches(Stream(), 1, 2):
            got.append(batch)
    assert len(got) == 2
