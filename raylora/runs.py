"""A training run's folder on shared storage: where it is, what it is, and how far it got.

A run is what its config says. Its *identity* is everything that decides the trained weights (the
model, the data and its annotation file, LoRA, the optimizer, the batch arithmetic, the seed, the
steps and the number of workers), and the run folder is named after it:
``<cluster.storage_path>/<config name>-<identity hash>``. Running the same command again finds the
same folder and resumes; changing any of those values starts a new run beside it. An explicit
``cluster.run_name`` is checked against the identity recorded in its folder (``raylora_run.json``):
a different config is an error that names the differences, never a silent reuse.

Everything here works on local paths and on URIs (``s3://``, ``gs://``) through pyarrow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raylora.config import Config
from raylora.files import absolute, is_remote, read_text, write_text

RECORD = "raylora_run.json"
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


def latest_checkpoint(directory: str, world_size: int) -> tuple[int, str | None]:
    """(step, uri) of the newest *complete* checkpoint under ``directory`` (local path or URI).

    Complete means rank 0's train_state.json plus every rank's DeepSpeed shard, so a checkpoint
    cut by a crash mid-upload, or one Ray had not registered yet when the driver died, is judged
    by its files rather than by Ray's bookkeeping.
    """
    try:
        fs, base = pafs.FileSystem.from_uri(directory)
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
    except (OSError, ValueError):
        return 0, None
    best: tuple[int, str | None] = (0, None)
    for info in infos:
        if info.type != pafs.FileType.Directory or not Path(info.path).name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/train_state.json") as f:
                step = int(json.loads(f.read())["step"])
            files = [
                i.base_name
                for i in fs.get_file_info(pafs.FileSelector(f"{info.path}/ds/ds", allow_not_found=True))
            ]
        except (OSError, KeyError, ValueError):
            continue
        shards = [n for n in files if n.endswith("optim_states.pt")]
        if len(shards) < world_size and "mp_rank_00_model_states.pt" not in files:
            continue
        if step > best[0]:
            where = f"{directory.split('://')[0]}://{info.path}" if is_remote(directory) else info.path
            best = (step, where)
    return best
