"""MLflow: where runs go, checked before any work starts; experiment, run and registry helpers.

Default store: ``sqlite:///<repo>/mlflow/mlflow.db`` with artifacts in ``<repo>/mlflow/artifacts``.
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point at a server instead.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from raylora.config import REPO_ROOT, Config


def store_dir() -> Path:
    """``<repo>/mlflow`` for a source checkout, else ``./mlflow``."""
    return REPO_ROOT / "mlflow" if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd() / "mlflow"


def tracking_uri(cfg: Config | None = None) -> str:
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def check_tracking(uri: str) -> None:
    """Fail fast (before training) when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise RuntimeError(
                f"MLflow tracking server {uri} cannot be reached ({e}); start it "
                "(mlflow server --backend-store-uri sqlite:///mlflow/mlflow.db --host 127.0.0.1) "
                "or unset MLFLOW_TRACKING_URI / tracking.uri to use the embedded store"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(db.parent, os.W_OK):
            raise RuntimeError(f"MLflow store {db.parent} is not writable")


def setup(cfg: Config) -> tuple[str, str]:
    """Point mlflow at the configured store and return (tracking uri, experiment id)."""
    import mlflow

    uri = tracking_uri(cfg)
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return uri, exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # else artifacts would land in ./mlruns of the current dir
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return uri, mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_params(cfg: Config) -> None:
    """The resolved config as params (MLflow caps a value at 6000 characters)."""
    import mlflow

    params = {k: str(v)[:6000] for k, v in cfg.flat().items()}
    items = list(params.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def registered_model_name(cfg: Config) -> str:
    return cfg.tracking.registered_model or f"raylora-{cfg.tracking.dataset}-lora"


def end_run_if_active(status: str = "FINISHED") -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status=status)


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} (browse: mlflow ui --backend-store-uri {uri})"


def metric_history(run_id: str, key: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_metric_history(run_id, key)
