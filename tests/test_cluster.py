"""The scale-out rehearsal: a real two-node Ray cluster and a real MLflow server on this machine
(scripts/local_cluster.sh), with raylora's commands run against them as a user would, through
RAY_ADDRESS and MLFLOW_TRACKING_URI only. The last test takes the second node down mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_restarts import SHORT, assert_exact, last_step, traces

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local_cluster.sh"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + second raylet + MLflow server; the second node sees its own `<dir>/private`."""
    state = tmp_path_factory.mktemp("cluster")
    private = state / "private"
    up = subprocess.run(
        ["bash", str(SCRIPT), "up", "--dir", str(state), "--private-storage", str(private)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    env = dict(os.environ)
    for line in up.stdout.splitlines():
        if line.startswith("export "):
            key, value = line[len("export ") :].split("=", 1)
            env[key] = value
    env.pop("RAYLORA_FAIL_AT_STEP", None)
    yield {"dir": state, "env": env, "private": private}
    subprocess.run(
        ["bash", str(SCRIPT), "down", "--dir", str(state), "--private-storage", str(private)], timeout=120
    )


def command(cluster, *args: str, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def client(cluster):
    from mlflow.tracking import MlflowClient

    uri = cluster["env"]["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_train_on_both_nodes_through_the_tracking_server(cluster, tmp_path):
    """Workers on both nodes (SPREAD), the run, its metrics and its adapter through the server only."""
    storage = cluster["dir"] / "storage"
    done = command(
        cluster,
        "raylora.train",
        "--config",
        "demo",
        f"cluster.storage_path={storage}",
        f"output_dir={tmp_path / 'out'}",
        "cluster.placement_strategy=SPREAD",
        "train.max_steps=6",
        "train.checkpoint_every_n_steps=3",
        "eval.every_n_steps=3",
        "data.val_size=16",
        "train.trace_data=true",
        "train.log_every_n_steps=1",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nodes = {
        json.loads(line)["node"]
        for f in storage.glob("*/data_trace/rank*.jsonl")
        for line in f.read_text().splitlines()
    }
    assert len(nodes) == 2  # one training worker on each node
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    run = client(cluster).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(client(cluster).get_metric_history(run.info.run_id, "loss")) == 6
    assert client(cluster).get_metric_history(run.info.run_id, "val_cider")
    assert "adapter/adapter_model.safetensors" in {
        a.path for a in client(cluster).list_artifacts(run.info.run_id, "adapter")
    }


def test_preflight_refuses_what_the_cluster_cannot_do(cluster, tmp_path):
    """Each a clear error before any model loads: more workers than the cluster holds, the embedded
    SQLite store on a multi-node cluster, a storage path the second node does not share."""
    common = ["raylora.train", "--config", "demo", f"output_dir={tmp_path / 'out'}"]
    shared = f"cluster.storage_path={cluster['dir'] / 'storage'}"
    big = command(
        cluster, *common, shared, "cluster.num_workers=8", "train.global_batch_size=128", timeout=300
    )
    assert big.returncode == 2 and "the job needs 8 workers" in big.stderr and "4 CPUs" in big.stderr
    local_store = {
        **cluster,
        "env": {**cluster["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"},
    }
    sqlite = command(local_store, *common, shared, timeout=300)
    assert (
        sqlite.returncode == 2 and "is a file on this machine, but the cluster has 2 nodes" in sqlite.stderr
    )
    apart = command(cluster, *common, f"cluster.storage_path={cluster['private']}", timeout=300)
    assert (
        apart.returncode == 2 and f"cluster.storage_path {cluster['private']} is not shared" in apart.stderr
    )
    for refused in (big, sqlite, apart):
        assert "trainable params" not in refused.stdout  # no model was loaded
    assert not (tmp_path / "out" / "adapter").exists()


def test_sweep_registers_its_champion_through_the_server_and_merge_runs_elsewhere(cluster, tmp_path):
    """A 2-trial sweep on the cluster; its champion is registered in the server's registry, and
    `merge --model-uri models:/...@champion` works from another folder, through the server only."""
    name = "raylora-rehearsal-lora"
    swept = command(
        cluster,
        "raylora.sweep",
        "--config",
        "demo",
        "--trials",
        "2",
        f"cluster.storage_path={cluster['dir'] / 'storage'}",
        f"output_dir={tmp_path / 'out' / 'x'}",
        "data.val_size=16",
        "sweep.searcher=random",
        f"tracking.registered_model={name}",
        "sweep.trial_overrides={cluster.num_workers: 1, cluster.cpus_per_worker: 0.5, data.decode_cpus: 0.45, "
        "train.max_steps: 10, eval.every_n_steps: 5, train.log_every_n_steps: 5}",
    )
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    champion = client(cluster).get_model_version_by_alias(name, "champion")
    summary = json.loads((tmp_path / "out" / "demo_sweep" / "summary.json").read_text())
    assert float(champion.tags["cider"]) == pytest.approx(summary["best_cider"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_ADDRESS"}  # the server is all it has
    merged = subprocess.run(
        [
            sys.executable,
            "-m",
            "raylora.merge",
            "--model-uri",
            f"models:/{name}@champion",
            "--output",
            "merged",
        ],
        cwd=elsewhere,
        env={**env, "RAYLORA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    assert (elsewhere / "merged" / "model.safetensors").is_file()


def test_losing_the_second_node_resumes_exactly(cluster, uninterrupted_run, tmp_path):
    """Kill the second node's raylet (and its workers) mid-run: the run continues on the head from its
    latest checkpoint and ends with the uninterrupted run's micro-batches, loss and adapter.
    Last in this module: the cluster has one node afterwards."""
    env = cluster["env"]
    cmd = [sys.executable, "-m", "raylora.train", "--config", "demo", *SHORT]
    cmd += [f"cluster.storage_path={tmp_path / 'runs'}", f"output_dir={tmp_path / 'out'}"]
    cmd += ["cluster.placement_strategy=SPREAD"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 400
    while last_step(tmp_path) < 6:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "step 6 not reached"
        time.sleep(0.2)
    node2 = int((cluster["dir"] / "node2.pid").read_text())
    os.killpg(node2, signal.SIGKILL)  # the raylet, its workers and its decode actors, at once
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    nodes = {
        json.loads(line)["node"]
        for f in (tmp_path / "runs").glob("*/data_trace/rank*.jsonl")
        for line in f.read_text().splitlines()
    }
    assert len(nodes) == 2 and len(traces(tmp_path)[12]) >= 1
    assert_exact(tmp_path, uninterrupted_run)
