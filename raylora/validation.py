"""Validation during training: a checkpoint's adapter captions the fixed validation subset, scored
with CIDEr (the objective of run selection, sweeps and early stopping).

Where it runs is ``eval.validation``:

- ``inline`` (the default, and always without Ray): the training ranks caption their share of the
  validation set with the live model at the step (the recipe's ``evaluate``); training waits.
- ``async`` (Ray Train): Ray Train's asynchronous validation (``ray.train.ValidationConfig``, alpha in
  Ray 2.60). The run's :class:`Validator` actor, with ``eval.validation_cpus`` / ``eval.validation_gpus``
  of its own, captions each checkpoint the recipe reports with ``validation=True`` while training goes
  on (Ray hands them over one at a time, in report order). It loads the base model with the
  checkpoint's adapter merged, exactly as ``python -m raylora.evaluate`` loads an adapter, so
  evaluating the selected adapter on the same images gives the CIDEr logged at its step.

Either way :meth:`Scored.publish` records the score in the run folder
(:func:`raylora.runs.record_validation`), where the run's selection (:func:`raylora.runs.best_checkpoint`)
and early stopping (:func:`raylora.runs.check_early_stop`) read it; in MLflow at its step; on the
console; and, in a sweep trial, on the trial's score channel to Tune (ASHA decides at a rung on the
rung's score).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylora import runs, tracking
from raylora.config import Config, EvalConfig
from raylora.console import send
from raylora.data.records import EvalItem, read_gt, read_karpathy
from raylora.data.settings import ImageSettings
from raylora.generation import GenerationSettings, generate_captions
from raylora.metrics import cider
from raylora.sources import ModelSource, image_settings, load_model

SCORE = "score"  # Ray Train's checkpoint score: the val CIDEr once validated, UNSCORED before
# below every CIDEr (>= 0), and plain JSON: Ray keeps its checkpoint state as JSON, where -inf becomes
# null, which its ranking of the restored checkpoints cannot compare (a resumed run failed on it)
UNSCORED = -1.0


def reported_metrics(state: dict[str, Any]) -> dict[str, Any]:
    """The metrics a checkpoint is reported to Ray Train with: its train state and its score."""
    return {**state, SCORE: state.get("val_cider", UNSCORED)}


@dataclass(frozen=True)
class ValidationSet:
    """The fixed validation subset (first ``data.val_size`` images), its references and settings."""

    items: list[EvalItem]
    references: dict[int, list[str]]
    settings: ImageSettings


def validation_set(cfg: Config, model_dir: Path) -> ValidationSet | None:
    """The fixed validation subset (first data.val_size images) and its references, if configured."""
    if not cfg.data.val or cfg.eval.every_n_steps < 0:
        return None
    items = read_karpathy(cfg.data.val, cfg.data.val_root, limit=cfg.data.val_size)
    references = read_gt(cfg.data.val_gt, [i.image_id for i in items])
    missing = [i.image_id for i in items if i.image_id not in references]
    if missing:
        raise ValueError(f"{cfg.data.val_gt}: no reference captions for image ids {missing[:5]}")
    settings = image_settings(
        model_dir,
        cfg.model.template,
        cfg.model.system_message,
        cfg.data,
        max_num=cfg.eval.max_num,
        max_seq_length=cfg.model.max_seq_length,
    )
    return ValidationSet(items, references, settings)


def score_captions(validation: ValidationSet, captions: dict[int, str]) -> dict[str, float]:
    """CIDEr-D of one caption per validation image (pycocoevalcap's, without Java)."""
    return {
        "val_cider": float(cider(validation.references, {k: [c] for k, c in captions.items()})),
        "val_images": len(captions),
    }


def score_adapter(
    adapter_dir: str | Path,
    model_dir: str,
    validation: ValidationSet,
    e: EvalConfig,
    dtype: str,
    use_gpu: bool,
) -> dict[str, float]:
    """Caption the validation set with ``adapter_dir`` merged into the base (as ``raylora.evaluate``
    loads a model) and score it."""
    import torch

    from raylora.model import torch_dtype

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    s = validation.settings
    source = ModelSource(Path(model_dir), Path(adapter_dir), s.template.name, s.system_message)
    model = load_model(source, dtype=torch_dtype(dtype, device), merge=True).to(device).eval()
    gen = GenerationSettings.from_config(e)
    paths = [it.image for it in validation.items]
    captions = generate_captions(model, s.conversation_tokenizer(), s, paths, gen)
    return score_captions(validation, {it.image_id: c for it, c in zip(validation.items, captions)})


def eval_line(step: int, metrics: dict[str, float], decoding: str, seconds: float | None = None) -> str:
    took = f", {seconds:.0f}s" if seconds is not None else ""
    return (
        f"[eval] step {step}: val CIDEr {metrics['val_cider']:.3f} on {metrics['val_images']} images "
        f"({decoding}{took})"
    )


@dataclass
class Scored:
    """Where a validation's score goes besides the checkpoint folder: MLflow, the Ray gauge, the
    driver's console, a sweep trial's score channel, the run's early stop record."""

    run_dir: str
    total_steps: int
    early_stop_patience: int = 0
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    run_name: str | None = None  # the Ray gauge's run tag (None: no gauge)
    progress: Any = None  # the driver's console queue (None: printed when ``echo``, else not shown)
    scores: Any = None  # a sweep trial's score channel (a Ray queue), None outside sweeps
    echo: bool = False  # print the line (rank 0 without Ray)
    gauges: Any = field(default=None, init=False, repr=False)  # the Ray gauges, made at the first score

    def publish(self, step: int, metrics: dict[str, float], line: str) -> dict[str, Any] | None:
        """Record a checkpoint's score in the run folder, log, show and forward it; returns the
        early stop it decides, if any."""
        runs.record_validation(self.run_dir, step, metrics)
        if self.tracking_uri and self.mlflow_run_id:
            tracking.MetricLogger(self.tracking_uri, self.mlflow_run_id).log(metrics, step)
        if self.run_name is not None:
            from raylora.monitoring import TrainMetrics

            if self.gauges is None:
                self.gauges = TrainMetrics(self.run_name)
            self.gauges.record(metrics)
        if self.progress is not None:
            send(self.progress, {"line": line})
        elif self.echo:
            print(line, flush=True)
        stop = runs.check_early_stop(self.run_dir, self.early_stop_patience)
        if self.scores is not None:
            self.scores.put({"step": step, "total_steps": self.total_steps, **metrics}, timeout=60)
        return stop


class Validator:
    """The validation actor of a run (``eval.validation_cpus`` / ``eval.validation_gpus``): started
    as early as the validation set is known, it imports the libraries and builds the tokenizer while
    the data is checked and the trainer starts, so the first checkpoint's validation does not pay for
    them; then it scores each checkpoint it is
    handed (:meth:`validate`), one at a time."""

    def __init__(
        self,
        validation: ValidationSet,
        model_dir: str,
        e: EvalConfig,
        dtype: str,
        use_gpu: bool,
    ):
        import peft  # noqa: F401  (loaded now, off the training path)
        import torch  # noqa: F401
        import transformers  # noqa: F401

        self.validation, self.model_dir, self.eval, self.dtype, self.use_gpu = (
            validation,
            model_dir,
            e,
            dtype,
            use_gpu,
        )
        self.decoding = GenerationSettings.from_config(e).decoding
        validation.settings.conversation_tokenizer()

    def validate(self, checkpoint: Any, scored: Scored) -> dict[str, float]:
        """Score a Ray Train checkpoint's adapter; publish the score (``scored``)."""
        t0 = time.time()
        with checkpoint.as_directory() as d:
            step = int(runs.read_state(d)["step"])
            metrics = score_adapter(
                runs.adapter_dir(d), self.model_dir, self.validation, self.eval, self.dtype, self.use_gpu
            )
        scored.publish(step, metrics, eval_line(step, metrics, self.decoding, time.time() - t0))
        return metrics


@dataclass
class CheckpointValidator:
    """Ray Train's validation function (``ValidationConfig.fn``): a light Ray task per checkpoint
    reported with ``validation=True`` that hands it to the run's :class:`Validator`; returns the
    metrics Ray merges into the checkpoint's (its score included)."""

    actor: Any
    scored: Scored

    def __call__(self, checkpoint: Any) -> dict[str, float]:
        import ray

        metrics = ray.get(self.actor.validate.remote(checkpoint, self.scored))
        return {**metrics, SCORE: metrics["val_cider"]}


def start_validator(validation: ValidationSet, model_dir: str, cfg: Config) -> Any:
    """The run's :class:`Validator` actor, started now: as early as the driver knows the validation
    set, so its imports overlap the data check and the workers' start."""
    import ray

    e = cfg.eval
    return (
        ray.remote(Validator)
        .options(num_cpus=e.validation_cpus, num_gpus=e.validation_gpus)
        .remote(validation, model_dir, e, cfg.model.dtype, cfg.cluster.use_gpu)
    )


@contextmanager
def validation_actor(
    validation: ValidationSet, model_dir: str, cfg: Config, scored: Scored, actor: Any = None
) -> Iterator[Any]:
    """Ray Train's ValidationConfig for a run whose validation is asynchronous: the run's
    :class:`Validator` (``actor``, or one started now), stopped on exit."""
    import ray
    import ray.train

    actor = actor or start_validator(validation, model_dir, cfg)
    try:
        yield ray.train.ValidationConfig(
            fn=CheckpointValidator(actor, scored), ray_remote_kwargs={"num_cpus": 0}
        )
    finally:
        ray.kill(actor)
