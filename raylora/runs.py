"""A training run's folder on shared storage: where it is, what it is, and how far it got.

A run is what its config says. Its *identity* is everything that decides the trained weights (the
model, the data and its annotation file, LoRA, the optimizer, the batch arithmetic, the seed, the
steps and the number of workers), and the run folder is named after it:
``<cluster.storage_path>/<config name>-<identity hash>``. Running the same command again finds the
same folder and resumes; changing any of those values starts a new run beside it. An explicit
``cluster.run_name`` is checked against the identity recorded in its folder (``raylora_run.json``):
a different config is an error that names the differences, never a silent reuse.

A run folder holds its checkpoints (``checkpoint_*``: ``train_state.json``, ``ds/`` and ``adapter/``)
and ``validation/step_NNNNNNN.json``, the val CIDEr of every checkpoint validated (kept after the
checkpoint is deleted: the run's whole history of scores). :func:`best_checkpoint` selects by them and
:func:`latest_checkpoint` resumes from the newest checkpoint. ``early_stop.json`` records a run that
stopped on a plateau of val CIDEr (``train.early_stop_patience``): such a run is finished.

Everything here works on local paths and on URIs (``s3://``, ``gs://``) through pyarrow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raylora.config import Config
from raylora.files import absolute, filesystem, is_remote, read_text, remove_dir, write_text

RECORD = "raylora_run.json"
# A checkpoint folder (``checkpoint_*``): rank 0's state, written last (it completes the checkpoint),
# every rank's DeepSpeed shards under ds/ (DeepSpeed's tag "ds" inside), and the PEFT adapter for the
# original base (also what a training output folder holds: ``<output>/adapter``).
STATE = "train_state.json"  # {"step", "loss", ...}
DEEPSPEED = "ds"
ADAPTER = "adapter"
VALIDATIONS = "validation"  # in the run folder: step_NNNNNNN.json = {"step", "val_cider", "val_images"}
EARLY_STOP = "early_stop.json"  # in the run folder: {"step", "best_step", "best_val_cider", "patience"}
# Config keys that do not change the trained weights: logging, checkpoint cadence, evaluation,
# where things go, how the data is decoded, how micro-batches are laid out (packing makes the same
# update), the cluster's shape beyond the number of workers.
NOT_IDENTITY = {
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "data.val",
    "data.val_gt",
    "data.val_root",
    "data.val_size",
    "data.test",
    "data.test_gt",
    "data.test_root",
    "data.strict",
    "data.decode_actors",
    "data.decode_cpus",
    "data.rejects",
    "data.max_packed_tokens",
    "train.log_every_n_steps",
    "train.checkpoint_every_n_steps",
    "train.num_to_keep",
    "train.select",
    "train.trace_data",
    "train.device_audit",
}
IDENTITY_SECTIONS = ("model.", "data.", "lora.", "train.")


def identity(cfg: Config, model_dir: str | Path) -> dict[str, Any]:
    """The config values that decide the weights, plus the resolved model folder and the annotation
    file's size and modification time (a changed file is other data)."""
    values = {
        k: v for k, v in cfg.flat().items() if k.startswith(IDENTITY_SECTIONS) and k not in NOT_IDENTITY
    }
    values["model.path"] = str(model_dir)
    values["cluster.num_workers"] = cfg.cluster.num_workers
    annotation = Path(cfg.data.train)
    if annotation.is_file():
        stat = annotation.stat()
        values["data.train_file"] = f"{stat.st_size} bytes, modified {stat.st_mtime_ns}"
    return values


def identity_hash(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_dir(cfg: Config, values: dict[str, Any]) -> str:
    """``<storage>/<cluster.run_name>``, or ``<storage>/<config name>-<identity hash>`` by default."""
    name = cfg.cluster.run_name or f"{cfg.name}-{identity_hash(values)}"
    return f"{absolute(cfg.cluster.storage_path).rstrip('/')}/{name}"


def check_claim(directory: str, values: dict[str, Any]) -> None:
    """An error when ``directory`` records a run of another config; writes nothing (a run's folder
    is claimed by :func:`claim` only once its first step has run)."""
    recorded = read_text(f"{directory}/{RECORD}")
    if recorded is None:
        return
    before = json.loads(recorded)["identity"]
    now = json.loads(json.dumps(values, default=str))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in changed[:6])
        raise ValueError(
            f"{directory} holds a run of another config ({shown}); resume it with its own config, or "
            "start a new run: another cluster.run_name, or none (runs are then named after their config)"
        )


def claim(directory: str, values: dict[str, Any]) -> None:
    """Record the run's identity in its folder (checked against the one recorded there, if any)."""
    check_claim(directory, values)
    if read_text(f"{directory}/{RECORD}") is None:
        write_text(f"{directory}/{RECORD}", json.dumps({"identity": values}, indent=2, default=str))


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint of a run: its step, where it is, its val CIDEr if validated."""

    step: int
    path: str  # a local path, or a URI for remote storage
    val_cider: float | None


def checkpoints(directory: str, world_size: int) -> list[CheckpointInfo]:
    """The *complete* checkpoints under ``directory`` (local path or URI), by step.

    Complete means rank 0's train_state.json plus every rank's DeepSpeed shard, so a checkpoint
    cut by a crash mid-upload, or one Ray had not registered yet when the driver died, is judged
    by its files rather than by Ray's bookkeeping.
    """
    try:
        fs, base = filesystem(directory)
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
    except (OSError, ValueError):
        return []
    scores = dict(validations(directory))
    found = []
    for info in infos:
        if info.type != pafs.FileType.Directory or not Path(info.path).name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE}") as f:
                step = int(json.loads(f.read())["step"])
            shards = f"{info.path}/{DEEPSPEED}/{DEEPSPEED}"
            files = [i.base_name for i in fs.get_file_info(pafs.FileSelector(shards, allow_not_found=True))]
        except (OSError, KeyError, ValueError):
            continue
        shards = [n for n in files if n.endswith("optim_states.pt")]
        if len(shards) < world_size and "mp_rank_00_model_states.pt" not in files:
            continue
        where = f"{directory.split('://')[0]}://{info.path}" if is_remote(directory) else info.path
        found.append(CheckpointInfo(step, where, scores.get(step)))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(directory: str, world_size: int) -> tuple[int, str | None]:
    """(step, uri) of the newest complete checkpoint under ``directory``; (0, None) if none."""
    found = checkpoints(directory, world_size)
    return (found[-1].step, found[-1].path) if found else (0, None)


def best_of(found: list[CheckpointInfo]) -> CheckpointInfo | None:
    """The validated checkpoint with the highest val CIDEr (the earliest of equal ones); None if
    none was validated."""
    scored = [c for c in found if c.val_cider is not None]
    return max(scored, key=lambda c: (c.val_cider, -c.step)) if scored else None


def best_checkpoint(directory: str, world_size: int) -> CheckpointInfo | None:
    """:func:`best_of` the run's complete checkpoints."""
    return best_of(checkpoints(directory, world_size))


def choose(found: list[CheckpointInfo], select: str) -> CheckpointInfo | None:
    """``train.select`` among ``found`` (by step): the best validated checkpoint (the latest when none
    was validated), or the latest; None if there is none."""
    if not found:
        return None
    return (best_of(found) if select == "best" else None) or found[-1]


def record_validation(directory: str, step: int, metrics: dict[str, Any]) -> None:
    """The val CIDEr of the run's checkpoint at ``step``, once it is scored."""
    write_text(f"{directory}/{VALIDATIONS}/step_{step:07d}.json", json.dumps({"step": step, **metrics}))


def validations(directory: str) -> list[tuple[int, float]]:
    """(step, val CIDEr) of every validation of the run, by step."""
    try:
        fs, base = filesystem(directory)
        infos = fs.get_file_info(pafs.FileSelector(f"{base}/{VALIDATIONS}", allow_not_found=True))
    except (OSError, ValueError):
        return []
    found = []
    for info in infos:
        if not info.base_name.startswith("step_"):
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                record = json.loads(f.read())
            found.append((int(record["step"]), float(record["val_cider"])))
        except (OSError, KeyError, ValueError):
            continue
    return sorted(found)


def plateau(scores: list[tuple[int, float]], patience: int) -> dict[str, Any] | None:
    """The early stop of ``train.early_stop_patience``: when the last ``patience`` evaluations (of
    ``scores``, (step, val CIDEr) by step) are none better than the best before them, a record of it."""
    if patience <= 0 or len(scores) <= patience:
        return None
    best_step, best = max(scores[:-patience], key=lambda s: (s[1], -s[0]))
    if any(value > best for _, value in scores[-patience:]):
        return None
    return {"step": scores[-1][0], "best_step": best_step, "best_val_cider": best, "patience": patience}


def check_early_stop(directory: str, patience: int) -> dict[str, Any] | None:
    """After a validation: record the run's early stop in its folder when its scores plateaued."""
    stop = plateau(validations(directory), patience)
    if stop is not None and early_stop(directory) is None:
        write_text(f"{directory}/{EARLY_STOP}", json.dumps(stop))
    return stop


def early_stop(directory: str) -> dict[str, Any] | None:
    """The run's early stop record, if it stopped on a plateau."""
    text = read_text(f"{directory}/{EARLY_STOP}")
    return json.loads(text) if text else None


def prune(directory: str, world_size: int, keep: int) -> None:
    """Delete the complete checkpoints beyond the ``keep`` best by val CIDEr (unvalidated ones rank
    lowest, then older before newer), never the latest: what Ray Train's CheckpointConfig does with
    a score attribute, for runs without Ray."""
    found = checkpoints(directory, world_size)
    if len(found) <= keep:
        return
    ranked = sorted(found, key=lambda c: (c.val_cider is not None, c.val_cider or 0.0, c.step))
    for c in ranked[:-keep]:
        if c is not found[-1]:
            remove_dir(c.path)


def read_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """A local checkpoint folder's :data:`STATE` (step, loss, scores)."""
    return json.loads(Path(checkpoint_dir, STATE).read_text())


def write_state(checkpoint_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Rank 0's :data:`STATE`, the file that completes a checkpoint: write it after every shard."""
    Path(checkpoint_dir, STATE).write_text(json.dumps(metrics))


def deepspeed_dir(checkpoint_dir: str | Path) -> str:
    """Where every rank's DeepSpeed shards go (``engine.save_checkpoint(..., tag=DEEPSPEED)``)."""
    return str(Path(checkpoint_dir, DEEPSPEED))


def adapter_dir(folder: str | Path) -> Path:
    """The PEFT adapter of a checkpoint folder or of a training output folder."""
    return Path(folder, ADAPTER)
