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

import pyarrow.fs as pafs
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


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listeners(cluster, driver: int) -> list[tuple[str, str, int, str]]:
    """(part, address, port, process) for every listening TCP socket of the rehearsal's processes
    (the process groups `up` started and every descendant: raylets' workers included) and a driver's."""
    import psutil

    found = []
    parts = {part: int((cluster["dir"] / f"{part}.pid").read_text()) for part in ("head", "node2", "mlflow")}
    for part, pid in [*parts.items(), ("driver", driver)]:
        leader = psutil.Process(pid)
        for proc in [leader, *leader.children(recursive=True)]:
            try:
                name = " ".join(proc.cmdline()) or proc.name()
                sockets = proc.net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            found += [
                (part, s.laddr.ip, s.laddr.port, name) for s in sockets if s.status == psutil.CONN_LISTEN
            ]
    return found


def test_what_the_rehearsal_listens_on(cluster):
    """The user report: GCS, raylets, agents and workers listened on every interface and the Ray Client
    server on the machine's address, while the script said "127.0.0.1 only". Now every listening
    socket of the rehearsal (Ray's on both nodes, its workers', a driver's, the MLflow server's) is
    on loopback."""
    code = (
        "import sys, ray\n"
        "ray.init()\n"
        "Idle = ray.remote(num_cpus=0)(type('Idle', (), {'ready': lambda self: True}))\n"
        "actors = [Idle.options(resources={r: 0.01}).remote() for r in ('rehearsal_head', 'rehearsal_node2')]\n"
        "ray.get([a.ready.remote() for a in actors])\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", code],
        env=cluster["env"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout.readline().strip() == "ready"  # an actor (a worker process) on each node
        found = listeners(cluster, driver.pid)
    finally:
        driver.communicate("", timeout=120)
    assert {part for part, *_ in found} == {"head", "node2", "mlflow", "driver"}, found
    workers = {part for part, _, _, name in found if name.startswith("ray::Idle")}
    assert workers >= {"head", "node2"}, found
    assert {port for part, _, port, _ in found if part == "mlflow"} == {
        int((cluster["dir"] / "mlflow.port").read_text())
    }
    assert int((cluster["dir"] / "dashboard.port").read_text()) in {port for *_, port, _ in found}
    wide = [(part, addr, port, name[:80]) for part, addr, port, name in found if addr not in LOOPBACK]
    assert not wide, wide


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


def test_sweep_registers_its_champion_through_the_server_and_merge_runs_elsewhere(cluster, s3, tmp_path):
    """A 2-trial sweep on the cluster with no shared folder: its trials' checkpoints in object storage
    (the tests' S3 server) and its experiment's artifacts there too; its champion is registered in the
    server's registry, and `merge --model-uri models:/...@champion` works from another folder, through
    the server and the bucket only."""
    name = "raylora-rehearsal-lora"
    bucket = s3()
    swept = command(
        cluster,
        "raylora.sweep",
        "--config",
        "demo",
        "--trials",
        "2",
        f"cluster.storage_path={bucket}/storage",
        f"output_dir={tmp_path / 'out' / 'x'}",
        "data.val_size=16",
        "sweep.searcher=random",
        f"tracking.registered_model={name}",
        "tracking.experiment=s3-sweep",
        f"tracking.artifact_location={bucket}/mlflow",
        "eval.validation=async",  # the trial's validator actor scores its checkpoints; Tune gets the scores
        "sweep.trial_overrides={cluster.num_workers: 1, cluster.cpus_per_worker: 0.5, data.decode_cpus: 0.45, "
        "train.max_steps: 10, eval.every_n_steps: 5, train.log_every_n_steps: 5}",
    )
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    champion = client(cluster).get_model_version_by_alias(name, "champion")
    summary = json.loads((tmp_path / "out" / "demo_sweep" / "summary.json").read_text())
    assert float(champion.tags["cider"]) == pytest.approx(summary["best_cider"])
    assert champion.source.startswith(f"{bucket}/mlflow/"), champion.source
    fs, path = pafs.FileSystem.from_uri(f"{bucket}/storage")
    stored = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    trials = {
        p.split("/trials/", 1)[1].split("/", 1)[0] for p in stored if "/trials/" in p and "/checkpoint_" in p
    }
    assert len(trials) == 2 and any(p.endswith("raylora_sweep.json") for p in stored), sorted(stored)[:20]
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
    """Workers on both nodes (SPREAD), the run, its metrics and its adapter through the tracking server
    only; then the second node's raylet (and its workers) is killed mid-run: the run continues on the
    head from its latest checkpoint and ends with the uninterrupted run's micro-batches, loss and
    adapter, every step logged once. Last in this module: the cluster has one node afterwards."""
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
    assert len(nodes) == 2 and len(traces(tmp_path)[12]) >= 1  # one training worker on each node
    metrics = assert_exact(tmp_path, uninterrupted_run)
    run = client(cluster).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    steps = [m.step for m in client(cluster).get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 13))  # the steps trained again after the loss: logged once
    assert "adapter/adapter_model.safetensors" in {
        a.path for a in client(cluster).list_artifacts(run.info.run_id, "adapter")
    }
