"""Session-wide fixtures: one local Ray cluster, the demo assets, a tiny model; all built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
COCO = FIXTURES / "coco"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object storage: every s3:// of the session (raylora's, Ray's, MLflow's, boto3's) goes to a local
# S3-compatible server (moto, started by the ``s3`` fixture on first use) through the AWS SDKs' own
# variables, set before the session's Ray cluster starts so that its workers inherit them too. The
# secret is long enough for redaction (tests check it never reaches a log or a record).
S3_PORT = _free_port()
S3_SECRET = "session-secret-key-that-must-not-leak"
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="AKIALOCALTESTSERVER",
    AWS_SECRET_ACCESS_KEY=S3_SECRET,
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)


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
def s3():
    """A real S3-compatible server on 127.0.0.1 (``python -m moto.server``) for the session; yields a
    function that makes a fresh bucket and returns its ``s3://`` URI."""
    import itertools
    import subprocess
    import sys
    import time
    import urllib.request

    import boto3

    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "the S3 server did not start"
            time.sleep(0.1)
    client = boto3.client("s3")
    counter = itertools.count()

    def bucket() -> str:
        name = f"raylora-test-{next(counter)}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    yield bucket
    server.terminate()
    server.wait(timeout=10)


def upload(local: Path, uri: str) -> None:
    """Copy a file or a folder's contents to ``uri`` (``s3://bucket/prefix``)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    if local.is_file():
        pafs.copy_files(str(local), path, destination_filesystem=fs)
    else:
        pafs.copy_files(str(local), path, destination_filesystem=fs, use_threads=True)


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
def uninterrupted_run(tmp_path_factory) -> Path:
    """The short ZeRO-3 demo run (tests/test_restarts.py's SHORT, 2 ranks) every restart drill is
    compared with, run without Ray (``torchrun --nproc-per-node 2``) and under the device audit. The
    Ray drills that end bitwise equal to it also show that Ray Train and torchrun train the same."""
    import subprocess
    import sys

    from tests.test_restarts import overrides

    root = tmp_path_factory.mktemp("uninterrupted")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "raylora.train"]
    cmd += ["--config", "demo", *overrides(root, "train.device_audit=true")]
    done = subprocess.run(
        cmd, cwd=FIXTURES.parent.parent, env=env, capture_output=True, text=True, timeout=600
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    # a tensor handed to a collective, DeepSpeed or the model off the recipe's device fails the run
    # (on the parent commit: log_step's all_reduce of a host tensor)
    assert "[train] device audit: " in out and "[done] 12 steps" in out, out[-3000:]
    return root


@pytest.fixture(scope="session")
def watched_demo_run(ray_cluster, tracking_uri, tmp_path_factory):
    """The default demo run (150 steps, 2 workers, ZeRO-2, validation on 64 images) in the session's
    cluster, with the Ray dashboard's Train API and the Prometheus export read while it trains: what
    tests/test_train.py's end-to-end test and tests/test_monitoring.py's dashboard test check."""
    import threading
    import types
    import urllib.error

    from raylora import runs
    from raylora.cli import load
    from raylora.driver import check_paths, run
    from tests.test_monitoring import _auth_token, _get, _metrics_export, _samples

    root = tmp_path_factory.mktemp("demo_e2e")
    cfg = load(
        "demo",
        [f"cluster.storage_path={root / 'runs'}", f"output_dir={root / 'out'}", "data.val_size=64"],
    )
    name = Path(runs.run_dir(cfg, runs.identity(cfg, check_paths(cfg)))).name
    dashboard = "http://" + ray_cluster._private.worker.get_dashboard_url()
    token = _auth_token()
    seen: list[tuple[str, int]] = []  # (run status, workers of its latest attempt) while it runs
    exported: list[float] = []  # ray_raylora_train_step values of the run in the Prometheus export
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                train_runs = _get(f"{dashboard}/api/train/v2/runs/v1", token)["train_runs"]
            except urllib.error.HTTPError as e:  # 500 until the run creates Ray Train's state actor
                assert e.code == 500, e
                train_runs = []
            for r in train_runs:
                if r["name"] == name:
                    seen.append((r["status"], len(r["attempts"][-1]["workers"]) if r["attempts"] else 0))
            exported.extend(_samples(_metrics_export(), "raylora_train_step", name))
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = run(cfg)
    finally:
        done.set()
        watcher.join(timeout=60)
    return types.SimpleNamespace(
        cfg=cfg,
        summary=summary,
        root=root,
        name=name,
        dashboard=dashboard,
        token=token,
        seen=seen,
        exported=exported,
    )
