"""Every annotation format's reader, chosen by a dataset's ``format``, with ``repeat_time`` applied."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

from raylora.data.records import DatasetSpec, Record, Reject, coco_items, jsonl_items, llava_items
from raylora.data.shards import parquet_items, webdataset_items

READERS: dict[str, Callable[[DatasetSpec], Iterator[Record | Reject]]] = {
    "jsonl": jsonl_items,
    "coco": coco_items,
    "llava": llava_items,
    "parquet": parquet_items,
    "webdataset": webdataset_items,
}


def iter_annotation(spec: DatasetSpec, seed: int = 42) -> Iterator[Record | Reject]:
    """Records and rejects of one annotation, repeat_time applied (fractions keep a seeded subset).

    JSONL: the file is read as bytes and decoded line by line, so one line that is not UTF-8 is one
    ``not_utf8`` reject and every other line is still read. A UTF-8 byte-order mark at the start of
    a line is ignored (files saved by some editors start with one; concatenated files may carry one
    mid-file). Blank lines are skipped and not counted as rows; line numbers stay those of the file.
    COCO captions JSON and LLaVA JSON lists: the file is one JSON document (an error naming the file
    when it is not); each annotation or list item is a row, numbered from 1 in the ledger's ``line``.
    Parquet files and tar shards: see :mod:`raylora.data.shards`.
    """
    items = READERS[spec.format](spec)
    if spec.repeat_time == 1.0:
        yield from items
        return
    items = list(items)
    good = [i for i in items if isinstance(i, Record)]
    yield from (i for i in items if isinstance(i, Reject))
    whole, frac = int(spec.repeat_time), spec.repeat_time - int(spec.repeat_time)
    yield from good * whole
    if frac > 0:
        rng = random.Random(seed)
        yield from rng.sample(good, math.floor(len(good) * frac))
