"""What the commands print: one error line with a traceback log, quiet libraries unless --verbose,
one progress display, and a demo train whose console holds raylora's lines and no library noise."""

from __future__ import annotations

import importlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from raylora import console
from raylora.console import StepProgress, headline, run_command

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def quiet_state(monkeypatch: pytest.MonkeyPatch):
    """A clean console state: no RAYLORA_VERBOSE, the quiet environment and logger levels restored."""
    for key in (console.VERBOSE_ENV, *console.QUIET_ENV):
        monkeypatch.setenv(key, "")  # recorded, so that what quiet_libraries sets is undone afterwards
        monkeypatch.delenv(key)
    levels = {name: logging.getLogger(name).level for name in console.QUIET_LOGGERS}
    monkeypatch.setattr(console, "_log_dir", None)
    hf = sys.modules.get("transformers") and importlib.import_module("transformers.utils.logging")
    hf_state = (hf.get_verbosity(), hf.is_progress_bar_enabled()) if hf else None
    with warnings.catch_warnings():
        yield monkeypatch
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for name in console.FILTERED_LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, console.BelowLevel)]:
            logger.removeFilter(f)
    if hf:
        hf.set_verbosity(hf_state[0])
        (hf.enable_progress_bar if hf_state[1] else hf.disable_progress_bar)()


# ------------------------------------------------------------------------------------------ errors


def _fail(error: BaseException):
    def body() -> None:
        raise error

    return body


def test_a_user_error_is_one_line_and_its_traceback_goes_to_the_output_folder(quiet_state, tmp_path, capsys):
    console.log_errors_to(tmp_path / "out")
    assert run_command(_fail(ValueError("data.train 'x.jsonl' does not exist")), command="train") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (log,) = (tmp_path / "out" / "logs").glob("train-*.log")
    assert err.startswith("error: data.train 'x.jsonl' does not exist") and str(log) in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ValueError: data.train" in text


def test_an_unexpected_error_exits_1_with_one_line_and_verbose_shows_the_traceback(
    quiet_state, tmp_path, capsys
):
    console.log_errors_to(tmp_path)
    assert run_command(_fail(TypeError("unsupported operand")), command="sweep") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: TypeError: unsupported operand (traceback: ")
    assert run_command(_fail(TypeError("again")), command="sweep", verbose_flag=True) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error:")
    assert os.environ[console.VERBOSE_ENV] == "1"


def test_exit_codes_and_the_log_folder_before_the_output_is_known(quiet_state, tmp_path, capsys):
    quiet_state.setenv("RAYLORA_CACHE", str(tmp_path / "cache"))

    class MergeError(RuntimeError):
        pass

    assert run_command(_fail(MergeError("logits differ")), codes=[(MergeError, 1)], command="merge") == 1
    assert run_command(lambda: 3) == 3 and run_command(lambda: {"steps": 1}) == 0
    assert len(list((tmp_path / "cache" / "logs").glob("merge-*.log"))) == 1
    assert "error: logits differ" in capsys.readouterr().err


def test_headline_unwraps_ray_wrappers():
    class WorkerGroupError(Exception):  # the shape of ray.train.WorkerGroupError
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\n[Rank 1 Error Snippet]: ...")
            self.worker_failures = failures

    crash = RuntimeError("RAYLORA_FAIL_AT_STEP: simulated worker crash at step 3\nmore lines")
    wrapped = WorkerGroupError({1: crash, 0: KeyError("x")})
    assert headline(wrapped) == "KeyError: 'x'"  # the lowest failed rank
    assert headline(WorkerGroupError({1: crash})) == (
        "RuntimeError: RAYLORA_FAIL_AT_STEP: simulated worker crash at step 3"
    )
    assert headline(crash) == str(crash)  # a user error raised here: its whole message
    assert (
        headline(crash, typed=True) == "RuntimeError: RAYLORA_FAIL_AT_STEP: simulated worker crash at step 3"
    )
    try:
        try:
            raise AssertionError("image ids not in the results")
        except AssertionError as e:
            raise ValueError("results.json: image ids not in gt.json") from e
    except ValueError as e:
        assert headline(e) == "results.json: image ids not in gt.json"  # not what it was raised from


# ---------------------------------------------------------------------------------------- verbosity


def test_quiet_by_default_library_defaults_with_verbose(quiet_state):
    from raylora.cluster import console_options, runtime_env

    console.quiet_libraries()
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert logging.getLogger("ray._private.authentication").level == logging.ERROR
    assert any(f[0] == "ignore" and f[2] is FutureWarning for f in warnings.filters)
    assert console_options() == {"log_to_driver": False, "logging_level": logging.WARNING}
    env = runtime_env()["env_vars"]
    assert env["TRANSFORMERS_VERBOSITY"] == "error" and console.VERBOSE_ENV not in env

    for key in console.QUIET_ENV:
        quiet_state.delenv(key, raising=False)
    quiet_state.setenv(console.VERBOSE_ENV, "1")
    with warnings.catch_warnings():
        warnings.resetwarnings()
        console.quiet_libraries()
        assert not warnings.filters  # no filter added: Python's and the libraries' defaults
    assert "TRANSFORMERS_VERBOSITY" not in os.environ
    assert console_options() == {"log_to_driver": True}  # every worker's output, Ray's own levels
    assert runtime_env()["env_vars"][console.VERBOSE_ENV] == "1"
    quiet_state.setenv(console.VERBOSE_ENV, "0")
    assert not console.verbose()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (a SQLite store, one worker), as a two-node cluster runs it; its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
    ]
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # imports, database set-up: minutes on a busy machine
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not answer /health; output:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_mlflow_prints_no_run_links_when_a_run_ends_on_a_server(quiet_state, mlflow_server, capsys):
    """MLflow writes "🏃 View run NAME at: URL" and "🧪 View experiment at: URL" to stdout when a run
    on a tracking server ends; raylora prints its own [mlflow] line, so MLflow's are off (and back,
    MLflow's default, with --verbose)."""
    from raylora import tracking

    exp_id = tracking.client(mlflow_server).create_experiment(f"links-{uuid.uuid4().hex[:6]}")

    def end_a_run() -> str:
        run_id = tracking.create_run(exp_id, "train", uri=mlflow_server)
        tracking.end_run(run_id, "FINISHED", mlflow_server)
        return capsys.readouterr().out

    console.quiet_libraries()
    out = end_a_run()
    assert "View run" not in out and "View experiment" not in out, out

    for key in console.QUIET_ENV:
        quiet_state.delenv(key, raising=False)
    quiet_state.setenv(console.VERBOSE_ENV, "1")
    console.quiet_libraries()
    out = end_a_run()
    assert f"🏃 View run train at: {mlflow_server}/#/experiments/{exp_id}/runs/" in out, out
    assert f"🧪 View experiment at: {mlflow_server}/#/experiments/{exp_id}" in out, out


@pytest.mark.parametrize(
    "module",
    ["train", "sweep", "evaluate", "merge", "caption", "serve", "convert", "demo", "data.__main__"],
)
def test_every_command_has_verbose(module, capsys):
    main = importlib.import_module(f"raylora.{module}").main
    with pytest.raises(SystemExit) as exc:
        main(["check", "--help"] if module == "data.__main__" else ["--help"])
    assert exc.value.code == 0 and "--verbose" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- progress

METRICS = {"loss": 1.1712, "lr": 1.2e-3, "samples_per_s": 72.1, "tokens_per_s": 1796.0, "eta": 33.2}


def test_progress_is_one_plain_line_per_logged_step_when_not_a_terminal():
    out = io.StringIO()
    p = StepProgress(150, stream=out, tty=False)
    p.handle({"step": 0, "line": "[train] trainable params 90,112 of 882,240 (10.21%)"})
    p.handle({"step": 39})  # a tick: only a terminal's bar moves
    p.handle({"step": 40, "metrics": METRICS})
    p.handle({"step": 50, "line": "[eval] step 50: val CIDEr 2.653 on 64 images (greedy)"})
    p.close()
    assert out.getvalue().splitlines() == [
        "[train] trainable params 90,112 of 882,240 (10.21%)",
        "[train] step 40/150 loss 1.1712 lr 1.20e-03 72.1 samples/s 1796 tok/s ETA 33s",
        "[eval] step 50: val CIDEr 2.653 on 64 images (greedy)",
    ]


def test_progress_is_one_bar_on_a_terminal():
    out = io.StringIO()
    p = StepProgress(150, stream=out, tty=True)
    p.handle({"step": 0, "line": "[train] trainable params 90,112"})
    p.handle({"step": 39})
    p.handle({"step": 40, "metrics": METRICS})
    p.handle({"step": 50, "line": "[eval] step 50: val CIDEr 2.653"})
    p.handle({"step": 20, "line": "[train] resumed from the checkpoint at step 20/150"})
    p.handle({"step": 21})  # after a restart the bar starts again at the checkpoint
    p.handle({"step": 150})
    p.close()
    text = out.getvalue()
    assert "[train] step" not in text  # no plain step lines: the bar
    assert "40/150" in text and "loss 1.1712, 72.1 samples/s" in text and "150/150" in text
    assert "\n[eval] step 50: val CIDEr 2.653\n" in text.replace("\r", "\n")


def test_the_sweep_shows_one_line_per_trial_event():
    from raylora.sweep import TrialBoard

    lines: list[str] = []
    board = TrialBoard(echo=lambda text, flush: lines.append(text))
    params = {"lora.rank": 8, "train.lr": 2e-3}
    board.started("a_00001", params)
    board.result("a_00001", params, {"step": 10, "total_steps": 20, "val_cider": 3.1})
    board.result("a_00001", params, {"step": 10, "total_steps": 20})  # no score: no line
    board.complete("a_00001", params)
    board.started("a_00002", params)
    board.result("a_00002", params, {"step": 20, "total_steps": 20, "val_cider": 3.2})
    board.complete("a_00002", params)
    board.failed("a_00003", params, "RuntimeError: out of memory")
    assert lines == [
        "[sweep] trial a_00001 started: rank 8, lr 2.00e-03",
        "[sweep] trial a_00001 step 10/20: val CIDEr 3.100",
        "[sweep] trial a_00001 stopped early at step 10",
        "[sweep] trial a_00002 started: rank 8, lr 2.00e-03",
        "[sweep] trial a_00002 step 20/20: val CIDEr 3.200",
        "[sweep] trial a_00002 completed at step 20",
        "[sweep] trial a_00003 failed: RuntimeError: out of memory",
    ]


# ------------------------------------------------------------------------------------ the demo train

NOISE = (
    "Setting accelerator to CPU",
    "TrainingReport(",
    "FutureWarning",
    "DeprecationWarning",
    "Loading weights",
    "PreemptionWatcher",
    "Token authentication is enabled",
    "Progress bars disabled",
    "Creating initial MLflow database tables",
    "(RayTrainWorker pid=",
    "(TrainController pid=",
)


@pytest.mark.slow
def test_demo_train_console_is_raylora_lines_only(tmp_path, demo_root):
    """A short demo train in a process of its own (its own local cluster): the console holds where
    things are, the data report, a line per logged step, each validation CIDEr and the summary;
    none of the libraries' notices."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for key in ("RAY_ADDRESS", console.VERBOSE_ENV):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "raylora.train",
        "--config",
        "demo",
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"output_dir={tmp_path / 'out'}",
        "train.max_steps=4",
        "train.log_every_n_steps=2",
        "eval.every_n_steps=4",
        "data.val_size=8",
        "eval.validation=async",  # the validator actor's output stays out of the console too
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert not [n for n in NOISE if n in out], out
    for expected in (
        "[ray] cluster started locally; dashboard: http://127.0.0.1:",
        "[data] 6000 rows ok, 0 rejected",
        "[mlflow] run ",
        "mlflow ui --backend-store-uri",
        f"outputs: {tmp_path / 'out'}",
        "[train] step 2/4 loss ",
        "[train] step 4/4 loss ",
        "[eval] step 4: val CIDEr ",
        "[done] 4 steps, final loss ",
    ):
        assert expected in out, (expected, out)
    # every line is raylora's own, but the warnings Ray's raylet sends every driver (README)
    ours = ("[ray] ", "[data] ", "[mlflow] ", "[train] ", "[eval] ", "[done] ")
    others = [line for line in out.splitlines() if not line.startswith(ours) and "(raylet)" not in line]
    assert not others, out


def test_the_trial_board_pickles_after_print_is_replaced(monkeypatch):
    """Tune pickles its callbacks with the sweep's state; Ray's progress bars may have replaced
    builtins.print by then (the board must not hold the original)."""
    import builtins

    import ray.cloudpickle

    from raylora.sweep import trial_board

    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: None)
    board = ray.cloudpickle.loads(ray.cloudpickle.dumps(trial_board()))
    assert board.board.rows == {}
