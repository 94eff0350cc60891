"""Plan the run: which records form which micro-batch, for every optimizer step, decided once.

A *unit* is what the batch sizes count: one record (a row of the annotation), or with
``group_by_image`` all the records that share their images and prompt (COCO: an image and its
five captions), trained as one sequence. The plan is a pure function of the validated records, the
batch arithmetic and the seed: epoch e is a seeded permutation of the units, cut into micro-batches
of ``per_device_batch_size`` units; the micro-batches of optimizer step s are the global indices
``s * world * accum ... (s + 1) * world * accum - 1``, and rank r takes those with
``index % world == r``. Every rank therefore gets the same number of micro-batches, and a restart at
step s knows exactly which micro-batch comes next. Each micro-batch also carries the number of
label tokens of its whole optimizer step, so every layout normalises the loss the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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
    num_units: int,
    global_batch_size: int,
    per_device_batch_size: int,
    world_size: int,
    epochs: int,
    max_steps: int = -1,
) -> BatchPlan:
    """Steps and accumulation for ``num_units`` units (records, or images with ``group_by_image``)."""
    accum = grad_accum_steps(global_batch_size, per_device_batch_size, world_size)
    steps_per_epoch = num_units // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_units} usable units make no optimizer step of global batch {global_batch_size}; "
            "lower train.global_batch_size or add data"
        )
    total = steps_per_epoch * epochs
    if max_steps > 0:
        total = min(total, max_steps) if epochs > 0 else max_steps
    return BatchPlan(per_device_batch_size, world_size, accum, steps_per_epoch, total)


def plan_units(records: pa.Table, group_by_image: bool = False) -> list[list[int]]:
    """The training units: each record alone, or (``group_by_image``) the records with the same
    ``group_key`` together, in order of first appearance. Records with an empty key stay alone."""
    if not group_by_image:
        return [[i] for i in range(records.num_rows)]
    units: dict[str, list[int]] = {}
    singles = 0
    for i, key in enumerate(records.column("group_key").to_pylist()):
        if not key:
            key, singles = f"\0{singles}", singles + 1
        units.setdefault(key, []).append(i)
    return list(units.values())


def unit_lengths(records: pa.Table, units: list[list[int]]) -> tuple[list[int], list[int]]:
    """(tokens, label tokens) of each unit's sequence: the shared prefix once, then every answer."""
    length = records.column("length").to_pylist()
    prefix = records.column("prefix_length").to_pylist()
    labels = records.column("label_tokens").to_pylist()
    tokens, label_tokens = [], []
    for unit in units:
        p = prefix[unit[0]] if len(unit) > 1 else 0
        tokens.append(p + sum(length[r] - p for r in unit))
        label_tokens.append(sum(labels[r] for r in unit))
    return tokens, label_tokens


def plan_microbatches(
    records: pa.Table,
    plan: BatchPlan,
    seed: int = 42,
    group_by_length: bool = False,
    start_step: int = 0,
    units: list[list[int]] | None = None,
) -> pa.Table:
    """The ordered micro-batches from ``start_step`` to the end of the run.

    Each output row is one micro-batch: ``index`` (global position), ``epoch``, ``rows`` (its units,
    each a list of record indices into ``records``), ``samples`` (records), ``label_tokens`` and
    ``step_label_tokens`` (of the whole optimizer step it belongs to). ``units`` defaults to one record per unit. Epoch e is
    a permutation seeded by ``seed + e``; the tail that does not fill a global batch is dropped.
    With ``group_by_length``, units are sorted by length inside mega-batches of 50 micro-batches so
    padding stays small.
    """
    units = units if units is not None else [[i] for i in range(records.num_rows)]
    lengths, label_tokens = unit_lengths(records, units)
    bs = plan.per_device_batch_size
    per_step = plan.microbatches_per_step
    first_mb = start_step * per_step
    last_mb = plan.total_steps * per_step
    out_index, out_epoch, out_rows, out_labels, out_samples = [], [], [], [], []
    mb_per_epoch = plan.steps_per_epoch * per_step
    epoch = first_mb // mb_per_epoch
    while epoch * mb_per_epoch < last_mb:
        order = list(range(len(units)))
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
        for k, batch in enumerate(batches):
            idx = epoch * mb_per_epoch + k
            if first_mb <= idx < last_mb:
                out_index.append(idx)
                out_epoch.append(epoch)
                out_rows.append([units[u] for u in batch])
                out_labels.append(sum(label_tokens[u] for u in batch))
                out_samples.append(sum(len(units[u]) for u in batch))
        epoch += 1
    labels = np.asarray(out_labels, dtype=np.int64)
    step_labels = np.repeat(labels.reshape(-1, per_step).sum(axis=1), per_step) if len(labels) else labels
    return pa.table(
        {
            "index": pa.array(out_index, pa.int64()),
            "epoch": pa.array(out_epoch, pa.int64()),
            "rows": pa.array(out_rows, pa.list_(pa.list_(pa.int64()))),
            "samples": pa.array(out_samples, pa.int64()),
            "label_tokens": labels,
            "step_label_tokens": step_labels,
        }
    )


SAMPLE_FIELDS = (
    "id",
    "source",
    "line",
    "images",
    "tiles",
    "input_ids",
    "labels",
    "image_at",
    "prefix_length",
)  # + "record"


def microbatch_records(
    records: pa.Table,
    planned: pa.Table,
    rank: int | None = None,
    world_size: int = 1,
    first_index: int = 0,
) -> pa.Table:
    """Planned micro-batches with their records: ``index``, ``step_label_tokens`` and ``units``
    (a list of units, each a list of record structs).

    With ``rank``, only that rank's micro-batches (``index % world_size == rank``) from
    ``first_index`` on: what one training worker reads, decided by the plan alone.
    """
    index = planned["index"].to_numpy()
    keep = index >= first_index
    if rank is not None:
        keep &= index % world_size == rank
    mine = planned.filter(pa.array(keep))
    rows = mine["rows"].combine_chunks()  # list<list<int64>>
    unit_offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(rows).to_numpy())])
    units = pc.list_flatten(rows)
    record_offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(units).to_numpy())])
    flat = pc.list_flatten(units)
    structs = pa.StructArray.from_arrays(
        [records[f].combine_chunks().take(flat) for f in SAMPLE_FIELDS] + [flat],
        names=[*SAMPLE_FIELDS, "record"],  # the record's index in ``records``
    )
    per_unit = pa.ListArray.from_arrays(pa.array(record_offsets, pa.int32()), structs)
    per_mb = pa.ListArray.from_arrays(pa.array(unit_offsets, pa.int32()), per_unit)
    return pa.table({"index": mine["index"], "step_label_tokens": mine["step_label_tokens"], "units": per_mb})
