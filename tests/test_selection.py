"""Which checkpoint a run's adapter is: selection by val CIDEr, early stopping on a plateau, the
checkpoints kept (raylora.runs, on run folders laid out as training leaves them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylora import runs
from raylora.config import ConfigError, load_config


def _checkpoint(run: Path, step: int, world: int = 1, name: str | None = None) -> Path:
    """A complete checkpoint folder: rank 0's train_state.json and every rank's DeepSpeed shard."""
    d = run / (name or f"checkpoint_step_{step:07d}")
    (d / "ds" / "ds").mkdir(parents=True)
    for rank in range(world):
        (d / "ds" / "ds" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (d / "train_state.json").write_text(json.dumps({"step": step, "total_steps": 150, "loss": 1.0}))
    return d


def _run(tmp_path: Path, scores: dict[int, float | None], world: int = 1) -> Path:
    run = tmp_path / "run"
    for step, score in scores.items():
        _checkpoint(run, step, world)
        if score is not None:
            runs.record_validation(str(run), step, {"val_cider": score, "val_images": 64})
    return run


def test_the_best_validated_checkpoint_is_selected(tmp_path):
    """The user report: val CIDEr 6.79 at step 50, 6.01 at 100, 6.02 at 150, and the adapter was
    step 150's. Now train.select=best (the default) takes step 50; last takes 150; resuming still
    starts from the latest."""
    run = _run(tmp_path, {50: 6.79, 100: 6.01, 150: 6.02})
    assert load_config("demo").train.select == "best"
    best = runs.choose(runs.checkpoints(str(run), 1), "best")
    assert (best.step, best.val_cider) == (50, 6.79) and best.path.endswith("checkpoint_step_0000050")
    assert runs.choose(runs.checkpoints(str(run), 1), "last").step == 150
    assert runs.latest_checkpoint(str(run), 1)[0] == 150
    assert runs.validations(str(run)) == [(50, 6.79), (100, 6.01), (150, 6.02)]


def test_ties_unscored_and_incomplete_checkpoints(tmp_path):
    # equal scores: the earlier checkpoint; a checkpoint never validated competes with none
    run = _run(tmp_path, {10: 2.0, 20: None, 30: 2.0})
    assert runs.best_checkpoint(str(run), 1).step == 10
    # no validation at all: best falls back to the latest
    bare = _run(tmp_path / "bare", {10: None, 20: None})
    assert runs.best_checkpoint(str(bare), 1) is None
    assert runs.choose(runs.checkpoints(str(bare), 1), "best").step == 20
    # a checkpoint missing a rank's shard (cut by a crash) is not complete, scored or not
    two = _run(tmp_path / "two", {10: 1.0}, world=2)
    cut = _checkpoint(two, 20, world=1)
    runs.record_validation(str(two), 20, {"val_cider": 9.0, "val_images": 64})
    assert [c.step for c in runs.checkpoints(str(two), 2)] == [10] and cut.is_dir()
    assert runs.best_checkpoint(str(two), 2).step == 10


def test_a_plateau_stops_after_patience_evaluations():
    assert runs.plateau([(50, 7.5), (100, 6.6)], 2) is None  # not yet `patience` evaluations after the best
    stop = runs.plateau([(50, 7.5), (100, 6.6), (150, 7.5)], 2)  # equal is no improvement
    assert stop == {"step": 150, "best_step": 50, "best_val_cider": 7.5, "patience": 2}
    assert runs.plateau([(50, 7.5), (100, 6.6), (150, 7.6)], 2) is None
    assert runs.plateau([(50, 7.5), (100, 6.6), (150, 6.0)], 0) is None  # off


def test_the_early_stop_is_recorded_once_in_the_run_folder(tmp_path):
    run = _run(tmp_path, {50: 7.5, 100: 6.6})
    assert runs.check_early_stop(str(run), 1) is not None
    recorded = runs.early_stop(str(run))
    assert recorded == {"step": 100, "best_step": 50, "best_val_cider": 7.5, "patience": 1}
    _checkpoint(run, 150)
    runs.record_validation(str(run), 150, {"val_cider": 6.0, "val_images": 64})
    runs.check_early_stop(str(run), 1)
    assert runs.early_stop(str(run)) == recorded  # the first stop stays the record
    assert runs.early_stop(str(tmp_path / "none")) is None


def test_pruning_keeps_the_best_and_the_latest(tmp_path):
    """train.num_to_keep without Ray (as Ray Train's CheckpointConfig with a score): the best ones by
    val CIDEr stay, and always the latest (to resume); the history of scores stays whole."""
    run = _run(tmp_path, {10: 5.0, 20: 7.0, 30: 6.0, 40: 4.0, 50: None})
    runs.prune(str(run), 1, 2)
    assert [c.step for c in runs.checkpoints(str(run), 1)] == [20, 30, 50]
    assert [s for s, _ in runs.validations(str(run))] == [10, 20, 30, 40]
    runs.prune(str(run), 1, 1)
    assert [c.step for c in runs.checkpoints(str(run), 1)] == [20, 50]


def test_selection_and_early_stop_keys_are_checked():
    with pytest.raises(ConfigError, match="train.select"):
        load_config("demo", ["train.select=first"])
    with pytest.raises(ConfigError, match="train.early_stop_patience"):
        load_config("demo", ["train.early_stop_patience=-1"])
    with pytest.raises(ConfigError, match="eval.validation"):
        load_config("demo", ["eval.validation=later"])
    cfg = load_config("demo")
    assert cfg.train.early_stop_patience == 0 and cfg.eval.validation == "inline"
    recipe = load_config("internvl2_2b_coco", ["eval.validation=async"])
    assert (recipe.eval.validation_gpus, recipe.eval.validation_cpus) == (1, 1)


def test_the_reported_score_survives_rays_json_state():
    """The CI report: a rerun after a driver kill failed in Ray Train's controller ("unsupported operand
    type(s) for *: 'float' and 'NoneType'"): an unvalidated checkpoint was reported with score -inf,
    which Ray's checkpoint state (JSON) restores as null. The score is plain JSON, below any CIDEr."""
    from raylora.validation import SCORE, reported_metrics

    unscored = reported_metrics({"step": 4, "total_steps": 12, "loss": 4.2})
    assert json.loads(json.dumps(unscored, allow_nan=False)) == unscored
    assert unscored[SCORE] < 0 <= reported_metrics({"step": 8, "val_cider": 0.0})[SCORE]
