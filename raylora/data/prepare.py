"""Validate once: read the annotation(s), check every row and decode every distinct image once,
and keep the good records (with tiles per image and token length) as a small Arrow table.

A bad row is never dropped silently: it becomes a :class:`~raylora.data.records.Reject` (file, line,
reason), or a :class:`~raylora.data.records.DataError` in strict mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from raylora.data.images import container_of
from raylora.data.pipeline import quiet_progress
from raylora.data.plan import plan_units, unit_lengths
from raylora.data.readers import READERS, iter_annotation
from raylora.data.records import (
    CAPTION_PROMPT,
    SHARD_SUFFIXES,
    DataError,
    Duplicate,
    Record,
    Reject,
    duplicate_ids,
    inspect_image,
    read_specs,
)
from raylora.data.settings import ImageSettings
from raylora.data.templates import IGNORE_INDEX, RowRejected
from raylora.files import atomic_dir, cache_root, file_entry, filesystem, is_remote, list_files, read_bytes

# ray is imported inside the image check that uses it, only when a cluster is up.


SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("images", pa.list_(pa.string())),
        ("conversations", pa.string()),  # JSON, normalised (placeholders added)
        ("tiles", pa.list_(pa.int64())),  # per image: its units (tiles, merged patches)
        # the row tokenized once, without the images' context runs (the micro-batch builder inserts
        # them at image_at): the decode actors never tokenize
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("image_at", pa.list_(pa.int32())),
        ("length", pa.int64()),  # tokens of the row, image tokens expanded
        ("prefix_length", pa.int64()),  # tokens before the first supervised one
        ("label_tokens", pa.int64()),  # supervised tokens (what the loss is normalised by)
        ("group_key", pa.string()),  # rows with the same key share their prefix ("" = never grouped)
    ]
)


@dataclass
class Prepared:
    """Validated records (Arrow table) and what was rejected."""

    table: pa.Table
    rejects: list[Reject] = field(default_factory=list)
    rows_total: int = 0
    tokens_per_unit: int = 1  # image tokens per image unit (tile, merged patch) of the model family

    @property
    def rows_ok(self) -> int:
        return self.table.num_rows

    def stats(self) -> dict[str, Any]:
        lengths = np.asarray(self.table.column("length").to_pylist() or [0])
        tiles = Counter()
        seen = set()
        for imgs, tl in zip(self.table.column("images").to_pylist(), self.table.column("tiles").to_pylist()):
            for img, t in zip(imgs, tl):
                if img not in seen:
                    seen.add(img)
                    tiles[t] += 1
        return {
            "rows_total": self.rows_total,
            "rows_ok": self.rows_ok,
            "rows_rejected": len(self.rejects),
            "rejects": dict(Counter(r.reason for r in self.rejects).most_common()),
            "duplicate_ids": len(self.duplicate_ids()),
            "tiles": {str(k): v for k, v in sorted(tiles.items())},
            "image_tokens": _percentiles(np.asarray(sorted(tiles.elements()) or [0]) * self.tokens_per_unit),
            "tokens": _percentiles(lengths),
            "groups": self.group_stats(),
        }

    def group_stats(self) -> dict[str, Any]:
        """What ``data.group_by_image`` makes of the rows: sequences (images), captions per image,
        tokens per grouped sequence (the shared prefix once, then every caption)."""
        units = plan_units(self.table, group_by_image=True)
        tokens, _ = unit_lengths(self.table, units)
        sizes = Counter(len(u) for u in units)
        return {
            "images": len(units),
            "captions_per_image": {str(k): v for k, v in sorted(sizes.items())},
            "tokens_per_sequence": _percentiles(np.asarray(tokens or [0])),
        }

    def duplicate_ids(self) -> list[Duplicate]:
        """Kept rows that reuse an earlier row's id (reported, not rejected)."""
        return duplicate_ids(*(self.table.column(c).to_pylist() for c in ("id", "source", "line")))

    def write_rejects(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in self.rejects:
                f.write(r.to_json() + "\n")


def _percentiles(values: np.ndarray) -> dict[str, int]:
    return {
        "p50": int(np.percentile(values, 50)),
        "p95": int(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def _image_sizes(paths: list[str], use_ray: bool) -> dict[str, tuple[int, int] | RowRejected]:
    """Decode every distinct image once (Ray Data when a cluster is up, else threads)."""

    def check(path: str) -> tuple[int, int] | RowRejected:
        try:
            return inspect_image(path)
        except RowRejected as e:
            return e

    if use_ray and len(paths) > 256:
        import ray.data

        def check_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = [check(p) for p in batch["path"]]
            return {
                "path": batch["path"],
                "w": np.asarray([o[0] if isinstance(o, tuple) else -1 for o in out]),
                "h": np.asarray([o[1] if isinstance(o, tuple) else -1 for o in out]),
                "err": np.asarray(
                    [f"{o.reason}\t{o.detail}" if isinstance(o, RowRejected) else "" for o in out]
                ),
            }

        quiet_progress()
        ds = ray.data.from_items([{"path": p} for p in paths]).map_batches(check_batch, batch_size=256)
        result: dict[str, tuple[int, int] | RowRejected] = {}
        for row in ds.iter_rows():
            if row["err"]:
                reason, detail = row["err"].split("\t", 1)
                result[row["path"]] = RowRejected(reason, detail)
            else:
                result[row["path"]] = (int(row["w"]), int(row["h"]))
        return result
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        return dict(zip(paths, pool.map(check, paths)))


CHUNK_ROWS = 8192  # rows tokenized and packed into Arrow at a time (bounded memory on large files)
CHUNK_BYTES = 8 << 20  # a JSONL chunk a Ray Data task checks (whole lines)
PARALLEL_BYTES = 16 << 20  # a JSONL, or a folder of shards, from this size is checked across the cluster


def prepare(
    train: str | Path,
    root: str | Path | None,
    settings: ImageSettings,
    strict: bool = False,
    seed: int = 42,
    use_ray: bool | None = None,
    progress: bool = False,
    fmt: str = "auto",
    prompt: str = CAPTION_PROMPT,
    ledger: str | Path | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Prepared:
    """Read and validate every row; compute tiles per image and the token length of each row.
    ``fmt``: the annotation's format (``data.format``); ``prompt``: the question of rows that carry
    only a caption (COCO captions JSON); ``ledger``: a file the rejects are appended to as they are
    found (the returned ones are sorted by file and line).

    With Ray up, a JSONL annotation of :data:`PARALLEL_BYTES` or more is cut into chunks of whole
    lines (``chunk_bytes``), and a folder of Parquet files or tar shards as large into its files, that
    a Ray Data job checks and tokenizes across the cluster, one actor per CPU
    (:func:`_check_in_parallel`); else the driver reads it.

    Rows stream through in chunks of :data:`CHUNK_ROWS`: checked, tokenized and packed into Arrow
    (a few hundred bytes a row), so memory follows the records table, not Python objects per row.
    Every distinct image is then decoded once (a Ray Data job when a cluster is up). A result is
    cached by content (:func:`validation_key`) and reused while its images are unchanged."""
    specs = read_specs(train, root, fmt, prompt)
    key = validation_key(specs, settings, strict, seed)
    reused = load_validated(key)
    if reused is not None:
        if progress:
            print(
                f"[data] validation reused: {reused.rows_total} rows, {reused.rows_ok} ok, {len(reused.rejects)} "
                f"rejected, as checked before with the same annotation, images and settings "
                f"({validated_dir(key)}; delete it to check again)",
                file=sys.stderr,
                flush=True,
            )
        return reused
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    conv_tok = settings.conversation_tokenizer()
    rejects: list[Reject] = []
    parts: list[pa.Table] = []
    paths: set[str] = set()
    total = 0
    out = open(ledger, "w", encoding="utf-8") if ledger else None  # the ledger as it goes (unsorted)

    def rejected(items: list[Reject]) -> None:
        if strict and items:
            raise DataError(items[0].message())
        rejects.extend(items)
        if out is not None:
            out.writelines(r.to_json() + "\n" for r in items)
            out.flush()

    try:
        for spec in specs:
            chunks = parallel_chunks(spec, use_ray, chunk_bytes)
            if chunks:
                total += _check_in_parallel(spec, settings, chunks, parts, paths, rejected, progress)
                continue
            chunk: list[Record] = []
            for item in iter_annotation(spec, seed):
                total += 1
                if isinstance(item, Reject):
                    rejected([item])
                    continue
                chunk.append(item)
                paths.update(item.images)
                if len(chunk) >= CHUNK_ROWS:
                    parts.append(_text_columns(chunk, conv_tok))
                    chunk = []
                    if progress and len(parts) % 25 == 0:
                        print(f"[data] {total} rows read ...", file=sys.stderr, flush=True)
            parts.append(_text_columns(chunk, conv_tok))
            del chunk
    finally:
        if out is not None:
            out.close()
    if progress:
        print(f"[data] {total} rows read, checking {len(paths)} images ...", file=sys.stderr, flush=True)
    sizes = _image_sizes(sorted(paths), use_ray)
    tables = []
    found = len(rejects)
    while parts:  # each part is released as soon as its rows are final
        tables.append(_finish_rows(parts.pop(0), sizes, settings, conv_tok, rejects, strict))
    if ledger:
        with open(ledger, "a", encoding="utf-8") as f:
            f.writelines(r.to_json() + "\n" for r in rejects[found:])
    rejects.sort(key=lambda r: (r.source, r.line))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    prepared = Prepared(table, rejects, total, settings.tokens_per_unit)
    save_validated(key, prepared, image_stamps(sorted(paths)))
    return prepared


@dataclass
class Chunk:
    """What one Ray Data task checks: lines of a JSONL file (``size`` bytes from ``start``, the first
    being line ``first_line``), or a whole shard file ``uri`` (Parquet, tar; ``size`` -1)."""

    index: int
    start: int
    size: int
    first_line: int
    uri: str = ""  # a shard file; "" for the dataset's JSONL


def line_chunks(uri: str, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """A JSONL file (local or a URI) cut into chunks of about ``chunk_bytes`` of whole lines, with
    the number of each chunk's first line; one streaming pass (a few MiB in memory)."""
    chunks: list[Chunk] = []
    start, first_line, lines, offset = 0, 1, 0, 0
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        while block := f.read(4 << 20):
            pos = 0
            while True:
                cut = max(start + chunk_bytes - offset, pos)
                newline = block.find(b"\n", cut) if cut < len(block) else -1
                if newline < 0:
                    lines += block.count(b"\n", pos)
                    break
                lines += block.count(b"\n", pos, newline + 1)
                end = offset + newline + 1
                chunks.append(Chunk(len(chunks), start, end - start, first_line))
                first_line, lines, start, pos = first_line + lines, 0, end, newline + 1
            offset += len(block)
    if offset > start:
        chunks.append(Chunk(len(chunks), start, offset - start, first_line))
    return chunks


def parallel_chunks(spec: Any, use_ray: bool, chunk_bytes: int) -> list[Chunk]:
    """The chunks a Ray Data job checks for this dataset, or [] when the driver reads it: Ray down,
    a COCO or LLaVA JSON (one document), a fractional or repeated dataset (repeat_time), a single
    shard, or under :data:`PARALLEL_BYTES` in all (unless ``chunk_bytes`` is set below the default, as
    the tests do). JSONL: chunks of whole lines; Parquet and WebDataset: a chunk per shard file."""
    if not use_ray or spec.repeat_time != 1.0 or spec.format not in ("jsonl", *SHARD_SUFFIXES):
        return []
    if spec.format in SHARD_SUFFIXES:
        files = list_files(spec.annotation, SHARD_SUFFIXES[spec.format])
        if len(files) < 2 or (sum(f.size for f in files) < PARALLEL_BYTES and chunk_bytes >= CHUNK_BYTES):
            return []
        return [Chunk(i, 0, -1, 1, f.uri) for i, f in enumerate(files)]
    entry = file_entry(spec.annotation)
    if entry is None or (entry.size < PARALLEL_BYTES and chunk_bytes >= CHUNK_BYTES):
        return []
    if read_bytes(spec.annotation, 0, 4).startswith((b"\xff\xfe", b"\xfe\xff")):
        return []  # the driver's reader names the problem
    chunks = line_chunks(str(spec.annotation), chunk_bytes)
    return chunks if len(chunks) > 1 else []


class ChunkChecker:
    """A Ray Data actor: checks and tokenizes chunks of an annotation, lines of a JSONL or whole
    shard files (its own tokenizer)."""

    def __init__(self, spec: Any, settings: ImageSettings) -> None:
        self.spec = spec
        self.conv_tok = settings.conversation_tokenizer()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        import io
        from dataclasses import replace

        from raylora.data.records import jsonl_lines

        out: dict[str, list[Any]] = {"index": [], "rows": [], "records": [], "rejects": [], "paths": []}
        for index, start, size, first, uri in zip(
            batch["index"], batch["start"], batch["size"], batch["first_line"], batch["uri"]
        ):
            if uri:  # a whole shard file, read as the dataset's reader reads each of its files
                items = READERS[self.spec.format](replace(self.spec, annotation=str(uri)))
            else:
                data = read_bytes(self.spec.annotation, int(start), int(size))
                items = jsonl_lines(self.spec, io.BytesIO(data), int(first))
            records, rejects, rows = [], [], 0
            for item in items:
                rows += 1
                (rejects if isinstance(item, Reject) else records).append(item)
            table = _text_columns(records, self.conv_tok)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            out["index"].append(int(index))
            out["rows"].append(rows)
            out["records"].append(sink.getvalue().to_pybytes())
            out["rejects"].append(json.dumps([r.to_json() for r in rejects]))
            out["paths"].append(json.dumps(sorted({p for r in records for p in r.images})))
        return out


def _check_in_parallel(
    spec: Any,
    settings: ImageSettings,
    chunks: list[Chunk],
    parts: list[pa.Table],
    paths: set[str],
    rejected: Any,
    progress: bool,
) -> int:
    """Check ``chunks`` of ``spec``'s JSONL in a Ray Data job (an actor per CPU, up to one per chunk);
    the tokenized parts are appended to ``parts`` in file order; rejects go to ``rejected`` as each
    chunk finishes. Returns the rows read."""
    import ray
    import ray.data

    quiet_progress()
    actors = max(1, min(len(chunks), int(ray.cluster_resources().get("CPU", 1))))
    if progress:
        print(
            f"[data] checking {spec.annotation} in {len(chunks)} {'shards' if chunks[0].uri else 'chunks'}, "
            f"{actors} Ray Data actor(s) ...",
            file=sys.stderr,
            flush=True,
        )
    ds = ray.data.from_items([vars(c) for c in chunks], override_num_blocks=len(chunks))
    # max_restarts=0: an actor that dies fails the check (run it again) rather than Ray logging, on
    # this console, that restarted actors may lose their constructor arguments (ray#53727)
    ds = ds.map_batches(
        ChunkChecker,
        fn_constructor_args=(spec, settings),
        batch_size=1,
        concurrency=actors,
        num_cpus=1,
        max_restarts=0,
    )
    got: dict[int, pa.Table] = {}
    rows = 0
    for row in ds.iter_rows():
        got[row["index"]] = pa.ipc.open_stream(row["records"]).read_all()
        rows += row["rows"]
        paths.update(json.loads(row["paths"]))
        rejected([Reject(**json.loads(r)) for r in json.loads(row["rejects"])])
        if progress and len(got) % 10 == 0:
            print(
                f"[data] {len(got)}/{len(chunks)} chunks, {rows} rows checked ...",
                file=sys.stderr,
                flush=True,
            )
    parts.extend(got[i] for i in sorted(got))
    return rows


def _text_columns(records: list[Record], conv_tok: Any) -> pa.Table:
    """A chunk of records, tokenized: what the rows are before their images are known."""
    cols: dict[str, list[Any]] = {
        k: [] for k in ("id", "source", "line", "images", "conversations", "input_ids", "labels", "image_at")
    }
    extra: dict[str, list[Any]] = {"label_tokens": [], "first": [], "group_key": []}
    for rec in records:
        ids, labels, image_at = conv_tok.encode_text(rec.conversations)
        cols["id"].append(rec.id)
        cols["source"].append(rec.source)
        cols["line"].append(rec.line)
        cols["images"].append(rec.images)
        cols["conversations"].append(json.dumps(rec.conversations, ensure_ascii=False))
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["image_at"].append(image_at)
        supervised = labels != IGNORE_INDEX
        extra["first"].append(int(np.argmax(supervised)))  # in the unexpanded tokens
        extra["label_tokens"].append(int(supervised.sum()))
        extra["group_key"].append(group_key(rec))
    arrays = {name: pa.array(values, SCHEMA.field(name).type) for name, values in cols.items()}
    arrays["label_tokens"] = pa.array(extra["label_tokens"], pa.int64())
    arrays["first"] = pa.array(extra["first"], pa.int64())
    arrays["group_key"] = pa.array(extra["group_key"], pa.string())
    return pa.table(arrays)


def _finish_rows(
    part: pa.Table,
    sizes: dict[str, Any],
    settings: ImageSettings,
    conv_tok: Any,
    rejects: list[Reject],
    strict: bool,
) -> pa.Table:
    """A tokenized chunk with its images' tiles, the rows' lengths and prefixes: rows whose image was
    rejected, or that are too long once their images are expanded, become rejects."""
    keep, tiles_col, lengths, prefixes = [], [], [], []
    columns = [part.column(c).to_pylist() for c in ("images", "image_at", "first", "id", "source", "line")]
    n_ids = pa.compute.list_value_length(part.column("input_ids")).to_pylist()
    for i, (images, image_at, first, rid, source, line) in enumerate(zip(*columns)):
        try:
            tiles = []
            for p in images:
                size = sizes[p]
                if isinstance(size, RowRejected):
                    raise size
                tiles.append(settings.tiles_for(*size))
            length = conv_tok.expanded_length(n_ids[i], tiles)
        except RowRejected as e:
            rej = Reject(source, line, e.reason, e.detail, json.dumps({"image": images, "id": rid}))
            if strict:
                raise DataError(rej.message()) from None
            rejects.append(rej)
            continue
        keep.append(i)
        tiles_col.append(tiles)
        lengths.append(length)
        before = sum(n for at, n in zip(image_at, tiles) if at <= first) * settings.tokens_per_unit
        prefixes.append(first + before)
    kept = part.take(pa.array(keep, pa.int64()))
    arrays = {name: kept.column(name) for name in kept.column_names if name in SCHEMA.names}
    arrays["tiles"] = pa.array(tiles_col, SCHEMA.field("tiles").type)
    arrays["length"] = pa.array(lengths, pa.int64())
    arrays["prefix_length"] = pa.array(prefixes, pa.int64())
    return pa.table({name: arrays[name] for name in SCHEMA.names}, schema=SCHEMA)


# The validated-records cache, by content: <raylora cache>/validated/<key>/ holds records.arrow (the
# records table), rejects.jsonl, images.json (every image's file: path, size, modification time, as
# checked) and summary.json. The key covers the annotation files' bytes (shards: their listing), the
# image and text settings (family, template, tokenizer files) and this table's schema; a result is
# reused only while every image file is as it was checked. A result with images that were missing is
# never cached (the file may appear).
VALIDATED = "validated"
VALIDATED_VERSION = 2  # bump when the records table or what validation checks changes


def validation_key(specs: list[Any], settings: ImageSettings, strict: bool, seed: int) -> str:
    h = hashlib.sha256(json.dumps([VALIDATED_VERSION, strict, seed, repr(settings)]).encode())
    for spec in specs:
        h.update(
            json.dumps(
                [spec.name, str(spec.annotation), str(spec.root), spec.format, spec.prompt, spec.repeat_time]
            ).encode()
        )
        if spec.format in SHARD_SUFFIXES:  # shards: their listing (names, sizes, mtimes)
            for e in list_files(spec.annotation, SHARD_SUFFIXES[spec.format]):
                h.update(f"{e.uri}\t{e.size}\t{e.mtime_ns}\n".encode())
        else:
            fs, path = filesystem(spec.annotation)
            with fs.open_input_stream(path) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    tokenizer = Path(settings.tokenizer_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer / name).is_file():
            h.update(name.encode() + (tokenizer / name).read_bytes())
    return h.hexdigest()[:24]


def image_stamps(paths: list[str]) -> list[list[Any]]:
    """[file, size, mtime_ns] of every file holding these images (an image inside a shard: the
    shard); size -1 for a file that is not there."""
    containers = sorted({container_of(p) for p in paths})
    remote = [c for c in containers if is_remote(c)]
    stamps = dict(zip(remote, ThreadPoolExecutor(16).map(file_entry, remote))) if remote else {}
    out = []
    for path in containers:
        if path in stamps:
            e = stamps[path]
            out.append([path, e.size, e.mtime_ns] if e else [path, -1, 0])
            continue
        try:
            st = os.stat(path)
            out.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([path, -1, 0])
    return out


def validated_dir(key: str) -> Path:
    return cache_root() / VALIDATED / key


def load_validated(key: str) -> Prepared | None:
    """The cached result of an identical validation whose images are unchanged, or None."""
    folder = validated_dir(key)
    try:
        summary = json.loads((folder / "summary.json").read_text())
        stamps = json.loads((folder / "images.json").read_text())
        if image_stamps([p for p, _, _ in stamps]) != stamps:
            return None
        with pa.OSFile(str(folder / "records.arrow"), "rb") as f:
            table = pa.ipc.open_file(f).read_all()
        lines = (folder / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
        rejects = [Reject(**json.loads(line)) for line in lines if line]
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowInvalid):
        return None
    if table.schema != SCHEMA:
        return None
    return Prepared(table, rejects, int(summary["rows_total"]), int(summary["tokens_per_unit"]))


def save_validated(key: str, prepared: Prepared, stamps: list[list[Any]]) -> None:
    """Cache a validation's result (best effort: a cache that cannot be written is skipped)."""
    if any(r.reason == "image_missing" for r in prepared.rejects):
        return
    try:
        with atomic_dir(validated_dir(key), overwrite=True) as tmp:
            with (
                pa.OSFile(str(tmp / "records.arrow"), "wb") as f,
                pa.ipc.new_file(f, prepared.table.schema) as w,
            ):
                w.write_table(prepared.table)
            prepared.write_rejects(tmp / "rejects.jsonl")
            (tmp / "images.json").write_text(json.dumps(stamps))
            summary = {"rows_total": prepared.rows_total, "tokens_per_unit": prepared.tokens_per_unit}
            (tmp / "summary.json").write_text(json.dumps(summary))
    except OSError:
        pass


def group_key(rec: Record) -> str:
    """What rows must share to be trained as one sequence (group_by_image): the images and the whole
    conversation up to its one answer. "" for a row with several answers (its earlier answers are
    supervised too, so it is trained on its own)."""
    turns = rec.conversations
    if sum(t["from"] == "gpt" for t in turns) != 1 or turns[-1]["from"] != "gpt":
        return ""
    blob = json.dumps([rec.images, turns[:-1]], ensure_ascii=False).encode()
    return hashlib.sha1(blob).hexdigest()[:20]  # the builder also checks the prefix tokens are equal
