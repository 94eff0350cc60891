"""What the Ray dashboard and the cluster's metrics show of a run: the Train view lists the run, its
attempt and workers (Ray Train's state tracking, read through the dashboard's API with the token),
the Data view its datasets, and the training numbers are Ray metrics in the Prometheus export."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from raylora.config import Config
from raylora.monitoring import METRICS, STATE_TRACKING, TrainMetrics


def _auth_token() -> str:
    """The token as a user gets it: ``ray get-auth-token`` (what the dashboard line says)."""
    out = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "get-auth-token"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip()


def _get(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        body = r.read().decode()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body


def _metrics_export() -> str:
    """This node's Prometheus export (the metrics agent's /metrics)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return _get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics")


def _samples(text: str, name: str, run: str) -> list[float]:
    """The values of Ray metric ``name`` (exported as ``ray_<name>``) tagged ``run=<run>``."""
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"ray_{name}{{") and f'run="{run}"' in line
    ]


# ------------------------------------------------------------------------------------ unit checks


def test_every_ray_process_and_trainer_has_train_state_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    from raylora.cluster import runtime_env
    from raylora.monitoring import enable_train_state_tracking

    monkeypatch.delenv(STATE_TRACKING, raising=False)
    assert runtime_env()["env_vars"][STATE_TRACKING] == "1"
    enable_train_state_tracking()
    import os

    assert os.environ[STATE_TRACKING] == "1"
    monkeypatch.setenv(STATE_TRACKING, "0")  # the environment's own choice is kept
    assert runtime_env()["env_vars"][STATE_TRACKING] == "0"


@pytest.mark.parametrize("mode", ["token", "disabled"])
def test_the_dashboard_line_says_how_to_get_in_never_the_token(
    mode: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from raylora.cluster import init_ray

    class Context:
        dashboard_url = "127.0.0.1:8265"

    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-token-value")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kwargs: Context())
    init_ray(Config())
    first = capsys.readouterr().out.splitlines()[0]
    login = " (it asks for a token: paste what `ray get-auth-token` prints)"
    assert first == "[ray] cluster started locally; dashboard: http://127.0.0.1:8265" + (
        login if mode == "token" else ""
    )
    assert "s3cret" not in first


def test_train_metrics_reach_the_prometheus_export(ray_cluster) -> None:
    """The gauges the recipe sets on rank 0, set here from the driver (any Ray process exports them)."""
    run = f"metrics-probe-{time.time_ns()}"
    values = {"step": 7, "loss": 1.25, "samples_per_s": 40.5, "tokens_per_s": 3000.0, "val_cider": 2.5}
    TrainMetrics(run).record({**values, "lr": 1e-3, "val_images": 64})  # not gauges: ignored
    deadline = time.time() + 60  # the metrics agent gathers every few seconds
    while True:
        text = _metrics_export()
        got = {key: _samples(text, name, run) for key, (name, _) in METRICS.items()}
        if all(got.values()) or time.time() > deadline:
            break
        time.sleep(2)
    assert got == {key: [float(v)] for key, v in values.items()}


# --------------------------------------------------------------------------------- the dashboard


@pytest.mark.slow
def test_the_dashboard_shows_a_demo_run(watched_demo_run) -> None:
    """During the demo run (tests/conftest.py's watched_demo_run, also the end-to-end test's) the
    dashboard's Train API (with the token) lists it RUNNING with its two workers, then FINISHED; its
    datasets are in the Data view; its loss and throughput reach the Prometheus export while it trains."""
    w = watched_demo_run
    dashboard, token, name, seen, exported = w.dashboard, w.token, w.name, w.seen, w.exported
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no data
        _get(f"{dashboard}/api/train/v2/runs/v1")
    assert refused.value.code == 401
    assert w.summary["steps"] == 150
    deadline = time.time() + 15  # rank 0's gauges reach the export every few seconds (and stay a while)
    while not exported and time.time() < deadline:
        exported.extend(_samples(_metrics_export(), "raylora_train_step", name))
        time.sleep(1)
    assert ("RUNNING", 2) in seen, seen

    (after,) = [
        r for r in _get(f"{dashboard}/api/train/v2/runs/v1", token)["train_runs"] if r["name"] == name
    ]
    assert after["status"] == "FINISHED" and after["end_time_ns"]
    (attempt,) = after["attempts"]
    assert attempt["status"] == "FINISHED" and len(attempt["workers"]) == 2
    assert sorted(w["world_rank"] for w in attempt["workers"]) == [0, 1]
    assert after["run_settings"]["run_config"]["storage_path"] == str(w.root / "runs")
    job = after["run_settings"]["train_loop_config"]["job"]  # a summary, not the config and its URIs
    assert job.startswith("TrainJob(run_dir=") and "tracking" not in job

    datasets = _get(f"{dashboard}/api/data/datasets/{after['job_id']}", token)["datasets"]
    assert datasets and all(d["operators"] for d in datasets)

    assert exported and set(exported) <= set(range(1, 151)), exported  # the run's step gauge
