"""From annotations to micro-batches: prepare (validate once), plan (order per epoch), build (decode,
tile, tokenize, collate) on Ray Data or as a plain iterator.

1. :func:`prepare` reads the annotation(s), validates every row and image once, and returns the
   good records (with tile counts and token lengths) as a small Arrow table plus the rejects.
2. :func:`plan_microbatches` shuffles those small records per epoch (seeded; optionally grouped by
   length), cuts them into micro-batches and keeps exactly ``steps * grad_accum * world_size`` of
   them, so every rank gets the same number of batches; a resume skips the consumed prefix.
3. :class:`MicroBatchBuilder` turns one planned micro-batch into tensors: decoded + tiled uint8
   images concatenated along dim 0, per-sample tile counts, right-padded ids/labels/mask. It runs
   in a Ray Data actor pool (:func:`train_dataset`) or in-process (:func:`iter_microbatches`).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raylora.data.records import (
    DataError,
    Duplicate,
    Record,
    Reject,
    duplicate_ids,
    inspect_image,
    iter_annotation,
    load_rgb,
    read_specs,
)
from raylora.data.templates import IGNORE_INDEX, ConversationTokenizer, RowRejected
from raylora.data.tiling import num_tiles, tile_image


@dataclass(frozen=True)
class ImageSettings:
    """Everything that turns an image + conversation into tokens; shared by train and eval."""

    tokenizer_path: str
    template: str
    system_message: str | None = None
    image_size: int = 448
    min_num: int = 1
    max_num: int = 6
    use_thumbnail: bool = True
    tokens_per_tile: int = 256
    max_seq_length: int = 4096

    def tiles_for(self, width: int, height: int) -> int:
        return num_tiles(width, height, self.image_size, self.min_num, self.max_num, self.use_thumbnail)

    def tile(self, path: str) -> np.ndarray:
        return tile_image(load_rgb(path), self.image_size, self.min_num, self.max_num, self.use_thumbnail)

    def conversation_tokenizer(self) -> ConversationTokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return ConversationTokenizer(
            tok, self.template, self.tokens_per_tile, self.max_seq_length, self.system_message
        )


@dataclass
class Prepared:
    """Validated records (Arrow table) and what was rejected."""

    table: pa.Table
    rejects: list[Reject] = field(default_factory=list)
    rows_total: int = 0

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
            "tokens": {
                "p50": int(np.percentile(lengths, 50)),
                "p95": int(np.percentile(lengths, 95)),
                "max": int(lengths.max()),
            },
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


def prepare(
    train: str | Path,
    root: str | Path | None,
    settings: ImageSettings,
    strict: bool = False,
    seed: int = 42,
    use_ray: bool | None = None,
    progress: bool = False,
) -> Prepared:
    """Read and validate every row; compute tiles per image and the token length of each row."""
    records: list[Record] = []
    rejects: list[Reject] = []
    total = 0
    for spec in read_specs(train, root):
        for item in iter_annotation(spec, seed):
            total += 1
            if isinstance(item, Reject):
                if strict:
                    raise DataError(item.message())
                rejects.append(item)
            else:
                records.append(item)
    paths = sorted({p for r in records for p in r.images})
    if progress:
        print(f"[data] {total} rows read, checking {len(paths)} images ...", file=sys.stderr, flush=True)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    sizes = _image_sizes(paths, use_ray)
    conv_tok = settings.conversation_tokenizer()
    cols: dict[str, list[Any]] = {
        k: [] for k in ("id", "source", "line", "images", "conversations", "tiles", "length")
    }
    for rec in records:
        try:
            tiles = []
            for p in rec.images:
                size = sizes[p]
                if isinstance(size, RowRejected):
                    raise size
                tiles.append(settings.tiles_for(*size))
            ids, _ = conv_tok.encode_conversation(rec.conversations, tiles)
        except RowRejected as e:
            rej = Reject(
                rec.source, rec.line, e.reason, e.detail, json.dumps({"image": rec.images, "id": rec.id})
            )
            if strict:
                raise DataError(rej.message()) from None
            rejects.append(rej)
            continue
        cols["id"].append(rec.id)
        cols["source"].append(rec.source)
        cols["line"].append(rec.line)
        cols["images"].append(rec.images)
        cols["conversations"].append(json.dumps(rec.conversations, ensure_ascii=False))
        cols["tiles"].append(tiles)
        cols["length"].append(len(ids))
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("line", pa.int64()),
            ("images", pa.list_(pa.string())),
            ("conversations", pa.string()),
            ("tiles", pa.list_(pa.int64())),
            ("length", pa.int64()),
        ]
    )
    rejects.sort(key=lambda r: (r.source, r.line))
    return Prepared(pa.table(cols, schema=schema), rejects, total)


# ------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class BatchPlan:
    """How many micro-batches of which size the run consumes."""

    per_device_batch_size: int
    world_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int

    @property
    def microbatches_per_step(self) -> int:
        return self.world_size * self.grad_accum


def grad_accum_steps(global_batch_size: int, per_device_batch_size: int, world_size: int) -> int:
    """global = per_device * world * accum; an inexact split is an error naming the three numbers."""
    per_step = per_device_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size {global_batch_size} is not a multiple of per_device_batch_size "
            f"{per_device_batch_size} x {world_size} workers = {per_step}; pick a global batch of "
            f"{max(per_step, global_batch_size // per_step * per_step)} or change the per-device batch"
        )
    return global_batch_size // per_step


def make_plan(
    num_rows: int,
    global_batch_size: int,
    per_device_batch_size: int,
    world_size: int,
    epochs: int,
    max_steps: int = -1,
) -> BatchPlan:
    accum = grad_accum_steps(global_batch_size, per_device_batch_size, world_size)
    steps_per_epoch = num_rows // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_rows} usable rows make no optimizer step of global batch {global_batch_size}; "
            "lower train.global_batch_size or add data"
        )
    total = steps_per_epoch * epochs
    if max_steps > 0:
        total = min(total, max_steps) if epochs > 0 else max_steps
    return BatchPlan(per_device_batch_size, world_size, accum, steps_per_epoch, total)


def plan_microbatches(
    table: pa.Table,
    plan: BatchPlan,
    seed: int = 42,
    group_by_length: bool = False,
    start_step: int = 0,
) -> pa.Table:
    """The ordered micro-batches from ``start_step`` to the end of the run.

    Each output row is one micro-batch: ``index`` (global position), ``epoch`` and ``rows`` (the
    record indices into ``table``). Epoch e is a permutation seeded by ``seed + e``; the tail that
    does not fill a global batch is dropped. With ``group_by_length``, records are sorted by length
    inside mega-batches of 50 micro-batches so padding stays small.
    """
    lengths = table.column("length").to_pylist()
    bs = plan.per_device_batch_size
    per_step = plan.microbatches_per_step
    first_mb = start_step * per_step
    last_mb = plan.total_steps * per_step
    out_index, out_epoch, out_rows = [], [], []
    mb_per_epoch = plan.steps_per_epoch * per_step
    epoch = first_mb // mb_per_epoch
    while epoch * mb_per_epoch < last_mb:
        order = list(range(table.num_rows))
        random.Random(seed + epoch).shuffle(order)
        order = order[: mb_per_epoch * bs]
        if group_by_length:
            mega = bs * 50
            order = [
                i
                for start in range(0, len(order), mega)
                for i in sorted(order[start : start + mega], key=lambda j: -lengths[j])
            ]
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        if group_by_length:  # keep the longest batch first (fail fast on memory), shuffle the rest
            rest = batches[1:]
            random.Random(seed + epoch + 1_000_003).shuffle(rest)
            batches = batches[:1] + rest
        for k, rows in enumerate(batches):
            idx = epoch * mb_per_epoch + k
            if first_mb <= idx < last_mb:
                out_index.append(idx)
                out_epoch.append(epoch)
                out_rows.append(rows)
        epoch += 1
    return pa.table({"index": out_index, "epoch": out_epoch, "rows": out_rows})


# ------------------------------------------------------------------------------------- building


def pad_right(seqs: list[np.ndarray], value: int) -> np.ndarray:
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


class MicroBatchBuilder:
    """Callable for ``map_batches``: planned micro-batch rows -> pickled tensors (one row each).

    Holds the records table (small) and a tokenizer per actor, so tokenization never shares a
    fast tokenizer across threads.
    """

    def __init__(self, records: pa.Table, settings: ImageSettings):
        self.records = records
        self.settings = settings
        self.conv_tok = settings.conversation_tokenizer()
        pad = self.conv_tok.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def build(self, rows: list[int]) -> dict[str, np.ndarray]:
        tiles, ids, labels, counts = [], [], [], []
        for r in rows:
            images = self.records["images"][r].as_py()
            expected = self.records["tiles"][r].as_py()
            conv = json.loads(self.records["conversations"][r].as_py())
            per_image = [self.settings.tile(p) for p in images]
            got = [len(t) for t in per_image]
            if got != expected:
                raise DataError(
                    f"{self.records['source'][r].as_py()}:{self.records['line'][r].as_py()}: image changed since "
                    f"validation ({got} tiles, expected {expected}); re-run preparation"
                )
            i, lab = self.conv_tok.encode_conversation(conv, got)
            tiles.extend(per_image)
            counts.append(sum(got))
            ids.append(i)
            labels.append(lab)
        input_ids = pad_right(ids, self.pad_id)
        return {
            "pixel_values": np.concatenate(tiles, axis=0),
            "num_tiles": np.asarray(counts, dtype=np.int64),
            "input_ids": input_ids,
            "labels": pad_right(labels, IGNORE_INDEX),
            "attention_mask": pad_right([np.ones(len(i), dtype=np.int64) for i in ids], 0),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = [pickle.dumps(self.build(list(rows)), protocol=5) for rows in batch["rows"]]
        return {"index": np.asarray(batch["index"]), "payload": np.asarray(payloads, dtype=object)}


def unpack(payload: bytes) -> dict[str, np.ndarray]:
    return pickle.loads(payload)


def iter_microbatches(
    records: pa.Table, planned: pa.Table, settings: ImageSettings
) -> Iterator[dict[str, np.ndarray]]:
    """The plain (no Ray) path: the same builder, in this process."""
    builder = MicroBatchBuilder(records, settings)
    for rows in planned.column("rows").to_pylist():
        yield builder.build(rows)


def train_dataset(
    records: pa.Table,
    planned: pa.Table,
    settings: ImageSettings,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
):
    """A Ray Dataset of pickled micro-batches, in plan order, built by an actor pool."""
    import ray.data
    from ray.data import ActorPoolStrategy

    quiet_progress()
    records_ref = ray.put(records)
    ds = ray.data.from_arrow(planned, override_num_blocks=max(1, min(planned.num_rows, 64 * actors)))
    return ds.map_batches(
        _RemoteBuilder,
        fn_constructor_kwargs={"records_ref": records_ref, "settings": settings},
        batch_size=1,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        batch_format="numpy",
    )


class _RemoteBuilder(MicroBatchBuilder):
    def __init__(self, records_ref: Any, settings: ImageSettings):
        import ray

        super().__init__(ray.get(records_ref), settings)


def to_torch(batch: dict[str, np.ndarray], device: Any = "cpu") -> dict[str, Any]:
    """numpy micro-batch -> torch tensors on ``device`` (tiles stay uint8; normalise on device)."""
    import torch

    return {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in batch.items()
    }


def quiet_progress() -> None:
    """Ray Data's per-operator progress bars flood non-interactive logs; training prints its own."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
