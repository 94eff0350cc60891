"""From planned micro-batches to tensors: decode, tile, tokenize and collate, on Ray Data or in-process.

:class:`MicroBatchBuilder` turns one planned micro-batch (its records) into named numpy columns:
``pixel_values`` (uint8 tiles of all samples, concatenated along dim 0), ``num_tiles`` (per sample),
right-padded ``input_ids`` / ``labels`` / ``attention_mask``, and ``index`` (the micro-batch's global
position in the plan). :func:`rank_dataset` runs it in a Ray Data actor pool over one rank's
micro-batches, in plan order (``preserve_order``); :func:`iter_rank_batches` reads them on the
training worker with ``iter_torch_batches`` and fails loudly if a micro-batch is missing or out
of order. :func:`iter_microbatches` is the same builder without Ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from raylora.data.plan import microbatch_records
from raylora.data.records import DataError
from raylora.data.settings import ImageSettings
from raylora.data.templates import IGNORE_INDEX

# ray and torch are imported inside the functions that use them: the data checks start fast without them.


def pad_right(seqs: list[np.ndarray], value: int) -> np.ndarray:
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


class MicroBatchBuilder:
    """Planned micro-batch rows (records of each sample) -> named numpy columns, one row each.

    Callable for ``map_batches`` (``batch_format="pyarrow"``); holds one tokenizer per actor, so a
    fast tokenizer is never shared across threads.
    """

    def __init__(self, settings: ImageSettings):
        self.settings = settings
        self.conv_tok = settings.conversation_tokenizer()
        pad = self.conv_tok.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def build(self, samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """One micro-batch from its samples' records (``images``, ``tiles``, ``conversations``, ...)."""
        tiles, ids, labels, counts = [], [], [], []
        for s in samples:
            per_image = [self.settings.tile(p) for p in s["images"]]
            got = [len(t) for t in per_image]
            if got != list(s["tiles"]):
                raise DataError(
                    f"{s['source']}:{s['line']}: image changed since validation ({got} tiles, expected "
                    f"{list(s['tiles'])}); run the job again to re-validate"
                )
            i, lab = self.conv_tok.encode_conversation(json.loads(s["conversations"]), got)
            tiles.extend(per_image)
            counts.append(sum(got))
            ids.append(i)
            labels.append(lab)
        return {
            "pixel_values": np.concatenate(tiles, axis=0),
            "num_tiles": np.asarray(counts, dtype=np.int64),
            "input_ids": pad_right(ids, self.pad_id),
            "labels": pad_right(labels, IGNORE_INDEX),
            "attention_mask": pad_right([np.ones(len(i), dtype=np.int64) for i in ids], 0),
        }

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        (row,) = batch.to_pylist()  # batch_size=1: one planned micro-batch
        built = self.build(row["samples"])
        out = {k: v[np.newaxis] for k, v in built.items()}  # a batch of one row
        out["index"] = np.asarray([row["index"]], dtype=np.int64)
        return out


def iter_microbatches(
    records: pa.Table, planned: pa.Table, settings: ImageSettings
) -> Iterator[dict[str, np.ndarray]]:
    """The plain (no Ray) path: every planned micro-batch, in order, built in this process."""
    builder = MicroBatchBuilder(settings)
    for row in microbatch_records(records, planned).to_pylist():
        yield builder.build(row["samples"])


def rank_dataset(
    records: pa.Table,
    planned: pa.Table,
    rank: int,
    world_size: int,
    first_index: int,
    settings: ImageSettings,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
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
        fn_constructor_kwargs={"settings": settings},
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
        """A batch of one row (one micro-batch) -> its columns as tensors."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return {k: torch.as_tensor(np.array(v[0])) for k, v in batch.items()}

    expected = first_index
    for batch in dataset.iter_torch_batches(batch_size=1, collate_fn=OneMicroBatch(), prefetch_batches=2):
        index = int(batch.pop("index"))
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
    """Ray Data's per-operator progress bars flood non-interactive logs; training prints its own."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
