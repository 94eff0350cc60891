"""From planned micro-batches to tensors: decode, preprocess, tokenize and lay out, on Ray Data or in-process.

:class:`MicroBatchBuilder` turns one planned micro-batch (its units) into named numpy columns. Each
unit becomes a run of tokens: a record as it is, or (``group_by_image``) the shared prefix once
followed by every caption, each caption with the position ids of its own row. Units are laid
out one per padded row, or packed into rows of at most ``max_packed_tokens`` (first-fit decreasing).
Columns:

* ``pixel_values`` (each image once, in the order its tokens appear, as the model family's
  preprocessing leaves it) and, for families with patch grids, ``image_grid_thw``;
* ``position_ids`` (rows, the family's position axes, L);
* ``input_ids``, ``attention_mask`` (1 = token, 0 = padding), ``segment_ids`` (the
  unit of each token within its row, -1 for padding) and ``branch_ids`` (0 for a record or a shared
  prefix, k for the k-th caption of a group): the attention mask is built on the device from them;
* ``logit_mask`` (the positions whose logits predict a label), ``target_logits`` (for each label
  token, the index of its predicting position among them) and ``target_ids``: the loss is the
  summed cross-entropy of ``logits[target_logits]`` against ``target_ids``;
* ``samples``, ``record_index`` (the records it holds: what a data trace records), ``label_tokens``,
  ``step_label_tokens`` (of the whole optimizer step, from the plan),
  ``structured`` (1 when a row holds several units or a shared prefix: a 2D padding mask is not
  enough) and ``index`` (the micro-batch's global position in the plan).

:func:`rank_dataset` runs the builder in a Ray Data actor pool over one rank's micro-batches, in
plan order (``preserve_order``); :func:`iter_rank_batches` reads them on the training worker with
``iter_torch_batches`` and fails loudly if a micro-batch is missing or out of order.
:func:`iter_microbatches` is the same builder without Ray; :func:`iter_local_batches` gives one
rank the same tensors as :func:`iter_rank_batches`, built in-process (the recipe under ``torchrun``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raylora.console import verbose
from raylora.data.plan import microbatch_records
from raylora.data.records import DataError
from raylora.data.settings import ImageSettings
from raylora.data.templates import IGNORE_INDEX
from raylora.families import ImageInput, image_columns

# ray and torch are imported inside the functions that use them: the data checks start fast without them.


@dataclass
class EncodedUnit:
    """One unit's tokens as laid out in its sequence (positions relative to the unit's start)."""

    images: list[ImageInput]
    input_ids: np.ndarray
    position_ids: np.ndarray  # (position axes, L): the family's position ids of each token
    branch_ids: np.ndarray
    predictors: np.ndarray  # for each label token, the position whose logit predicts it
    targets: np.ndarray  # the label tokens
    samples: int
    records: list[int]  # the records' indices in the validated records table


class MicroBatchBuilder:
    """Planned micro-batch (its units of records) -> named numpy columns, one row each.

    Callable for ``map_batches`` (``batch_format="pyarrow"``); holds one tokenizer per actor, so a
    fast tokenizer is never shared across threads.
    """

    def __init__(self, settings: ImageSettings, max_packed_tokens: int = 0):
        self.settings = settings
        self.max_packed_tokens = max_packed_tokens
        self.conv_tok = settings.conversation_tokenizer()
        pad = self.conv_tok.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def encode_unit(self, unit: list[dict[str, Any]]) -> EncodedUnit:
        """Images (decoded once) and tokens of a unit: a record, or a shared prefix and its captions.

        Every token gets the position ids it has in its own row (the family's, e.g. multimodal
        rotary positions): a grouped caption's are those of the prefix + that caption alone."""
        first = unit[0]
        images = [self.settings.image_input(p) for p in first["images"]]
        got = [im.units for im in images]
        for s in unit:
            if got != list(s["tiles"]):
                raise DataError(
                    f"{s['source']}:{s['line']}: image changed since validation ({got} image units, "
                    f"expected {list(s['tiles'])}); run the job again to re-validate"
                )
        # tokenized once by the data check: only the images' context runs are inserted here
        rows = [self.conv_tok.expand(s["input_ids"], s["labels"], s["image_at"], got) for s in unit]
        family = self.settings.family
        if len(unit) == 1:
            ids, labels = rows[0]
            supervised = np.nonzero(labels[1:] != IGNORE_INDEX)[0] + 1
            zeros = np.zeros(len(ids), np.int64)
            return EncodedUnit(
                images,
                ids,
                family.positions(ids, images),
                zeros,
                supervised - 1,
                labels[supervised],
                1,
                [first["record"]],
            )
        p = int(first["prefix_length"])
        prefix = rows[0][0][:p]
        row_positions = [family.positions(row_ids, images) for row_ids, _ in rows]
        ids, pos, branch, predictors, targets = (
            [prefix],
            [row_positions[0][:, :p]],
            [np.zeros(p, np.int64)],
            [],
            [],
        )
        offset = p
        for k, ((row_ids, row_labels), s) in enumerate(zip(rows, unit), 1):
            if not np.array_equal(row_ids[:p], prefix) or (row_labels[:p] != IGNORE_INDEX).any():
                raise DataError(
                    f"{s['source']}:{s['line']}: grouped with {first['source']}:{first['line']} but its "
                    "prompt tokens differ; train with data.group_by_image=false or fix the rows"
                )
            answer, labels = row_ids[p:], row_labels[p:]
            supervised = np.nonzero(labels != IGNORE_INDEX)[0]
            ids.append(answer)
            pos.append(row_positions[k - 1][:, p:])  # each caption gets exactly its own row's positions
            branch.append(np.full(len(answer), k, np.int64))
            predictors.append(np.where(supervised == 0, p - 1, offset + supervised - 1))
            targets.append(labels[supervised])
            offset += len(answer)
        cat = np.concatenate
        records = [s["record"] for s in unit]
        return EncodedUnit(
            images, cat(ids), cat(pos, axis=1), cat(branch), cat(predictors), cat(targets), len(unit), records
        )

    def pack(self, units: list[EncodedUnit]) -> list[list[int]]:
        """Rows of unit indices: one unit per row, or first-fit decreasing into ``max_packed_tokens``."""
        if self.max_packed_tokens <= 0:
            return [[i] for i in range(len(units))]
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(units)), key=lambda i: -len(units[i].input_ids)):
            n = len(units[i].input_ids)
            if n > self.max_packed_tokens:
                raise ValueError(
                    f"a sequence of {n} tokens does not fit data.max_packed_tokens={self.max_packed_tokens}; "
                    "raise it (at least the longest sequence: see `data check`)"
                )
            fit = next((r for r, free in enumerate(room) if free >= n), None)
            if fit is None:
                rows.append([i])
                room.append(self.max_packed_tokens - n)
            else:
                rows[fit].append(i)
                room[fit] -= n
        return rows

    def build(self, units: list[list[dict[str, Any]]], step_label_tokens: int = 0) -> dict[str, np.ndarray]:
        """One micro-batch from its units' records (``images``, ``tiles``, ``conversations``, ...)."""
        encoded = [self.encode_unit(u) for u in units]
        layout = self.pack(encoded)
        width = max(sum(len(encoded[i].input_ids) for i in row) for row in layout)
        shape = (len(layout), width)
        axes = self.settings.family.position_axes
        cols = {
            "input_ids": np.full(shape, self.pad_id, np.int64),
            "position_ids": np.zeros((len(layout), axes, width), np.int64),
            "attention_mask": np.zeros(shape, np.int64),
            "segment_ids": np.full(shape, -1, np.int64),
            "branch_ids": np.full(shape, -1, np.int64),
        }
        images, predictors, targets = [], [], []
        for r, row in enumerate(layout):
            at = 0
            for segment, i in enumerate(row):
                u = encoded[i]
                span = slice(at, at + len(u.input_ids))
                cols["input_ids"][r, span] = u.input_ids
                cols["position_ids"][r, :, span] = u.position_ids
                cols["attention_mask"][r, span] = 1
                cols["segment_ids"][r, span] = segment
                cols["branch_ids"][r, span] = u.branch_ids
                images += u.images  # image tokens and pixels stay in the same order
                predictors.append(r * width + at + u.predictors)
                targets.append(u.targets)
                at += len(u.input_ids)
        flat_predictors = np.concatenate(predictors)
        kept = np.unique(flat_predictors)  # logits are computed once per predicting position
        logit_mask = np.zeros(shape, bool)
        logit_mask.flat[kept] = True
        target_ids = np.concatenate(targets)
        structured = any(len(row) > 1 for row in layout) or bool((cols["branch_ids"] > 0).any())
        return {
            **cols,
            **image_columns(images),
            "logit_mask": logit_mask,
            "target_logits": np.searchsorted(kept, flat_predictors).astype(np.int64),
            "target_ids": target_ids.astype(np.int64),
            "samples": np.asarray(sum(u.samples for u in encoded), np.int64),
            "record_index": np.asarray([r for u in encoded for r in u.records], np.int64),
            "label_tokens": np.asarray(len(target_ids), np.int64),
            "step_label_tokens": np.asarray(step_label_tokens or len(target_ids), np.int64),
            "structured": np.asarray(int(structured), np.int64),
        }

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        (row,) = batch.to_pylist()  # batch_size=1: one planned micro-batch
        built = self.build(row["units"], row["step_label_tokens"])
        out = {k: v[np.newaxis] for k, v in built.items()}  # a batch of one row
        out["index"] = np.asarray([row["index"]], dtype=np.int64)
        return out


def iter_microbatches(
    records: pa.Table, planned: pa.Table, settings: ImageSettings, max_packed_tokens: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """The plain (no Ray) path: every planned micro-batch, in order, built in this process."""
    builder = MicroBatchBuilder(settings, max_packed_tokens)
    for row in microbatch_records(records, planned).to_pylist():
        yield builder.build(row["units"], row["step_label_tokens"])


def iter_local_batches(
    records: pa.Table,
    planned: pa.Table,
    rank: int,
    world_size: int,
    first_index: int,
    settings: ImageSettings,
    max_packed_tokens: int = 0,
) -> Iterator[dict[str, Any]]:
    """Rank ``rank``'s micro-batches from ``first_index`` on as torch tensors, built in this process:
    what :func:`iter_rank_batches` yields from the Ray Data actor pool, column for column."""
    import torch

    mine = microbatch_records(records, planned, rank=rank, world_size=world_size, first_index=first_index)
    builder = MicroBatchBuilder(settings, max_packed_tokens)
    for row in mine.to_pylist():
        built = builder.build(row["units"], row["step_label_tokens"])
        built["index"] = np.asarray(row["index"], dtype=np.int64)
        yield {k: torch.from_numpy(np.asarray(v)) for k, v in built.items()}


def build_microbatch(
    records: pa.Table, units: list[list[int]], settings: ImageSettings, max_packed_tokens: int = 0
) -> dict[str, np.ndarray]:
    """One micro-batch of the given units (each a list of record indices), outside any plan: what
    benchmarks and tests build to compare layouts of the same records."""
    planned = pa.table(
        {
            "index": [0],
            "epoch": [0],
            "rows": pa.array([units], pa.list_(pa.list_(pa.int64()))),
            "label_tokens": [0],
            "step_label_tokens": [0],
        }
    )
    return next(iter_microbatches(records, planned, settings, max_packed_tokens))


def rank_dataset(
    records: pa.Table,
    planned: pa.Table,
    rank: int,
    world_size: int,
    first_index: int,
    settings: ImageSettings,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    max_packed_tokens: int = 0,
):
    """A Ray Dataset of rank ``rank``'s micro-batches from global index ``first_index`` on, in plan
    order, decoded and tokenized by an actor pool of its own (created inside the training worker)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    quiet_progress()
    mine = microbatch_records(records, planned, rank=rank, world_size=world_size, first_index=first_index)
    # from_items, not from_arrow: from_arrow runs a 1-CPU metadata task, which waits forever when the
    # training workers and decode actors hold every CPU of the cluster (they may, by design)
    items = mine.to_pylist()
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64 * actors)))
    ds = ds.map_batches(
        MicroBatchBuilder,
        fn_constructor_kwargs={"settings": settings, "max_packed_tokens": max_packed_tokens},
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    )
    ds.context.execution_options.preserve_order = True  # this dataset only: plan order, checked on arrival
    return ds


def iter_rank_batches(dataset: Any, first_index: int, world_size: int) -> Iterator[dict[str, Any]]:
    """A rank's micro-batches as torch tensors, checking that each arrives at its planned index."""
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class OneMicroBatch(NumpyBatchCollateFn):
        """A batch of one row (one micro-batch) -> its columns as tensors, without copying: the
        arrays are read-only views of the object store, and training never writes to its inputs."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return {k: torch.from_numpy(np.asarray(v[0])) for k, v in batch.items()}

    # torch warns once about sharing a read-only array; these are never written (the collate runs in
    # Ray's threads, so the filter is set for the process rather than around the call)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

    expected = first_index
    for batch in dataset.iter_torch_batches(batch_size=1, collate_fn=OneMicroBatch(), prefetch_batches=2):
        index = int(batch["index"])
        if index != expected:
            raise RuntimeError(
                f"micro-batch {index} arrived where the plan expects {expected}: the data stream is out "
                "of order or lost a batch"
            )
        expected += world_size
        yield batch


def to_torch(batch: dict[str, np.ndarray], device: Any = "cpu") -> dict[str, Any]:
    """numpy micro-batch -> torch tensors on ``device`` (tiles stay uint8; normalise on device)."""
    import torch

    return {k: torch.as_tensor(np.array(v)).to(device, non_blocking=True) for k, v in batch.items()}


def quiet_progress() -> None:
    """Ray Data's per-operator progress bars flood non-interactive logs; training prints its own.
    Without ``--verbose`` its console notices go too ("Progress bars disabled", "execution finished
    in ..."): warnings and errors of the ``ray.data`` logger below ERROR stay in its log file."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data's console handler; its file stays
        if getattr(handler, "name", None) == "console":
            handler.setLevel(logging.ERROR)
