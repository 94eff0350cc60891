"""Every restart is exact: the record ids of every micro-batch, the final loss and the adapter of an
interrupted run equal an uninterrupted run's (ZeRO-3, 2 ranks, the demo; the baseline runs under
torchrun, so every Ray drill also checks Ray Train against torchrun), and a run is what its config
says (a changed config never resumes another config's run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylora.cli import load

REPO = Path(__file__).resolve().parent.parent
SHORT = [  # 12 steps of 8 images (40 captions), a checkpoint every 4, no validation
    "train.zero_stage=3",
    "train.max_steps=12",
    "train.checkpoint_every_n_steps=4",
    "train.log_every_n_steps=1",
    "eval.every_n_steps=-1",
    "train.trace_data=true",
    "cluster.max_failures=2",
]


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"cluster.storage_path={root / 'runs'}", f"output_dir={root / 'out'}", *SHORT, *extra]


def traces(root: Path) -> dict[int, list[tuple[int, ...]]]:
    """Micro-batch index -> the record indices of every time it was consumed (restarts replay)."""
    seen: dict[int, list[tuple[int, ...]]] = {}
    for path in (root / "runs").glob("*/data_trace/rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            seen.setdefault(row["index"], []).append(tuple(row["records"]))
    return seen


def last_step(root: Path) -> int:
    return max((max(traces(root), default=-1) // 2) + 1, 0)  # 2 micro-batches a step (2 ranks)


def assert_exact(root: Path, baseline: Path) -> dict:
    """Same micro-batches (records) at every index, every replay too; same final loss and adapter."""
    from safetensors.torch import load_file

    got, want = traces(root), traces(baseline)
    assert sorted(got) == sorted(want) == list(range(24))
    for index, consumed in got.items():
        assert all(records == want[index][0] for records in consumed), index
    a = load_file(root / "out" / "adapter" / "adapter_model.safetensors")
    b = load_file(baseline / "out" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in b) == 0.0  # bitwise: same data, same order
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert metrics["final_loss"] == json.loads((baseline / "out" / "metrics.json").read_text())["final_loss"]
    return metrics


def driver(root: Path, ray_cluster, tracking_uri: str, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
    }
    cmd = [sys.executable, "-m", "raylora.train", "--config", "demo", *overrides(root, *extra)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_step(proc: subprocess.Popen, root: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while last_step(root) < step:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"step {step} not reached"
        time.sleep(0.2)


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes_exactly(uninterrupted_run, ray_cluster, tracking_uri, tmp_path):
    """Kill the driver after step 6 (checkpoint at 4): the same command resumes in the same MLflow run
    and ends as if nothing happened; ZeRO-3 adapters are gathered (lora_B not all zero). The workers
    build their micro-batches themselves here (data.decode_actors=0)."""
    from safetensors.torch import load_file

    # data.decode_actors=0: each worker builds its own micro-batches (no Ray Data actor pool): the same
    # micro-batches, so the same result as the baseline. Under the device audit (Ray Train, 2 workers).
    extra = ("data.decode_actors=0", "train.device_audit=true")
    proc = driver(tmp_path, ray_cluster, tracking_uri, *extra)
    try:
        wait_for_step(proc, tmp_path, 6)
    finally:
        proc.kill()
        proc.wait()
    (run_dir,) = (tmp_path / "runs").iterdir()
    first_run = (run_dir / "mlflow_run_id").read_text()
    rerun = driver(tmp_path, ray_cluster, tracking_uri, *extra)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    assert "[train] device audit: " in out and "all made on or moved to cpu" in out
    assert "resuming at step 4" in out or "resuming at step 8" in out
    metrics = assert_exact(tmp_path, uninterrupted_run)
    assert metrics["mlflow_run_id"] == first_run and 0 < metrics["steps_this_run"] < 12
    weights = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.slow
def test_torchrun_crash_and_rerun_resume_exactly(uninterrupted_run, tracking_uri, tmp_path):
    """The recipe without Ray (``torchrun --nproc-per-node 2 -m raylora.train``: gloo, in-process
    micro-batches, checkpoints in the run folder, MLflow from rank 0): crashed at step 6 (checkpoint
    at 4) and run again, it ends with the uninterrupted run's micro-batches, final loss and adapter,
    bitwise, in one MLflow run. (The Ray drills below end equal to the same baseline.)"""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "RAYLORA_FAIL_AT_STEP": "6"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("-m", "raylora.train", "--config", "demo", *overrides(tmp_path)),
    ]
    crashed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert crashed.returncode != 0 and "simulated worker crash at step 6" in crashed.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in run_dir.glob("checkpoint_step_*")) == ["checkpoint_step_0000004"]
    env.pop("RAYLORA_FAIL_AT_STEP")
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert "(2 processes x 4 x 1 accumulation, no Ray), resuming at step 4" in out
    metrics = assert_exact(tmp_path, uninterrupted_run)
    assert metrics["steps_this_run"] == 8
    run = MlflowClient(tracking_uri).get_run(metrics["mlflow_run_id"])
    assert run.data.tags["run_dir"] == str(run_dir) and run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "loss")][-1] == 12


def wait_for_decode_actor(proc: subprocess.Popen, timeout: float = 300) -> int:
    """The pid of a decode actor of the run, as soon as one runs (they decode this small run's
    micro-batches within its first steps, then the pool ends)."""
    deadline = time.time() + timeout
    while not (pids := _decode_actor_pids()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no decode actor found"
        time.sleep(0.02)
    return pids[0]


def _decode_actor_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        int(line.split()[0])
        for line in out.splitlines()
        if "MapWorker(MapBatches(MicroBatchBuilder))" in line
    ]


@pytest.mark.slow
def test_a_changed_config_never_reuses_another_run(ray_cluster, tracking_uri, tmp_path, capsys):
    """The user report: after `train`, `train lora.rank=8 --output outputs/r8` (or `cluster.num_workers=8
    train.global_batch_size=128`) said "already finished" and wrote the first run's adapter. Now a
    changed config is a run of its own; the same command again finds its run (finished); a run name
    holding another config's run is an error naming the change, and nothing is written."""
    from raylora import runs
    from raylora.train import main

    common = [
        f"cluster.storage_path={tmp_path / 'runs'}",
        "train.max_steps=1",
        "eval.every_n_steps=-1",
        "data.decode_actors=0",
    ]
    # the runs that train or are refused for their run folder run without Ray (the run folder's rules are
    # the same for every runtime); the one refused for the cluster's size asks the session's cluster
    named = ["--no-ray", *common, "cluster.run_name=first"]
    assert main(["--config", "demo", "--output", str(tmp_path / "first"), *named]) == 0
    # without Ray too, the console holds raylora's lines only (DeepSpeed printed "... built successfully"
    # and torch a CUDA_HOME warning there)
    captured = capsys.readouterr()
    assert all(line.startswith("[") for line in (captured.out + captured.err).splitlines()), captured
    bigger = ["cluster.num_workers=8", "train.global_batch_size=128"]
    assert main(["--config", "demo", "--output", str(tmp_path / "big"), *common, *bigger]) == 2
    captured = capsys.readouterr()
    assert "already finished" not in captured.out and "the job needs 8 workers" in captured.err
    # refused by the cluster-size check: no output folder, and no run folder claiming its name
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["first"]
    assert not (tmp_path / "big").exists()
    base, rank8 = load("demo", common), load("demo", [*common, "lora.rank=8"])
    assert runs.run_dir(rank8, runs.identity(rank8, rank8.model.path)) != runs.run_dir(
        base, runs.identity(base, base.model.path)
    )
    assert main(["--config", "demo", "--output", str(tmp_path / "again"), *named]) == 0
    assert "already finished (1 steps)" in capsys.readouterr().out
    assert main(["--config", "demo", "--output", str(tmp_path / "r8"), *named, "lora.rank=8"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another config" in err and "lora.rank: 16 then, 8 now" in err
    # nothing at all: a refused run's error log goes to the raylora cache's logs/, not an output folder
    assert not (tmp_path / "r8").exists()


def test_workers_use_their_own_cluster(ray_cluster):
    """Every Ray process has RAY_ADDRESS = its own cluster (the setup hook of raylora's runtime env):
    Ray's state API calls from workers (Ray Train's placement-group cleaner after a trial is stopped)
    must not stop on "Found multiple active Ray instances" when another cluster runs on the machine."""
    import os

    @ray_cluster.remote(num_cpus=0)
    def address() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    @ray_cluster.remote(num_cpus=0)
    class Probe:
        def address(self) -> str | None:
            return os.environ.get("RAY_ADDRESS")

    gcs = ray_cluster.get_runtime_context().gcs_address
    probe = Probe.remote()
    assert ray_cluster.get([address.remote(), probe.address.remote()]) == [gcs, gcs]
    ray_cluster.kill(probe)
