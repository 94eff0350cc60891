"""Object storage end to end, against a real S3-compatible server on 127.0.0.1 (the ``s3`` fixture):
every annotation format read from a bucket, and a demo run whose data, run folder (checkpoints,
traces, records) and MLflow artifacts are all in the bucket, crashed and restarted exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from raylora.data.prepare import prepare
from raylora.data.records import load_rgb

from .conftest import COCO, S3_SECRET, upload
from .test_formats import TRAIN, _export, _exporter
from .test_restarts import SHORT, assert_exact, traces, wait_for_decode_actor

REPO = Path(__file__).resolve().parent.parent


def test_every_format_is_read_from_s3(s3, demo_settings, tmp_path, monkeypatch, capsys):
    """``data check s3://bucket/prefix`` accepts each format, row for row, with its images in the
    bucket (beside a COCO/LLaVA file's root, or inside the shards); the records equal the local
    JSONL's, pixels included; a second check of the same objects reuses the validation."""
    from raylora.data.__main__ import main

    monkeypatch.setenv("RAYLORA_CACHE", str(tmp_path / "cache"))
    _export(tmp_path / "export")
    bucket = s3()
    upload(tmp_path / "export", f"{bucket}/export")
    upload(COCO / "train2014", f"{bucket}/coco/train2014")
    ref = prepare(TRAIN, COCO, demo_settings, use_ray=False).table
    for name in ("captions.json", "llava.json", "parquet", "webdataset"):
        root = ["--root", f"{bucket}/coco"] if name.endswith(".json") else []
        rejects = ["--rejects", str(tmp_path / f"{name}.rejects.jsonl")]  # not into the current folder
        assert (
            main(["check", f"{bucket}/export/{name}", *root, *rejects, "--model", "demo", "--json"]) == 0
        ), name
        stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert stats["rows_ok"] == stats["rows_total"] == 40, name
        got = prepare(f"{bucket}/export/{name}", root[1] if root else None, demo_settings, use_ray=False)
        assert got.table.column("input_ids").equals(ref.column("input_ids")), name
        assert got.table.column("tiles").equals(ref.column("tiles")), name
        image = got.table.column("images")[0][0].as_py()
        assert image.startswith(f"{bucket}/"), image  # read through the store, nothing copied locally
        local = ref.column("images")[0][0].as_py()
        assert np.array_equal(np.asarray(load_rgb(image)), np.asarray(load_rgb(local)))
    capsys.readouterr()
    prepare(f"{bucket}/export/webdataset", None, demo_settings, use_ray=False, progress=True)
    assert "validation reused: 40 rows, 40 ok, 0 rejected" in capsys.readouterr().err
    (tmp_path / "rejects").mkdir()
    monkeypatch.chdir(tmp_path / "rejects")  # a remote annotation's rejects land in the current folder
    assert main(["check", f"{bucket}/export/parquet", "--model", "demo"]) == 0
    assert (tmp_path / "rejects" / "parquet.rejects.jsonl").is_file()


def _download(uri: str, local: Path) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(path, str(local), source_filesystem=fs)


@pytest.mark.slow
def test_a_run_in_s3_survives_a_decode_actor_kill_and_a_worker_crash_exactly(
    s3, uninterrupted_run, ray_cluster, tracking_uri, demo_root, tmp_path
):
    """The demo's data as WebDataset shards in a bucket (val images and files too),
    ``cluster.storage_path`` and the MLflow experiment's artifacts in the bucket, and two faults in
    the run. SIGKILL a rank's decode actor as soon as one runs: Ray Data restarts it (or the workers
    restart from the last checkpoint). Then the last rank dies at step 6: FailureConfig restarts the
    workers from the step-4 checkpoint, read back from the bucket. Every micro-batch and the result
    equal the uninterrupted local run's, bitwise; every optimizer step is logged once, none skipped.
    The run folder and the outputs exist only in the bucket, the adapter is in MLflow's artifacts
    there, and the credentials appear nowhere."""
    from mlflow.tracking import MlflowClient

    data = demo_root / "data"
    _exporter().export(data / "annotations" / "demo_train.jsonl", tmp_path / "export", data)
    bucket = s3()
    upload(tmp_path / "export" / "webdataset", f"{bucket}/demo/webdataset")
    upload(data / "annotations", f"{bucket}/demo/annotations")
    upload(data / "val", f"{bucket}/demo/val")
    storage = f"{bucket}/runs"
    cmd = [
        *(sys.executable, "-m", "raylora.train", "--config", "demo"),
        f"data.train={bucket}/demo/webdataset",
        f"data.val={bucket}/demo/annotations/demo_val.json",
        f"data.val_gt={bucket}/demo/annotations/demo_val_gt.json",
        f"data.val_root={bucket}/demo",
        f"cluster.storage_path={storage}",
        f"output_dir={bucket}/out",
        "tracking.experiment=s3-drill",
        f"tracking.artifact_location={bucket}/mlflow",
        *SHORT,
    ]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "RAYLORA_FAIL_AT_STEP": "6",
    }
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:  # a failed check stops the run: it would hold the session cluster's CPUs
        os.kill(wait_for_decode_actor(proc), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
    _download(storage, tmp_path / "runs")  # the run folder, read back from the bucket
    _download(f"{bucket}/out", tmp_path / "out")  # the outputs (adapter, metrics), from the bucket too
    (marker,) = (tmp_path / "runs").glob("*/injected_failure")
    assert marker.read_text() == "6"
    assert len(traces(tmp_path)[10]) == 2  # step 6's micro-batches were consumed twice: before and after
    metrics = assert_exact(tmp_path, uninterrupted_run)
    steps = [m.step for m in MlflowClient(tracking_uri).get_metric_history(metrics["mlflow_run_id"], "loss")]
    assert sorted(steps) == list(range(1, 13))
    run = MlflowClient(tracking_uri).get_run(metrics["mlflow_run_id"])
    assert run.info.artifact_uri.startswith(f"{bucket}/mlflow/"), run.info.artifact_uri
    fs, path = pafs.FileSystem.from_uri(f"{run.info.artifact_uri}/adapter/adapter_model.safetensors")
    assert fs.get_file_info(path).size > 0
    written = [out, *(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())]
    written += [p.read_text(errors="replace") for p in (tmp_path / "runs").rglob("*.json*") if p.is_file()]
    assert not any(S3_SECRET in text for text in written)
