"""Annotation readers and row validation.

Sources: InternVL chat-format JSONL (one row per image/caption), InternVL meta JSON (several
datasets with root, annotation, repeat_time) and the Karpathy test/val JSON + COCO gt pair.
A bad row is never silently dropped: it becomes a :class:`Reject` with its file, line and reason
(or, in strict mode, a :class:`DataError` naming the same). No row, however broken, raises
anything else. The reasons are in :data:`REASONS`; what is accepted and why:

* Encoding: files are UTF-8. A line that is not is one ``not_utf8`` reject, the others are read
  (so is a lone surrogate escape such as ``\\ud800``, which no tokenizer takes). A UTF-8 byte-order
  mark is ignored, on any line and on a meta file; a UTF-16 file is one error for the whole file.
* Blank lines are skipped and are not rows; line numbers are always the file's.
* A human turn of only ``<image>``, or empty, is accepted as InternVL accepts it (the image is the
  whole prompt); a turn without ``<image>`` gets one per image prepended, as InternVL does.
* A caption of ``null`` is ``empty_caption``, like one of only spaces.
* Images: any file PIL decodes and converts to RGB (grayscale, CMYK, palette, alpha, 16-bit, WebP;
  a 1x1 image becomes one tile). More pixels than PIL's ``Image.MAX_IMAGE_PIXELS`` is
  ``image_too_large``, decided from the header without decoding. A directory where an image
  should be is ``image_missing``: the path in the row is wrong.
* Rows that share an id are all kept and counted (:func:`duplicate_ids`), not rejected.
* Problems of a meta file (a dataset's annotation or root missing, a ``repeat_time`` that is not
  a number > 0, a dataset listed twice) are errors naming the meta file and the dataset, raised
  before any row is read: they change the whole run's data mix, so they are not rows to skip.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import posixpath
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageFile

from raylora.data.images import open_image
from raylora.data.templates import IMAGE_PLACEHOLDER, RowRejected
from raylora.files import file_entry, is_dir, is_remote, join_uri, list_files, read_bytes

ImageFile.LOAD_TRUNCATED_IMAGES = False
RAW_LIMIT = 2000  # characters of a bad row kept in the rejects file
_UTF8_BOM = b"\xef\xbb\xbf"

REASONS = {
    "not_utf8": "the line is not UTF-8 text (an undecodable byte, or a lone surrogate escape such as \\ud800)",
    "malformed_json": "the line is not valid JSON",
    "bad_fields": "missing or wrongly typed fields (image, conversations, from/value)",
    "empty_caption": "an assistant turn has no text",
    "too_many_placeholders": "more <image> placeholders than images",
    "image_outside_root": "the image path leaves the data root",
    "image_missing": "no image file at that path (it does not exist, or is a directory)",
    "image_unreadable": "the image file cannot be read or decoded",
    "image_truncated": "the image file is truncated",
    "shard_unreadable": "a Parquet file or tar shard cannot be read (from this row or sample on)",
    "image_too_large": "the image has more pixels than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)",
    "too_long": "text plus expanded image tokens exceed max_seq_length",
}


class DataError(ValueError):
    """Strict mode: the first bad row, with file, line and reason."""


@dataclass
class Reject:
    source: str
    line: int
    reason: str
    detail: str
    row: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    def message(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}: {self.detail}"


@dataclass
class Record:
    """A validated-so-far training row: its images (absolute paths) and normalised conversation."""

    id: str
    source: str
    line: int
    images: list[str]
    conversations: list[dict[str, str]]


FORMATS = ("jsonl", "coco", "llava", "parquet", "webdataset")  # data.format besides auto and meta
SHARD_SUFFIXES = {"parquet": (".parquet", ".arrow"), "webdataset": (".tar",)}
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # COCO rows' question (eval.prompt)
_SPLIT_RE = re.compile(r"(train|val|test)\d{4}")


@dataclass
class DatasetSpec:
    name: str
    annotation: str | Path  # a file or (parquet, webdataset) a folder of shards; local or a URI
    root: str | Path  # where relative image paths are; local or a URI
    repeat_time: float = 1.0
    format: str = "jsonl"  # jsonl: one chat row per line; coco: COCO captions JSON; llava: a JSON list;
    # parquet: Parquet/Arrow files (image bytes or paths); webdataset: tar shards
    prompt: str = CAPTION_PROMPT  # the question of rows that carry only a caption (COCO)


def detect_format(path: str | Path) -> str:
    """``jsonl`` (a .jsonl file), ``coco`` (a JSON object with ``images`` and ``annotations``),
    ``llava`` (a JSON list of chat rows), ``meta`` (a JSON object of datasets), ``parquet`` (a
    .parquet/.arrow file or a folder of them) or ``webdataset`` (a .tar file or a folder of them)."""
    text = str(path)
    for kind, suffixes in SHARD_SUFFIXES.items():
        if text.endswith(suffixes) or (is_dir(text) and list_files(text, suffixes)):
            return kind
    if text.endswith(".jsonl"):
        return "jsonl"
    head = read_bytes(text, 0, 1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return "llava"
    if b'"annotations"' in head and b'"images"' in head:
        return "coco"
    data = _read_meta_or_none(path)
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "coco"
    return "meta"


def _read_meta_or_none(path: str | Path) -> Any:
    try:
        return json.loads(read_bytes(path).decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError):
        return None


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def coco_image_root(annotation: str | Path, root: str | Path | None) -> str:
    """Where a COCO captions file's ``file_name``s are: ``root`` if given, else the first of the folder
    named after its split (``captions_train2014.json`` -> ``train2014/``) beside it or one level up,
    the annotation's folder and the one above, that holds its first image."""
    if root is not None:
        return str(root)
    here = _parent(str(annotation))
    m = _SPLIT_RE.search(str(annotation).rsplit("/", 1)[-1])
    candidates = ([join_uri(here, m[0]), join_uri(_parent(here), m[0])] if m else []) + [here, _parent(here)]
    data = _read_meta_or_none(annotation)
    first = next((im.get("file_name") for im in (data or {}).get("images", []) if isinstance(im, dict)), None)
    for c in candidates:
        if isinstance(first, str) and file_entry(join_uri(c, first)) is not None:
            return c
    return candidates[0]


def read_specs(
    train: str | Path, root: str | Path | None = None, fmt: str = "auto", prompt: str = CAPTION_PROMPT
) -> list[DatasetSpec]:
    """An annotation (chat JSONL with its image root, COCO captions JSON, a LLaVA JSON list; ``fmt``
    ``auto`` tells them apart by their content) or an InternVL meta JSON -> dataset specs.

    Problems with the meta file itself are errors naming the meta file and the dataset, raised
    before any row is read: a dataset whose annotation or image root is missing
    (FileNotFoundError), or whose ``repeat_time`` is not a number > 0 (DataError). Each changes
    the data mix of the whole run, so none is skipped with a warning.
    """
    text = str(train) if is_remote(train) else os.path.abspath(train)
    if file_entry(text) is None and not is_dir(text):
        raise FileNotFoundError(f"annotation file not found: {train}")
    kind = detect_format(text) if fmt == "auto" else fmt
    if kind not in (*FORMATS, "meta"):
        raise ValueError(f"data.format {fmt!r} unknown; valid: auto, {', '.join(FORMATS)}, meta")
    stem = text.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    if kind in SHARD_SUFFIXES:
        if not list_files(text, SHARD_SUFFIXES[kind]):
            raise FileNotFoundError(
                f"{train}: no {' or '.join(SHARD_SUFFIXES[kind])} files (data.format {kind})"
            )
        base = text if is_dir(text) else _parent(text)  # image paths in a Parquet row are relative to it
        return [DatasetSpec(stem, text, str(root) if root is not None else base, format=kind, prompt=prompt)]
    if kind == "coco":
        return [DatasetSpec(stem, text, coco_image_root(text, root), format="coco", prompt=prompt)]
    if kind in ("jsonl", "llava"):
        if root is None and kind == "llava":
            root = _parent(text)  # a LLaVA list's image paths are relative to its folder unless --root
        if root is None:
            raise ValueError(f"{train}: a JSONL annotation needs an image root (data.root / --root)")
        if not is_remote(root) and not Path(root).is_dir():
            raise FileNotFoundError(f"image root of {train} not found: {root} (data.root / --root)")
        return [DatasetSpec(stem, text, str(root), format=kind, prompt=prompt)]
    if is_remote(text):
        raise ValueError(f"{train}: a meta file lists local datasets; give a remote annotation directly")
    path = Path(text)
    meta = _read_meta(path)
    specs = []
    for name, entry in meta.items():
        where = f"{path}: dataset {name!r}"
        for key in ("root", "annotation"):
            if not isinstance(entry.get(key), str):
                raise DataError(f"{where} needs {key!r} (a path)")
        ann = Path(entry["annotation"])
        spec_root = Path(entry["root"])
        if not ann.is_absolute() and not ann.exists():
            ann = path.parent / ann  # relative to the meta file when not relative to the cwd
        if not spec_root.is_absolute() and not spec_root.exists():
            spec_root = path.parent / spec_root
        if not ann.is_file():
            raise FileNotFoundError(
                f"{where}: annotation {entry['annotation']!r} not found ({_tried(entry['annotation'], ann)}); "
                "fix the path or remove the dataset from the meta file"
            )
        if not spec_root.is_dir():
            raise FileNotFoundError(
                f"{where}: image root {entry['root']!r} not found ({_tried(entry['root'], spec_root)})"
            )
        repeat = entry.get("repeat_time", 1.0)
        if isinstance(repeat, bool) or not isinstance(repeat, int | float) or not 0 < repeat < math.inf:
            raise DataError(
                f"{where}: repeat_time must be a number > 0 (got {repeat!r}): 2 uses the dataset twice, "
                "0.5 a seeded random half; to leave the dataset out, remove it from the meta file"
            )
        kind = detect_format(ann)
        if kind == "meta":
            raise DataError(f"{where}: annotation {entry['annotation']!r} is itself a meta file")
        specs.append(DatasetSpec(name, ann, spec_root, float(repeat), kind, prompt))
    return specs


def _tried(given: str, resolved: Path) -> str:
    return f"tried {given} and {resolved}" if Path(given) != resolved else f"tried {resolved}"


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_meta(path: Path) -> dict[str, dict[str, Any]]:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file starts with a UTF-16 byte-order mark; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark is fine
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: byte 0x{data[e.start]:02x} is not valid UTF-8; save the file as UTF-8"
        ) from None
    try:
        meta = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise DataError(f"{path}: {e.args[0]!r} is listed twice (JSON keeps only the last one)") from None
    except json.JSONDecodeError as e:
        hint = "; a JSONL annotation must end in .jsonl" if e.msg == "Extra data" else ""
        raise DataError(f"{path}:{e.lineno}: invalid meta JSON: {e.msg}{hint}") from None
    except (RecursionError, ValueError) as e:
        raise DataError(f"{path}: invalid meta JSON: {e}") from None
    if not isinstance(meta, dict) or not meta or not all(isinstance(v, dict) for v in meta.values()):
        raise DataError(f"{path}: a meta file maps dataset names to {{root, annotation, repeat_time}}")
    return meta


def _check_text(where: str, text: str) -> None:
    """JSON can spell a lone UTF-16 surrogate (\\ud800) that no UTF-8 tokenizer or Arrow column takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowRejected(
            "not_utf8",
            f"{where} contains \\u{ord(text[e.start]):04x}, a lone surrogate escape that is not text; "
            "fix or drop the escape",
        ) from None


def _check_fields(obj: Any) -> tuple[list[str], list[dict[str, str]]]:
    if not isinstance(obj, dict):
        raise RowRejected("bad_fields", "a row must be a JSON object")
    image = obj.get("image")
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise RowRejected("bad_fields", "'image' must be a path or a non-empty list of paths")
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RowRejected("bad_fields", "'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowRejected("bad_fields", f"conversations[{i}] must be an object with 'from' and 'value'")
        if turn.get("from") not in ("human", "gpt", "system"):
            raise RowRejected("bad_fields", f"conversations[{i}].from must be human, gpt or system")
        if turn["from"] == "gpt" and "value" in turn and turn["value"] is None:
            raise RowRejected("empty_caption", f"conversations[{i}] (gpt) has value null")
        if not isinstance(turn.get("value"), str):
            raise RowRejected("bad_fields", f"conversations[{i}] needs a string 'value'")
        turns.append({"from": turn["from"], "value": turn["value"]})
    for i, text in enumerate(images):
        _check_text(f"image[{i}]", text)
    for i, turn in enumerate(turns):
        _check_text(f"conversations[{i}].value", turn["value"])
    _check_text("id", str(obj.get("id", "")))
    body = turns[1:] if turns[0]["from"] == "system" else turns
    if not body or body[0]["from"] != "human" or not any(t["from"] == "gpt" for t in body):
        raise RowRejected("bad_fields", "conversations must start with a human turn and contain a gpt turn")
    for i, turn in enumerate(body):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise RowRejected(
                "bad_fields", f"turn {i} is {turn['from']!r}, expected {expected!r} (turns alternate)"
            )
        if expected == "gpt" and not turn["value"].strip():
            raise RowRejected("empty_caption", f"assistant turn {i} is empty")
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in body if t["from"] == "human")
    if placeholders > len(images):
        raise RowRejected(
            "too_many_placeholders", f"{placeholders} <image> placeholders for {len(images)} image(s)"
        )
    if placeholders == 0:  # InternVL prepends the placeholder(s) to the first human turn
        body[0]["value"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + body[0]["value"]
    elif placeholders < len(images):
        raise RowRejected("bad_fields", f"{placeholders} <image> placeholders for {len(images)} images")
    return images, turns


def resolve_image(root: str | Path, rel: str) -> str:
    """join(root, image), refusing paths that escape the root and anything but an existing file.
    Under a remote root (``s3://``) the file is only looked for when the image is decoded."""
    if is_remote(root):
        scheme, base = str(root).rstrip("/").split("://", 1)
        full = posixpath.normpath(posixpath.join(base, rel))
        if full != base and not full.startswith(base + "/"):
            raise RowRejected("image_outside_root", f"{rel!r} resolves outside {scheme}://{base}")
        return f"{scheme}://{full}"
    root_abs = Path(os.path.abspath(root))
    full = Path(os.path.abspath(root_abs / rel))
    if os.path.commonpath([root_abs, full]) != str(root_abs):
        raise RowRejected("image_outside_root", f"{rel!r} resolves outside {root_abs}")
    try:
        mode = os.stat(full).st_mode
    except ValueError:  # a NUL character in the path
        raise RowRejected("image_missing", f"{rel!r} is not a valid file name") from None
    except OSError as e:  # ENOENT, ENOTDIR, ENAMETOOLONG, ELOOP, EACCES on a folder, ...
        if e.errno == errno.ENOENT:
            raise RowRejected("image_missing", f"{full} does not exist") from None
        reason = "image_unreadable" if e.errno in (errno.EACCES, errno.EPERM, errno.EIO) else "image_missing"
        shown = str(full) if len(str(full)) <= 300 else str(full)[:300] + "..."
        raise RowRejected(reason, f"{shown}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise RowRejected("image_missing", f"{full} is a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise RowRejected("image_unreadable", f"{full} is not a regular file")
    return str(full)


def _parse_line(source: str, lineno: int, raw: bytes) -> Reject | tuple[Any, str]:
    """One annotation line -> (parsed JSON, its text), or the Reject saying why not; never raises."""
    raw_line = raw.rstrip(b"\r\n")
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Reject(
            source,
            lineno,
            "not_utf8",
            f"byte 0x{raw_line[e.start]:02x} at byte {e.start + 1} of the line is not valid UTF-8 "
            "(the file must be UTF-8: re-encode it, or fix or drop this line)",
            raw_line.decode("utf-8", "backslashreplace")[:RAW_LIMIT],
        )
    try:
        return json.loads(text), text
    except json.JSONDecodeError as e:
        detail = f"{e.msg} at column {e.colno}"
        if not raw.endswith(b"\n"):
            detail += " (the last line has no newline: the file may be truncated)"
    except RecursionError:
        detail = "nested too deeply to parse"
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        detail = str(e).split("; use sys.")[0]
    return Reject(source, lineno, "malformed_json", detail, text[:RAW_LIMIT])


def record_of(
    spec: DatasetSpec, source: str, line: int, obj: Any, raw: str, resolved: bool = False
) -> Record | Reject:
    """One parsed row (InternVL's chat fields) -> its Record, or the Reject saying why not.
    ``resolved``: the row's images are references already (an image inside a shard)."""
    try:
        images, turns = _check_fields(obj)
        paths = list(images) if resolved else [resolve_image(spec.root, rel) for rel in images]
    except RowRejected as e:
        return Reject(source, line, e.reason, e.detail, raw[:RAW_LIMIT])
    rid = str(obj["id"]) if "id" in obj else f"line{line}"
    return Record(f"{spec.name}:{rid}", source, line, paths, turns)


def jsonl_items(spec: DatasetSpec) -> Iterator[Record | Reject]:
    source = str(spec.annotation)
    with open(source, "rb") if not is_remote(source) else io.BytesIO(read_bytes(source)) as f:
        if f.read(4).startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{source}: the file starts with a UTF-16 byte-order mark; save it as UTF-8")
        f.seek(0)
        yield from jsonl_lines(spec, f, 1)


def jsonl_lines(spec: DatasetSpec, lines: Iterable[bytes], first_line: int) -> Iterator[Record | Reject]:
    """Records and rejects of JSONL lines (bytes, with their newlines) numbered from ``first_line``:
    the whole file, or one chunk of it (:func:`raylora.data.prepare.line_chunks`)."""
    source = str(spec.annotation)
    for lineno, raw in enumerate(lines, first_line):
        if raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM) :]
        if not raw.strip():
            continue
        parsed = _parse_line(source, lineno, raw)
        if isinstance(parsed, Reject):
            yield parsed
            continue
        obj, line = parsed
        yield record_of(spec, source, lineno, obj, line)


def _json_document(path: str | Path, kind: str) -> Any:
    data = read_bytes(path)
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file starts with a UTF-16 byte-order mark; save it as UTF-8")
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: byte 0x{data[e.start]:02x} is not valid UTF-8; save the file as UTF-8"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid {kind} JSON: {e.msg} at column {e.colno}") from None
    except (RecursionError, ValueError) as e:
        raise DataError(f"{path}: invalid {kind} JSON: {e}") from None


def coco_items(spec: DatasetSpec) -> Iterator[Record | Reject]:
    """COCO captions JSON: one row per annotation (its image's ``file_name`` under the spec's root,
    the caption as the answer to ``spec.prompt``); ``line`` is the annotation's number from 1."""
    source = str(spec.annotation)
    data = _json_document(spec.annotation, "COCO captions")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(f"{source}: a COCO captions file is an object with 'images' and 'annotations' lists")
    files = {
        im["id"]: im["file_name"]
        for im in data["images"]
        if isinstance(im, dict) and isinstance(im.get("file_name"), str) and "id" in im
    }
    for n, ann in enumerate(data["annotations"], 1):
        raw = json.dumps(ann, ensure_ascii=False)[:RAW_LIMIT]
        if not isinstance(ann, dict):
            yield Reject(source, n, "bad_fields", f"annotation {n} must be an object", raw)
            continue
        caption, image_id = ann.get("caption"), ann.get("image_id")
        if caption is None or (isinstance(caption, str) and not caption.strip()):
            yield Reject(source, n, "empty_caption", f"annotation {n} has no caption", raw)
            continue
        if not isinstance(caption, str):
            yield Reject(source, n, "bad_fields", f"annotation {n}: 'caption' must be a string", raw)
            continue
        if image_id not in files:
            detail = f"annotation {n}: image_id {image_id!r} is not in the file's 'images'"
            yield Reject(source, n, "bad_fields", detail, raw)
            continue
        row = {
            "id": ann.get("id", n),
            "image": files[image_id],
            "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{spec.prompt}"},
                {"from": "gpt", "value": caption},
            ],
        }
        yield record_of(spec, source, n, row, raw)


def llava_items(spec: DatasetSpec) -> Iterator[Record | Reject]:
    """A LLaVA-style JSON list of chat rows (``image``, ``conversations``): each item a row, as one
    JSONL line would be; ``line`` is the item's number from 1."""
    source = str(spec.annotation)
    data = _json_document(spec.annotation, "LLaVA")
    if not isinstance(data, list):
        raise DataError(f"{source}: a LLaVA annotation is a JSON list of rows")
    for n, obj in enumerate(data, 1):
        yield record_of(spec, source, n, obj, json.dumps(obj, ensure_ascii=False))


@dataclass
class Duplicate:
    id: str
    source: str
    line: int
    first_line: int

    def message(self) -> str:
        return f"{self.source}:{self.line}: id {self.id!r} (first at line {self.first_line})"


def duplicate_ids(ids: Sequence[str], sources: Sequence[str], lines: Sequence[int]) -> list[Duplicate]:
    """Rows that reuse the id of an earlier row of the same dataset, in order.

    Reported, never rejected: ids are not used in training, and COCO-style data may give the five
    captions of an image one id; but a file concatenated twice shows up here. Copies made by
    ``repeat_time`` are the same line and do not count; a row without an id never clashes.
    """
    first: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    out = []
    for rid, source, line in zip(ids, sources, lines):
        if (source, line) in seen:
            continue
        seen.add((source, line))
        if rid in first:
            out.append(Duplicate(rid.split(":", 1)[-1], source, line, first[rid]))
        else:
            first[rid] = line
    return out


def inspect_image(path: str) -> tuple[int, int]:
    """Decode an image as training will (catches truncation and unsupported modes); its (width, height).

    Images over PIL's ``Image.MAX_IMAGE_PIXELS`` (about 89 megapixels; a decompression bomb
    guard) are rejected from the header alone, before any pixels are decoded. Raises RowRejected.
    """
    try:
        with Image.open(open_image(path)) as im:
            width, height = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                raise RowRejected(
                    "image_too_large", _too_large(path, f"{width}x{height} = {width * height:,}")
                )
            if width < 1 or height < 1:
                raise RowRejected("image_unreadable", f"{path}: the image is {width}x{height} pixels")
            to_rgb(im).load()
            return width, height
    except RowRejected:
        raise
    except Image.DecompressionBombError as e:  # raised by Image.open beyond twice the limit
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise RowRejected("image_too_large", _too_large(path, f"{int(m[1]):,}" if m else "its")) from None
    except FileNotFoundError:
        raise RowRejected("image_missing", f"{path} does not exist") from None
    except EOFError as e:
        raise RowRejected("image_truncated", str(e)) from None
    except OSError as e:
        if "does not exist" in str(e) or "NoSuchKey" in str(e):  # pyarrow's S3 file system
            raise RowRejected("image_missing", f"{path} does not exist") from None
        if "truncated" in str(e).lower():
            raise RowRejected("image_truncated", f"{path}: {e}") from None
        raise RowRejected("image_unreadable", f"{path}: {e}") from None
    except Exception as e:  # PIL raises a zoo of errors on garbage
        raise RowRejected("image_unreadable", f"{path}: {type(e).__name__}: {e}") from None


def _too_large(path: str, size: str) -> str:
    return (
        f"{path}: {size} pixels is over PIL's decompression-bomb limit Image.MAX_IMAGE_PIXELS "
        f"({Image.MAX_IMAGE_PIXELS:,}); downscale the image (training resizes it to a few tiles anyway)"
    )


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as RGB (grayscale, CMYK, palette and RGBA converted; alpha over white)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


def load_rgb(path: str | BinaryIO) -> Image.Image:
    """Open an image (a path or a binary file object) as RGB (grayscale, CMYK, palette and RGBA
    converted; alpha over white)."""
    return to_rgb(Image.open(open_image(path) if isinstance(path, str) else path))


# ------------------------------------------------------------------------------------ test / val


@dataclass
class EvalItem:
    image_id: int
    image: str  # absolute path


_ID_RE = re.compile(r"(\d+)\.\w+$")


def read_karpathy(items_path: str | Path, root: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The Karpathy test/val list: image_id from the item, else the number ending the file name."""
    path = str(items_path)
    if file_entry(path) is None:
        raise FileNotFoundError(f"evaluation file not found: {path}")
    data = json.loads(read_bytes(path))
    if isinstance(data, dict) and "images" in data:
        data = data["images"]
    out = []
    for i, item in enumerate(data):
        rel = item.get("image") or item.get("file_name")
        if not isinstance(rel, str):
            raise DataError(f"{path}: item {i} has no 'image'")
        image_id = item.get("image_id", item.get("id"))
        if image_id is None:
            m = _ID_RE.search(rel)
            if not m:
                raise DataError(f"{path}: item {i}: no image_id and none in the file name {rel!r}")
            image_id = int(m.group(1))
        out.append(EvalItem(int(image_id), join_uri(root, rel)))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_gt(gt_path: str | Path, image_ids: list[int] | None = None) -> dict[int, list[str]]:
    """COCO caption ground truth -> {image_id: [captions]} (restricted to ``image_ids``)."""
    data = json.loads(read_bytes(gt_path))
    keep = set(image_ids) if image_ids is not None else None
    gts: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        iid = int(ann["image_id"])
        if keep is None or iid in keep:
            gts.setdefault(iid, []).append(ann["caption"])
    return gts
