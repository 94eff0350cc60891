"""Session-wide fixtures: one local Ray cluster, the demo assets, a tiny model; all built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
COCO = FIXTURES / "coco"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(autouse=True)
def error_logs_in_tmp(tmp_path_factory, monkeypatch):
    """Commands run in-process log their errors under the session's temporary folder, not under
    ~/.cache/raylora/logs (a command that knows its output folder still logs there)."""
    from raylora import console

    monkeypatch.setattr(console, "_log_dir", tmp_path_factory.getbasetemp() / "error-logs")


@pytest.fixture(scope="session")
def demo_root() -> Path:
    """The cached demo assets (built on first use, ~2 minutes, then reused)."""
    from raylora.demo import ensure_demo

    return ensure_demo()


@pytest.fixture(scope="session")
def demo_tokenizer_dir(demo_root: Path) -> Path:
    return demo_root / "base"


@pytest.fixture(scope="session")
def demo_settings(demo_tokenizer_dir: Path):
    from raylora.demo import demo_image_settings

    return demo_image_settings(demo_tokenizer_dir)


@pytest.fixture(scope="session")
def demo_base_model(demo_root: Path):
    from raylora.model import load_base_model

    return load_base_model(demo_root / "base").eval()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs, ~1 GiB object store)."""
    import ray

    from raylora.cluster import console_options, runtime_env

    if not ray.is_initialized():
        ray.init(
            address="local",  # a cluster of the session's own, whatever else runs on the machine
            num_cpus=2,
            object_store_memory=1 << 30,
            include_dashboard=True,
            runtime_env=runtime_env(),
            **console_options(),  # as raylora's own init_ray: the workers' output in their log files
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A fresh sqlite MLflow store for the session."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def uninterrupted_run(ray_cluster, tracking_uri, tmp_path_factory) -> Path:
    """The short ZeRO-3 demo run (tests/test_restarts.py's SHORT) every restart drill is compared with."""
    from raylora.cli import load
    from raylora.train import run
    from tests.test_restarts import overrides

    root = tmp_path_factory.mktemp("uninterrupted")
    # under the device audit: a tensor the recipe hands to a collective, DeepSpeed or the model off its
    # device fails the run (on the parent commit: log_step's all_reduce of a host tensor)
    summary = run(load("demo", overrides(root, "train.device_audit=true")))
    assert summary["steps"] == 12
    return root
