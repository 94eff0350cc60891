"""MLflow tracking: the store (checked before any work starts), experiments, runs, metrics, artifacts.

Every MLflow client and run of raylora is made here (the model registry is in ``registry``).
Default store: ``sqlite:///<repo>/mlflow/mlflow.db`` with artifacts in ``<repo>/mlflow/artifacts``;
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point at a server instead. mlflow is imported inside the
functions: it costs seconds, and many commands (``--help``, ``data check``) never need it.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raylora.config import REPO_ROOT, Config
from raylora.files import atomic_dir, redact


def store_dir() -> Path:
    """``<repo>/mlflow`` for a source checkout, else ``./mlflow``."""
    return REPO_ROOT / "mlflow" if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd() / "mlflow"


def tracking_uri(cfg: Config | None = None) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def current_uri() -> str:
    """mlflow's tracking URI if this process set one, else raylora's default store."""
    import mlflow

    return mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else tracking_uri()


def health_request(uri: str) -> urllib.request.Request:
    """GET ``<server>/health``. A ``user:password@`` in ``uri`` (which MLflow's client accepts) becomes
    a basic-auth header: urllib would take it for part of the host name."""
    parts = urllib.parse.urlsplit(uri)
    parts = parts._replace(path=parts.path.rstrip("/") + "/health")
    headers = {}
    if parts.username is not None:
        user, password = (urllib.parse.unquote(v or "") for v in (parts.username, parts.password))
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    return urllib.request.Request(urllib.parse.urlunsplit(parts), headers=headers)


def check_tracking(uri: str) -> None:
    """Fail fast (before training) when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(health_request(uri), timeout=5) as r:
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:
            raise RuntimeError(
                f"MLflow tracking server {redact(uri)} cannot be reached ({redact(str(e))}); start it "
                "(mlflow server --backend-store-uri sqlite:///mlflow/mlflow.db --host 127.0.0.1) "
                "or unset MLFLOW_TRACKING_URI / tracking.uri to use the embedded store"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(db.parent, os.W_OK):
            raise RuntimeError(f"MLflow store {db.parent} is not writable")


def client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` for ``uri`` (default :func:`current_uri`), tracking and registry alike."""
    from mlflow.tracking import MlflowClient

    uri = uri or current_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def setup(cfg: Config) -> tuple[str, str]:
    """Point mlflow at the configured store; (tracking uri, experiment id), creating the experiment."""
    import mlflow

    uri = tracking_uri(cfg)
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    wanted = cfg.tracking.artifact_location
    if exp is not None:
        if wanted and exp.artifact_location.rstrip("/") != wanted.rstrip("/"):
            raise ValueError(
                f"tracking.artifact_location={redact(wanted)}, but experiment {cfg.tracking.experiment!r} keeps its "
                f"artifacts in {redact(exp.artifact_location)} (set when it was created); name another "
                "experiment (tracking.experiment=...) for the new location"
            )
        return uri, exp.experiment_id
    artifact_location = wanted
    # beside a sqlite store by default: else artifacts would land in ./mlruns of the current dir
    if not wanted and uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return uri, mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)


def create_run(
    experiment_id: str,
    name: str,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    uri: str | None = None,
) -> str:
    """A new RUNNING run with ``tags`` and ``params`` (values cut at MLflow's 6000 characters).

    Every value goes through :func:`raylora.files.redact`: a URI's password and secret query
    parameters (a tracking URI, a cluster address, a storage path) never reach the store.
    """
    from mlflow.entities import Param

    c = client(uri)
    all_tags = {k: redact(str(v)) for k, v in (tags or {}).items() if v is not None}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_id = c.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id
    items = [Param(k, redact(str(v))[:6000]) for k, v in (params or {}).items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])
    return run_id


def reopen_run(run_id: str, uri: str | None = None) -> bool:
    """Mark an existing run RUNNING again (a resumed job); False when the store does not know it."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_run(run_id)
    except MlflowException:
        return False
    c.set_terminated(run_id, "RUNNING")
    return True


def set_tags(run_id: str, tags: dict[str, str], uri: str | None = None) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, value)


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """FINISHED, FAILED or KILLED (runs opened by workers or trials would stay RUNNING otherwise)."""
    client(uri).set_terminated(run_id, status)


@contextmanager
def ends_on_error(run_id: str, uri: str | None = None) -> Iterator[None]:
    """The run ends KILLED when the body is interrupted (Ctrl-C, SIGTERM: raylora.console turns it
    into KeyboardInterrupt) and FAILED on any other exception, which is re-raised; a run still
    RUNNING after an error would look alive forever."""
    try:
        yield
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"
        try:
            end_run(run_id, status, uri)
        except Exception:  # the store is gone too: the original error is what the user needs
            pass
        raise


@contextmanager
def active_run(run_id: str, uri: str) -> Iterator[None]:
    """``run_id`` as mlflow's active run in this process, for the fluent APIs that log into the active
    run (``mlflow.pyfunc.log_model``); the run is FINISHED on exit, FAILED on an exception."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        yield


class MetricLogger:
    """Logs metric dicts at an optimizer step to one run (rank 0 of a training job holds one).

    A metric is logged once per step: after a restart from a checkpoint the steps trained again
    (between the checkpoint and the crash) are not logged a second time. Restarts are exact, so
    the values they would log are the ones already there.
    """

    def __init__(self, uri: str, run_id: str):
        self.run_id = run_id
        self._client = client(uri)
        self._logged_up_to: dict[str, int] = {}  # per metric: the last step the run already holds

    def _last_logged_step(self, key: str) -> int:
        if key not in self._logged_up_to:
            history = self._client.get_metric_history(self.run_id, key)
            self._logged_up_to[key] = max((m.step for m in history), default=-1)
        return self._logged_up_to[key]

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._last_logged_step(k)]
        if new:
            self._client.log_batch(self.run_id, metrics=new)
        for metric in new:
            self._logged_up_to[metric.key] = step


def log_artifacts(
    run_id: str, local_path: str | Path, artifact_path: str | None = None, uri: str | None = None
) -> None:
    """A file or a folder's contents into the run's artifacts (under ``artifact_path``)."""
    c = client(uri)
    if Path(local_path).is_dir():
        c.log_artifacts(run_id, str(local_path), artifact_path)
    else:
        c.log_artifact(run_id, str(local_path), artifact_path)


def artifact_uri(run_id: str, artifact_path: str, uri: str | None = None) -> str:
    """The storage URI of a run's artifact folder (what a model version's ``source`` must be)."""
    run = client(uri).get_run(run_id)
    return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"


def download(artifact: str, target: Path, uri: str) -> Path:
    """Download the artifact folder ``artifact`` (any MLflow artifact URI) into ``target``, once."""
    import mlflow

    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=target.parent)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=scratch, tracking_uri=uri)
        )
        if local.is_file():
            raise ValueError(f"{artifact} is a single file, expected a model or adapter folder")
        with atomic_dir(target) as tmp:
            os.rmdir(tmp)
            os.replace(local, tmp)
    except FileExistsError:
        if not target.is_dir():  # else another process downloaded it meanwhile
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[Any]:
    return client(uri).get_metric_history(run_id, key)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def registered_model_name(cfg: Config) -> str:
    return cfg.tracking.registered_model or f"raylora-{cfg.tracking.dataset}-lora"


def is_server(uri: str) -> bool:
    """True for a tracking server (``http(s)://``), False for a local store (SQLite, files)."""
    return uri.startswith(("http://", "https://"))


def run_web_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page on an MLflow tracking server (credentials redacted); None for a local store."""
    if is_server(uri):
        return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def ui_command(uri: str) -> str:
    """The command that serves a local store's runs in a browser (credentials redacted)."""
    return f"mlflow ui --backend-store-uri {redact(uri)}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's web page, or its id and how to browse a local store."""
    return run_web_url(uri, experiment_id, run_id) or f"run {run_id} (browse: {ui_command(uri)})"
