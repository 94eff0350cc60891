"""What a run shows outside raylora's own output: the Ray dashboard and the cluster's metrics.

- Ray Train's state tracking is on for every training run raylora starts (``raylora.train`` and
  every sweep trial), so the dashboard's Train view lists the run, its attempts, its workers and
  their status (Ray turns it on with ``RAY_TRAIN_ENABLE_STATE_TRACKING=1`` in the process that
  fits the trainer; an explicit value in the environment is kept).
- The training numbers a user watches are Ray metrics (``ray.util.metrics``), set by rank 0 from
  the same numbers as the step line and MLflow: Prometheus scrapes them from every node's metrics
  agent beside Ray's own (GPU use, memory), with the prefix ``ray_``: ``ray_raylora_train_loss``.
"""

from __future__ import annotations

import os
from typing import Any

STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"

# the recipe's metric (MLflow name) -> (Ray metric name, description); each tagged with the run name
METRICS: dict[str, tuple[str, str]] = {
    "step": ("raylora_train_step", "optimizer steps done"),
    "loss": ("raylora_train_loss", "mean cross-entropy per label token over the last log window"),
    "samples_per_s": ("raylora_train_samples_per_s", "training samples (captions) per second, all ranks"),
    "tokens_per_s": ("raylora_train_tokens_per_s", "training tokens per second, all ranks"),
    "val_cider": ("raylora_val_cider", "CIDEr on the fixed validation subset"),
}


def state_tracking_env() -> dict[str, str]:
    """The environment that turns Ray Train's state tracking on (or keeps the environment's value)."""
    return {STATE_TRACKING: os.environ.get(STATE_TRACKING) or "1"}


def enable_train_state_tracking() -> None:
    """Turn Ray Train's state tracking on in this process, before a TorchTrainer is built: Ray reads
    the variable where ``fit`` is called (the driver, or a sweep trial) to add its state callback."""
    os.environ.update(state_tracking_env())


class TrainMetrics:
    """The run's Ray gauges (:data:`METRICS`), tagged ``run=<Train run name>``; one per run, on rank 0."""

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.gauges: dict[str, Any] = {}
        for key, (name, description) in METRICS.items():
            gauge = Gauge(name, description=description, tag_keys=("run",))
            gauge.set_default_tags({"run": run})
            self.gauges[key] = gauge

    def record(self, metrics: dict[str, float]) -> None:
        """Set the gauges whose metric is in ``metrics`` (the others keep their last value)."""
        for key, value in metrics.items():
            if key in self.gauges and value is not None:
                self.gauges[key].set(float(value))
