"""Ray Tune sweep: search space, concurrency, and a small real sweep with ASHA and the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from raylora.cli import load
from raylora.config import ConfigError, load_config
from raylora.sweep import (
    check_merge_fits,
    default_point,
    final_config,
    max_concurrent,
    merge_need,
    search_space,
    trial_config,
    trial_resources,
)

REPO = Path(__file__).resolve().parent.parent


def test_search_space_from_config():
    cfg = load_config("demo")
    space = search_space(cfg)
    assert set(space) == {"lora.rank", "train.lr", "train.global_batch_size"}
    assert space["lora.rank"].categories == [4, 8, 16, 32]
    assert space["train.lr"].lower == pytest.approx(3e-4) and space["train.lr"].upper == pytest.approx(5e-3)
    assert default_point(cfg, space) == {"lora.rank": 16, "train.lr": 1.5e-3, "train.global_batch_size": 8}
    recipe = search_space(load_config("internvl2_2b_coco"))
    assert recipe["lora.rank"].categories == [16, 32, 64, 128, 256]
    assert recipe["train.global_batch_size"].categories == [128, 256, 512]


def test_extra_choices_are_checked_up_front():
    cfg = load_config("demo", ["sweep.extra={lora.use_dora: [false, true], lora.init: [default, pissa]}"])
    space = search_space(cfg)
    assert space["lora.use_dora"].categories == [False, True]
    assert space["lora.init"].categories == ["default", "pissa"]
    with pytest.raises(ConfigError, match="sweep.extra: lora.init='pisa'.*valid: default"):
        search_space(load_config("demo", ["sweep.extra={lora.init: [default, pisa]}"]))
    with pytest.raises(ConfigError, match="lora.use_dora has no choices"):
        search_space(load_config("demo", ["sweep.extra={lora.use_dora: []}"]))


def test_trial_config_applies_params_and_overrides():
    cfg = load_config("demo")
    t = trial_config(cfg, {"lora.rank": 8, "train.lr": 1e-3})
    assert t.lora.rank == 8 and t.lora.alpha == 16 and t.train.lr == 1e-3
    assert t.cluster.num_workers == 1 and t.data.decode_cpus == 0.45  # demo's sweep.trial_overrides
    assert t.train.checkpoint_every_n_steps == t.eval.every_n_steps
    assert cfg.lora.rank == 16  # the base config is untouched


def test_concurrency_from_cluster_and_unfit_trials():
    cfg = load_config("demo")
    assert trial_resources(cfg) == {"CPU": 0.96}
    assert max_concurrent(cfg, {"CPU": 2.0}) == 2
    assert max_concurrent(load_config("demo", ["sweep.max_concurrent=1"]), {"CPU": 2.0}) == 1
    with pytest.raises(RuntimeError, match="one trial needs"):
        max_concurrent(
            load_config(
                "demo", ["sweep.trial_overrides={cluster.num_workers: 8, train.global_batch_size: 32}"]
            ),
            {"CPU": 2.0},
        )
    gpu = load_config("internvl2_2b_coco")
    assert max_concurrent(gpu, {"CPU": 64.0, "GPU": 16.0}) == 1
    with pytest.raises(RuntimeError):
        max_concurrent(gpu, {"CPU": 64.0, "GPU": 4.0})


def test_final_config_drops_the_overrides_that_shape_trials():
    overrides = (
        "sweep.trial_overrides={cluster: {num_workers: 1, cpus_per_worker: 0.5}, data.decode_cpus: 0.45, "
        "train.max_steps: 20, eval.every_n_steps: 10, train.log_every_n_steps: 5, data.max_num: 4}"
    )
    cfg = load_config("demo", [overrides])
    params = {"lora.rank": 8, "train.lr": 1e-3, "train.global_batch_size": 16}
    trial = trial_config(cfg, params)
    assert (trial.train.max_steps, trial.eval.every_n_steps, trial.cluster.num_workers) == (20, 10, 1)
    final = final_config(cfg, params, "demo_sweep_final")
    # the schedule, the rung cadence and the trial's share of the cluster: the base config's
    assert (final.train.max_steps, final.eval.every_n_steps, final.train.checkpoint_every_n_steps) == (
        150,
        50,
        50,
    )
    assert final.train.log_every_n_steps == 10
    assert (final.cluster.num_workers, final.cluster.cpus_per_worker, final.data.decode_cpus) == (2, 0.5, 0.5)
    # what the champion was selected with stays: its parameters and the other overrides
    assert (final.lora.rank, final.lora.alpha, final.train.lr, final.train.global_batch_size) == (
        8,
        16,
        1e-3,
        16,
    )
    assert final.data.max_num == trial.data.max_num == 4 and final.data.val_size == trial.data.val_size
    assert final.cluster.run_name == "demo_sweep_final" and cfg.cluster.run_name is None
    recipe = load_config("internvl2_2b_coco")
    full = final_config(recipe, {"lora.rank": 64, "train.lr": 1e-4}, "x")
    assert trial_config(recipe, {}).train.max_steps == 400 and full.train.max_steps == -1  # the whole epoch
    assert full.eval.every_n_steps == 200 and (full.lora.rank, full.lora.alpha) == (64, 128)


def test_merge_resources_must_fit_one_node():
    cfg = load_config("demo")
    assert cfg.sweep.merge and merge_need(cfg) == {"CPU": 1.0, "GPU": 0.0, "memory": 0.0}
    check_merge_fits(cfg, [{"CPU": 2.0}])
    big = load_config("demo", ["sweep.merge_resources={CPU: 4, memory_gb: 200}"])
    assert merge_need(big) == {"CPU": 4.0, "GPU": 0.0, "memory": 200 * 2**30}
    nodes = [{"CPU": 8.0, "memory": 64 * 2**30}, {"CPU": 2.0, "memory": 512 * 2**30}]
    with pytest.raises(RuntimeError, match="final merge needs .* --no-merge"):
        check_merge_fits(big, nodes)
    check_merge_fits(big, [*nodes, {"CPU": 16.0, "GPU": 8.0, "memory": 1024 * 2**30}])
    check_merge_fits(load_config("demo", ["sweep.merge_resources={CPU: 64}", "sweep.merge=false"]), nodes)
    with pytest.raises(ConfigError, match="sweep.merge_resources: keys among CPU, GPU, memory_gb"):
        load_config("demo", ["sweep.merge_resources={cpus: 2}"])
    with pytest.raises(ConfigError, match="merge_dtype"):
        load_config("demo", ["sweep.merge_dtype=fp16"])


TRIAL_STEPS, RUNG = 10, 5  # a trial's schedule and its validation (and checkpoint) interval


def _sweep_overrides(tmp_path: Path) -> list[str]:
    return [
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"output_dir={tmp_path / 'out' / 'x'}",
        "data.val_size=16",
        # one worker per trial building its own micro-batches (no decode actor pool): the sweep is what
        # these tests check
        "sweep.trial_overrides={cluster.num_workers: 1, cluster.cpus_per_worker: 0.5, data.decode_actors: 0, "
        f"train.max_steps: {TRIAL_STEPS}, eval.every_n_steps: {RUNG}, train.log_every_n_steps: {RUNG}}}",
        "sweep.searcher=random",
        "tracking.registered_model=raylora-test-lora",
    ]


def _check_final_task(summary: dict, client, demo_root: Path) -> None:
    """sweep.final_train: the champion's config for the base schedule, registered; then merged in a
    Ray task and registered as <name>-merged with the caption pyfunc flavour."""
    import base64

    import mlflow
    import pandas as pd

    from raylora.caption import caption_images

    final = summary["final_train"]
    assert final["steps"] == 20 and final["val_cider"] is not None  # the trial truncation (10) is gone
    assert final["version"] == summary["version"] + 1 == summary["merged_from_version"]
    fv = client.get_model_version("raylora-test-lora", str(final["version"]))
    assert fv.tags["final_train"] == "true" and fv.tags["trial_id"] == summary["best_trial"]
    assert fv.run_id == final["mlflow_run_id"]
    assert summary["merged_model"] == "raylora-test-lora-merged"
    merged = client.get_model_version("raylora-test-lora-merged", str(summary["merged_version"]))
    assert merged.tags["adapter_version"] == str(final["version"])
    assert merged.tags["adapter_run_id"] == final["mlflow_run_id"]
    saved = json.loads((Path(summary["report"]).parent / "summary.json").read_text())
    assert saved["merged_version"] == summary["merged_version"] and saved["final_train"] == final
    uri = f"models:/raylora-test-lora-merged/{summary['merged_version']}"
    assert (
        mlflow.models.get_model_info(uri).flavors["python_function"]["loader_module"].endswith("code_model")
    )
    image = str(sorted((demo_root / "data" / "val").glob("*.jpg"))[0])
    data = pd.DataFrame({"image": [base64.b64encode(Path(image).read_bytes()).decode()]})
    caption = mlflow.pyfunc.load_model(uri).predict(data)
    print(f"merged champion's caption of {Path(image).name}: {caption}")
    assert caption == caption_images(summary["merged_dir"], [image])


@pytest.mark.slow
def test_sweep_resume_continues_the_interrupted_trial(ray_cluster, tracking_uri, tmp_path, demo_root):
    """Kill the sweep driver mid-trial (one trial finished, the next past its first checkpoint);
    --resume does not rerun the finished trial, restarts the interrupted one from its checkpoint, in
    the same MLflow parent and child runs; then the champion is registered, trained for the base
    schedule and merged (the final task), as after a sweep that was never interrupted."""
    # base schedule 20 steps, trials truncated to TRIAL_STEPS; the final training and merge at the end
    overrides = _sweep_overrides(tmp_path) + [
        "sweep.max_concurrent=1",
        "sweep.grace_period=2",  # no rung before a trial's last step: the interrupted trial runs on
        "train.trace_data=true",
        "train.max_steps=20",
        "sweep.final_train=true",
        # the final training on one worker building its own micro-batches: the sweep's resume is the
        # subject here; the decode pool and two workers are tested elsewhere
        "cluster.num_workers=1",
        "data.decode_actors=0",
    ]
    cmd = [sys.executable, "-m", "raylora.sweep", "--config", "demo", "--trials", "2"]
    cmd += overrides
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
    }
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sweep_dir = tmp_path / "runs" / "demo_sweep"
    trials = sweep_dir / "trials"

    def steps(trial: Path) -> list[int]:
        """The steps of the trial's checkpoints (each complete once its train_state.json is there)."""
        found = []
        for path in trial.glob("checkpoint_*/train_state.json"):
            try:
                found.append(json.loads(path.read_text())["step"])
            except (OSError, ValueError):  # being copied in right now
                pass
        return sorted(found)

    def finished() -> list[Path]:
        """Trials whose last step (TRIAL_STEPS, sweep.trial_overrides) is checkpointed."""
        return [d for d in trials.glob("*") if TRIAL_STEPS in steps(d)]

    def interrupted() -> list[Path]:
        """Trials past a checkpoint, not finished."""
        return [d for d in trials.glob("*") if steps(d) and TRIAL_STEPS not in steps(d)]

    deadline = time.time() + 600
    while not (finished() and interrupted()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no trial finished with another one past its checkpoint"
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    done_before = {d.name: sorted(p.name for p in d.glob("checkpoint_*")) for d in finished()}
    (cut,) = interrupted()
    cut_steps = steps(cut)
    cut_run = (cut / "mlflow_run_id").read_text()
    parent = json.loads((sweep_dir / "raylora_sweep.json").read_text())["parent_run_id"]
    resumed = subprocess.run(
        [*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    for name, ckpts in done_before.items():
        assert sorted(p.name for p in (trials / name).glob("checkpoint_*")) == ckpts  # not run again
    # from its checkpoint, not from step 0: micro-batches before it were consumed once, all were consumed
    consumed = Counter(
        json.loads(line)["index"]
        for f in cut.glob("data_trace/rank*.jsonl")
        for line in f.read_text().splitlines()
    )
    per_step = len(consumed) // TRIAL_STEPS
    assert sorted(consumed) == list(range(TRIAL_STEPS * per_step))
    assert all(consumed[i] == 1 for i in range(cut_steps[-1] * per_step))
    assert (cut / "mlflow_run_id").read_text() == cut_run
    summary = json.loads((tmp_path / "out" / "demo_sweep" / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["best_cider"] > 0
    assert summary["parent_run_id"] == parent
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(children) == 2 and cut_run in {r.info.run_id for r in children}
    steps = [m.step for m in client.get_metric_history(cut_run, "val_cider")]
    assert sorted(steps) == [RUNG, TRIAL_STEPS]  # each rung once: the resumed part continued the same run
    _check_champion(
        summary, children, client, tmp_path, demo_root, ray_cluster, trial=next(iter(done_before))
    )


def _check_champion(
    summary: dict, children: list, client, tmp_path: Path, demo_root: Path, ray_cluster, trial: str
) -> None:
    """The champion's registry entry and files, the trials' child runs' states, the report; a trial's
    trainer (built in the trial's own process) on the dashboard's Train view; then the final task."""
    from safetensors.torch import load_file

    from raylora.sources import resolve_source
    from tests.test_monitoring import _auth_token, _get

    dashboard = "http://" + ray_cluster._private.worker.get_dashboard_url()
    train_runs = _get(f"{dashboard}/api/train/v2/runs/v1", _auth_token())["train_runs"]
    (run,) = [r for r in train_runs if r["name"] == trial]
    assert run["status"] == "FINISHED" and len(run["attempts"][-1]["workers"]) == 1
    mv = client.get_model_version("raylora-test-lora", str(summary["version"]))  # the best trial's adapter
    assert float(mv.tags["cider"]) == pytest.approx(summary["best_cider"])
    # the champion is the best checkpoint of the best trial: the highest val CIDEr any trial logged at
    # any step, that step recorded, that checkpoint's adapter registered (bit for bit)
    logged = [
        (m.value, m.step, r.info.run_id)
        for r in children
        for m in client.get_metric_history(r.info.run_id, "val_cider")
    ]
    top = max(v for v, _, _ in logged)
    assert float(mv.tags["cider"]) == pytest.approx(top) and mv.tags["step"] == str(summary["best_step"])
    assert (top, summary["best_step"]) in {(v, s) for v, s, _ in logged}
    assert (
        mv.tags["trial_id"] == summary["best_trial"]
        and "config_hash" in mv.tags
        and mv.tags["base_model"] == str(demo_root / "base")
    )
    source = resolve_source("models:/raylora-test-lora@champion", cache_dir=tmp_path / "cache")
    assert json.loads((source.adapter_dir / "raylora.json").read_text())["template"] == "Hermes-2"
    weights = load_file(source.adapter_dir / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    rows = json.loads((Path(summary["report"]).parent / "trials.json").read_text())
    (row,) = [r for r in rows if r["trial_id"] == summary["best_trial"]]
    assert row["best_step"] == summary["best_step"] and row["cider"] == pytest.approx(top)
    checkpoint = Path(row["checkpoint"])
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == row["best_step"]
    assert (checkpoint / "adapter" / "adapter_model.safetensors").read_bytes() == (
        source.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    for r in rows:  # a trial ASHA stopped early keeps its best checkpoint
        if r["state"] == "stopped early":
            assert r["checkpoint"] and Path(r["checkpoint"]).is_dir() and r["best_step"] <= r["steps"]
    states = {r.data.tags["trial_state"] for r in children}
    assert states <= {"completed", "stopped early", "failed"} and "completed" in states
    report = Path(summary["report"])
    assert report.is_file() and (report.parent / "cider_vs_lr.png").is_file()
    assert max(r["cider"] or 0 for r in rows) == pytest.approx(summary["best_cider"])
    _check_final_task(summary, client, demo_root)


def test_sweep_report_into_the_parent_run(tracking_uri, tmp_path):
    """The report of a finished sweep (no Ray): the base batch size, the local store hint, the artifacts."""
    from raylora import tracking
    from raylora.sweep import Sweep, sweep_report

    cfg = load("demo", [f"output_dir={tmp_path / 'out'}"])
    uri, exp_id = tracking.setup(cfg)
    parent = tracking.create_run(exp_id, "sweep-report-test", uri=uri)
    sweep = Sweep(cfg, "demo_sweep", tmp_path, None, None, str(tmp_path / "runs"), uri, exp_id, parent)
    row = {"steps": 20, "total_steps": 20, "state": "completed", "path": "/p"}
    rows = [
        {**row, "trial_id": f"t_0000{k}", "params": {"lora.rank": rank, "train.lr": lr}, "cider": cider}
        | {"checkpoint": f"/c/{k}", "history": [[10, cider / 2], [20, cider]], "mlflow_run_id": f"{k}" * 32}
        for k, (rank, lr, cider) in enumerate([(8, 1e-3, 0.4), (16, 3e-3, 0.5)])
    ]
    sweep_report(sweep, rows, tmp_path / "report", ("raylora-test-lora", 2, True))
    text = (tmp_path / "report" / "report.html").read_text()
    batch = trial_config(cfg, {}).train.global_batch_size
    assert f"<td class='num'>{20 * batch:,}</td>" in text
    assert f"mlflow ui --backend-store-uri {uri}" in text and "is now the registry's <b>champion</b>" in text
    logged = {f.path for f in tracking.client(uri).list_artifacts(parent, "report")}
    assert {
        "report/report.html",
        "report/trials.json",
        "report/learning_curves.png",
        "report/report.png",
    } <= logged
