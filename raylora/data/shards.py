"""Readers of sharded caption data: Parquet (and ``datasets``' Arrow files) and WebDataset tar shards.

Both yield the same :class:`~raylora.data.records.Record` / :class:`~raylora.data.records.Reject` as
the JSON readers, so rows go through the same validation and ledger. A ledger entry names the file
or shard as its ``source`` and the row (Parquet, from 1) or sample (tar, from 1) as its ``line``.

* **Parquet / Arrow** (``data.format: parquet``; a file or a folder of ``*.parquet`` / ``*.arrow``, as
  Hugging Face datasets are stored): column ``image`` holds the image, as ``{"bytes", "path"}`` (the
  ``datasets`` Image feature), raw bytes, or a path relative to the folder (or ``data.root``); the
  caption is column ``caption`` (a string) or ``sentences`` (a list of strings: one row per caption,
  grouped per image). Image bytes stay in the file: records point at them (``file#row=N&column=image``).
* **WebDataset** (``data.format: webdataset``; a ``.tar`` or a folder of them): a sample is the
  consecutive members sharing a key (the name up to its first dot): one image (``.jpg``, ``.jpeg``,
  ``.png``, ``.webp``) and its caption in ``.txt``, or in ``.json`` under ``caption`` (a string or a
  list). Records point at the member's bytes in the shard (``shard#offset=O&size=N``).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

from raylora.data.images import member_ref, open_table, row_ref
from raylora.data.records import (
    IMAGE_PLACEHOLDER,
    RAW_LIMIT,
    SHARD_SUFFIXES,
    DatasetSpec,
    Record,
    Reject,
    record_of,
    resolve_image,
)
from raylora.data.templates import RowRejected
from raylora.files import filesystem, is_remote, list_files

IMAGE_COLUMN = "image"
CAPTION_COLUMNS = ("caption", "sentences")  # Parquet: the caption (str) or captions (list of str)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # WebDataset members that are the sample's image
CAPTION_KEY = "caption"  # WebDataset .json members: the caption's key
_TEXT_LIMIT = 1 << 20  # a caption member larger than this is not a caption


def _row(spec: DatasetSpec, image: str, caption: str) -> dict[str, Any]:
    return {
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{spec.prompt}"},
            {"from": "gpt", "value": caption},
        ],
    }


def _captions(value: Any, where: str) -> list[str]:
    """A caption field (a string or a list of strings) -> its captions; RowRejected saying why not."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowRejected("empty_caption", f"{where} has no caption")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        empty = [i for i, v in enumerate(value) if not v.strip()]
        if empty:
            raise RowRejected("empty_caption", f"{where}: caption {empty[0]} of the list is empty")
        return value
    if isinstance(value, list) and not value:
        raise RowRejected("empty_caption", f"{where} has an empty list of captions")
    raise RowRejected(
        "bad_fields", f"{where}: the caption must be a string or a list of strings, not {value!r:.80}"
    )


def _records(
    spec: DatasetSpec, source: str, line: int, ident: str, image: str, captions: list[str], raw: str
) -> Iterator[Record | Reject]:
    for caption in captions:
        rec = record_of(spec, source, line, {**_row(spec, image, caption), "id": ident}, raw, resolved=True)
        yield rec


# ------------------------------------------------------------------------------------------ Parquet


def parquet_items(spec: DatasetSpec) -> Iterator[Record | Reject]:
    """Rows of every Parquet/Arrow file of ``spec.annotation`` (a file or a folder), in name order."""
    for entry in list_files(spec.annotation, SHARD_SUFFIXES["parquet"]):
        yield from _parquet_file(spec, entry.uri)


def _parquet_file(spec: DatasetSpec, uri: str) -> Iterator[Record | Reject]:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        reader, _ = open_table(uri)
        schema = reader.schema_arrow if hasattr(reader, "schema_arrow") else reader.schema
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a file that is not one
        yield Reject(uri, 1, "shard_unreadable", f"{name} is not a Parquet/Arrow file: {e}")
        return
    captions = next((c for c in CAPTION_COLUMNS if c in schema.names), None)
    columns = [c for c in (IMAGE_COLUMN, captions) if c is not None and c in schema.names]
    batches = reader.iter_batches(columns=columns) if hasattr(reader, "iter_batches") else reader.to_batches()
    row = 0
    try:
        for batch in batches:
            data = batch.to_pydict()
            n = batch.num_rows
            for image, caption in zip(data.get(IMAGE_COLUMN, [None] * n), data.get(captions, [None] * n)):
                row += 1
                yield from _parquet_row(spec, uri, row, image, caption, captions)
    except Exception as e:  # a corrupt page or row group: the rest of the file cannot be read
        yield Reject(uri, row + 1, "shard_unreadable", f"{name} cannot be read from row {row + 1} on: {e}")


def _parquet_row(
    spec: DatasetSpec, uri: str, row: int, image: Any, caption: Any, caption_column: str | None
) -> Iterator[Record | Reject]:
    raw = json.dumps({"image": _describe(image), caption_column or "caption": caption}, ensure_ascii=False)
    raw = raw[:RAW_LIMIT]
    try:
        if caption_column is None:
            raise RowRejected("bad_fields", f"row {row}: no column {' or '.join(CAPTION_COLUMNS)}")
        ref = _parquet_image(spec, uri, row, image)
        texts = _captions(caption, f"row {row} ({caption_column})")
    except RowRejected as e:
        yield Reject(uri, row, e.reason, e.detail, raw)
        return
    stem = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    yield from _records(spec, uri, row, f"{stem}:{row}", ref, texts, raw)


def _parquet_image(spec: DatasetSpec, uri: str, row: int, image: Any) -> str:
    """The reference of a row's image: its bytes in the file, or its path under the data root."""
    if isinstance(image, dict):
        if isinstance(image.get("bytes"), bytes) and image["bytes"]:
            return row_ref(uri, row - 1, IMAGE_COLUMN)
        image = image.get("path")
    if isinstance(image, bytes) and image:
        return row_ref(uri, row - 1, IMAGE_COLUMN)
    if isinstance(image, str) and image:
        return resolve_image(spec.root, image)
    raise RowRejected(
        "bad_fields",
        f"row {row}: '{IMAGE_COLUMN}' must be {{bytes, path}}, image bytes or a path, not {_describe(image)}",
    )


def _describe(value: Any) -> Any:
    """A cell for the ledger: bytes by their length, not their content."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------- WebDataset


def webdataset_items(spec: DatasetSpec) -> Iterator[Record | Reject]:
    """Samples of every tar shard of ``spec.annotation`` (a file or a folder), in name order."""
    for entry in list_files(spec.annotation, SHARD_SUFFIXES["webdataset"]):
        yield from _shard(spec, entry.uri)


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member's path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _shard(spec: DatasetSpec, uri: str) -> Iterator[Record | Reject]:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    number = 0
    sample: dict[str, Any] | None = None
    stream = _open_stream(uri)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if sample is None or key != sample["key"]:
                    if sample is not None:
                        yield from _sample(spec, uri, number, sample)
                    number += 1
                    sample = {"key": key, "members": [], "image": None, "text": None, "json": None}
                sample["members"].append(member.name)
                if ext in IMAGE_EXTENSIONS and sample["image"] is None:
                    sample["image"] = member_ref(uri, member.offset_data, member.size)
                elif ext in ("txt", "json") and member.size <= _TEXT_LIMIT:
                    f = tar.extractfile(member)
                    sample["text" if ext == "txt" else "json"] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        where = f"sample {number} ({sample['key']})" if sample is not None else "its first member"
        if sample is not None:
            sample = None  # the sample in flight may be missing members: it is not trained on
        yield Reject(uri, max(number, 1), "shard_unreadable", f"{name} cannot be read from {where} on: {e}")
    finally:
        stream.close()
    if sample is not None:
        yield from _sample(spec, uri, number, sample)


def _sample(spec: DatasetSpec, uri: str, number: int, sample: dict[str, Any]) -> Iterator[Record | Reject]:
    members = ", ".join(sample["members"])
    raw = json.dumps({"key": sample["key"], "members": sample["members"]}, ensure_ascii=False)[:RAW_LIMIT]
    where = f"sample {number} ({members})"
    try:
        if sample["image"] is None:
            raise RowRejected("bad_fields", f"{where} has no image member (.{', .'.join(IMAGE_EXTENSIONS)})")
        if sample["text"] is not None:
            try:
                text = sample["text"].decode("utf-8-sig")
            except UnicodeDecodeError:
                raise RowRejected("not_utf8", f"{where}: the .txt caption is not UTF-8") from None
            captions = _captions(text.strip(), where)
        elif sample["json"] is not None:
            try:
                meta = json.loads(sample["json"].decode("utf-8-sig"))
            except (UnicodeDecodeError, ValueError) as e:
                raise RowRejected("malformed_json", f"{where}: the .json member is not JSON: {e}") from None
            if not isinstance(meta, dict) or CAPTION_KEY not in meta:
                raise RowRejected("bad_fields", f"{where}: the .json member has no {CAPTION_KEY!r}")
            captions = _captions(meta[CAPTION_KEY], where)
        else:
            raise RowRejected(
                "empty_caption", f"{where} has no caption member (.txt, or .json with {CAPTION_KEY!r})"
            )
    except RowRejected as e:
        yield Reject(uri, number, e.reason, e.detail, raw)
        return
    yield from _records(spec, uri, number, sample["key"], sample["image"], captions, raw)


def _open_stream(uri: str) -> Any:
    if not is_remote(uri):
        return open(uri, "rb")
    fs, path = filesystem(uri)
    return io.BufferedReader(_Readable(fs.open_input_stream(path)), 1 << 20)


class _Readable(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream (tarfile reads through it)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()
