"""Plan the run: which records form which micro-batch, for every optimizer step, decided once.

The plan is a pure function of the validated records, the batch arithmetic and the seed: epoch e is
a seeded permutation of the records, cut into micro-batches; the micro-batches of optimizer step s
are the global indices ``s * world * accum ... (s + 1) * world * accum - 1``, and rank r takes those
with ``index % world == r``. Every rank therefore gets the same number of micro-batches, and a
restart at step s knows exactly which micro-batch comes next.
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


SAMPLE_FIELDS = ("id", "source", "line", "images", "tiles", "conversations")


def microbatch_records(
    records: pa.Table,
    planned: pa.Table,
    rank: int | None = None,
    world_size: int = 1,
    first_index: int = 0,
) -> pa.Table:
    """Planned micro-batches with their records: ``index`` and ``samples`` (a list of record structs).

    With ``rank``, only that rank's micro-batches (``index % world_size == rank``) from
    ``first_index`` on: what one training worker reads, decided by the plan alone.
    """

    index = planned["index"].to_numpy()
    keep = index >= first_index
    if rank is not None:
        keep &= index % world_size == rank
    mine = planned.filter(pa.array(keep))
    rows = mine["rows"].combine_chunks()
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(rows).to_numpy())]).astype(np.int32)
    flat = pc.list_flatten(rows)
    structs = pa.StructArray.from_arrays(
        [records[f].combine_chunks().take(flat) for f in SAMPLE_FIELDS], names=list(SAMPLE_FIELDS)
    )
    samples = pa.ListArray.from_arrays(pa.array(offsets), structs)
    return pa.table({"index": mine["index"], "samples": samples})
