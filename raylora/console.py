"""What the commands print, and what they keep off the console.

By default a command shows its own lines: where things are (dashboard, MLflow run, output folder),
the data report, one progress bar, the validation scores and the summary. The libraries' notices and
warnings that do not concern the user are switched off where they start: Python warnings filters and
logger levels here (:func:`quiet_libraries`), Ray's ``log_to_driver`` and logging level
(``raylora.cluster``), Tune's verbosity, Ray Data's console handler. The Ray processes get the same
environment and write their output to the Ray session's log folder, not to the console.
``--verbose`` (or ``RAYLORA_VERBOSE=1``) leaves every library at its defaults and streams every Ray
process's output to the console, for debugging.

Errors: one readable ``error: ...`` line on stderr, and the traceback in a log file under the output
folder (:func:`run_command`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any, TextIO

from raylora.files import NoSpaceError, cache_root

VERBOSE_ENV = "RAYLORA_VERBOSE"

# Errors a user can act on (bad config, path, data, source, cluster): exit 2 unless ``codes`` says otherwise.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)
# Errors whose message is the whole story (shown without their type), whatever their exit code.
READABLE_ERRORS: tuple[type[BaseException], ...] = (*USER_ERRORS, NoSpaceError)

# Library loggers whose INFO/WARNING records are notices for library developers or operators, not for
# someone running raylora: (logger, level it is set to by default).
QUIET_LOGGERS = {
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables..." (if imported already)
    "ray._private.authentication": logging.ERROR,  # "Token authentication is enabled ..." (it stays on)
}
# Loggers that set their own level when their library is imported: a filter drops what is below.
FILTERED_LOGGERS = {
    "DeepSpeed": logging.ERROR,  # "Setting accelerator to CPU" when a command imports DeepSpeed
    # "No CUDA runtime is found, using CUDA_HOME=..." when DeepSpeed imports it on a machine without a GPU
    "torch.utils.cpp_extension": logging.ERROR,
}

# Environment of this process and of the Ray processes it starts (raylora.cluster.runtime_env),
# read by the libraries when they are imported (MLflow's URL and bar settings: each time used).
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # MLflow's "🏃 View run ... at: ..." / "🧪 View experiment at: ..." lines, written to stdout when a
    # run on a tracking server ends (raylora prints its own MLflow line)
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # MLflow's artifact download and upload bars (tqdm), drawn even into a log file
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' "Loading weights" bars
    # Tune's console output engine that is silent at verbose=0 (the new one prints its experiment
    # header, search algorithm and TensorBoard hint at any verbosity); the sweep shows its own table
    "RAY_AIR_NEW_OUTPUT": "0",
}

# Warnings about the libraries' own future (their deprecations), not about what the user asked for.
QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class BelowLevel(logging.Filter):
    """Drops a logger's records below ``level`` (whatever level the library sets on it)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def verbose() -> bool:
    """``--verbose`` or ``RAYLORA_VERBOSE`` (any value but empty, 0, false, no, off)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--verbose`` option every command shares."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every library's logs, warnings and progress bars and the traceback of an error "
        f"(also {VERBOSE_ENV}=1); default: raylora's own lines only",
    )


def quiet_env() -> dict[str, str]:
    """Environment variables for the Ray processes of a command: the quiet defaults (not over the
    user's own values) and ``RAYLORA_VERBOSE`` when set."""
    if verbose():
        return {VERBOSE_ENV: os.environ[VERBOSE_ENV]}
    return {k: os.environ.get(k, v) for k, v in QUIET_ENV.items()}


def quiet_libraries() -> None:
    """Switch off, in this process, the library notices and warnings that do not concern the user
    (nothing with ``--verbose``). Safe to call more than once, in the driver and in Ray workers."""
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level < level:  # a level the user set higher stays
            logger.setLevel(level)
    for name, level in FILTERED_LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, BelowLevel) for f in logger.filters):
            logger.addFilter(BelowLevel(level))
    if "transformers" in sys.modules:  # imported before the environment above could take effect
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------ errors

_log_dir: Path | None = None


def log_errors_to(folder: str | os.PathLike) -> None:
    """An error of this command from now on is logged under ``<folder>/logs/`` (the command's output
    folder); before that, and for commands whose output is a checkpoint folder that appears only
    when complete (merge, convert) or that have none, under the raylora cache (``~/.cache/raylora/logs``)."""
    global _log_dir
    _log_dir = Path(folder) / "logs"


def error_log_dir() -> Path:
    return _log_dir or cache_root() / "logs"


def root_cause(error: BaseException) -> BaseException:
    """The exception behind Ray's wrappers: a failed training worker (the lowest rank), a failed
    controller, a remote task's own exception. Other exceptions are their own root (a user error
    raised ``from`` a library error keeps its own, readable message)."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)  # ray.train WorkerGroupError
        if isinstance(failures, dict) and failures:
            nxt = failures[min(failures)]
        elif type(error).__module__.startswith("ray."):  # ControllerError, RayTaskError, ...
            nxt = getattr(error, "controller_failure", None) or getattr(error, "cause", None)
        else:
            break
        if not isinstance(nxt, BaseException):
            break
        error = nxt
    return error


def headline(error: BaseException, typed: bool = False) -> str:
    """What the console says of ``error``: the message of a user error (raylora writes them to be
    read), else type and first line of what caused it (Ray's wrappers unwrapped); ``typed``: the
    type in front in any case."""
    root = root_cause(error)
    text = str(root).strip()
    if root is error and isinstance(error, READABLE_ERRORS) and text and not typed:
        return text
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(root).__name__}: {first}" if first else type(root).__name__


def write_error_log(command: str, error: BaseException) -> Path | None:
    """The command line, the time and the full traceback in ``<log dir>/<command>-<time>.log``.

    A folder that cannot take it (a full disk, no permission) is skipped for the next one: the
    command's log folder, then the raylora cache's, then the system's temporary folder. None when
    none can (the caller says the log is lost); a partly written file is removed."""
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    text = (
        f"command: {shlex.join(getattr(sys, 'orig_argv', sys.argv))}\n"
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        f"error: {headline(error)}\n\n" + "".join(traceback.format_exception(error))
    )
    folders = [error_log_dir(), cache_root() / "logs", Path(tempfile.gettempdir()) / "raylora-logs"]
    for folder in dict.fromkeys(folders):
        path = folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a command cleans up as on Ctrl-C (its MLflow run
    ends KILLED, temporary folders are removed)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def run_command(
    body: Callable[[], object],
    codes: Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], int]] = (),
    command: str = "raylora",
    verbose_flag: bool = False,
) -> int:
    """Run a command's body: its exit code (an int it returns, else 0).

    ``verbose_flag`` (``--verbose``) sets RAYLORA_VERBOSE for this process and the Ray processes it
    starts; otherwise the libraries are quieted first. An exception becomes one ``error: ...`` line on
    stderr naming the log file that holds its traceback (printed too with ``--verbose``). ``codes``
    maps exception types to exit codes, first match wins; other user errors exit 2, anything else
    (a failed worker, a bug) 1. Ctrl-C exits 130, SIGTERM 143 (both unwind the command first).
    """
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    quiet_libraries()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        result = body()
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print("\nterminated" if terminated else "\ninterrupted", file=sys.stderr, flush=True)
        return 143 if terminated else 130
    except Exception as e:
        code = next((c for types, c in codes if isinstance(e, types)), None)
        expected = code is not None or isinstance(e, USER_ERRORS)
        log = write_error_log(command, e)
        if verbose():
            traceback.print_exception(e, file=sys.stderr)
        where = (
            f"traceback: {log}"
            if log
            else "traceback not saved: no log folder could take it; rerun with --verbose to see it"
        )
        print(f"error: {headline(e)} ({where})", file=sys.stderr, flush=True)
        return code if code is not None else 2 if expected else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


# -------------------------------------------------------------------------------------- progress


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def step_line(step: int, total: int, m: dict[str, float]) -> str:
    """``[train] step 40/150 loss 1.1700 lr 1.2e-03 72.1 samples/s 1796 tok/s ETA 33s``."""
    eta = m.get("eta", float("inf"))
    return (
        f"[train] step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
        f"{m['samples_per_s']:.1f} samples/s {m['tokens_per_s']:.0f} tok/s "
        + (f"ETA {eta:.0f}s" if eta < float("inf") else "ETA ?")
    )


class StepProgress:
    """A training run's progress on the driver, from rank 0's events (:class:`ProgressChannel`).

    On a terminal: one tqdm bar (step, loss, samples/s, ETA) with the other lines printed above it.
    Otherwise (a log file, CI): one plain line per logged step. An event is a dict with ``step`` and
    any of ``metrics`` (a logged step) and ``line`` (a line to print: validation CIDEr, notices).
    """

    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None):
        self.total = total
        self.stream = stream or sys.stdout
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.bar: Any = None

    def handle(self, event: dict[str, Any]) -> None:
        step, metrics, line = event.get("step"), event.get("metrics"), event.get("line")
        if not self.tty:
            if line:
                print(line, file=self.stream, flush=True)
            if metrics:
                print(step_line(step, self.total, metrics), file=self.stream, flush=True)
            return
        if line:
            self.write(line)
        if step is not None and (metrics or not line):  # a logged step or a tick; lines do not move the bar
            self.advance(step, metrics)

    def write(self, line: str) -> None:
        if self.bar is None:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)

    def advance(self, step: int, metrics: dict[str, float] | None) -> None:
        if self.bar is None or step < self.bar.n:  # the first step, or restarted from a checkpoint
            self.close()
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=step,
                desc="[train]",
                unit="step",
                file=self.stream,
                **self.width(),
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
            )
        if metrics:
            self.bar.set_postfix_str(
                f"loss {metrics['loss']:.4f}, {metrics['samples_per_s']:.1f} samples/s", refresh=False
            )
        self.bar.update(step - self.bar.n)

    def width(self) -> dict[str, Any]:
        """tqdm's size: the terminal's, following resizes; 100 x 24 when the terminal reports none (a
        pseudo-terminal without a size, where tqdm would draw nothing)."""
        try:
            size = os.get_terminal_size(self.stream.fileno())
        except (AttributeError, OSError, ValueError):
            size = os.terminal_size((0, 0))
        return {"dynamic_ncols": True} if min(size) > 0 else {"ncols": 100, "nrows": 24}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ProgressChannel:
    """Rank 0 -> the driver: a Ray queue (an actor without CPU) that rank 0 puts events on and a
    driver thread hands to a :class:`StepProgress`. Only the handle (:attr:`queue`) travels to the
    workers; :func:`send` is what they call."""

    def __init__(self, progress: StepProgress):
        from ray.util.queue import Queue

        self.progress = progress
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.drain, name="raylora-progress", daemon=True)
        self.thread.start()

    def drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                event = self.queue.get(timeout=0.5)
            except Empty:
                if self.stopped.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone (the cluster shut down): nothing more to show
                return
            try:
                self.progress.handle(event)
            except Exception:  # a display problem never stops training
                continue

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)
        self.progress.close()
        import ray

        try:
            ray.kill(self.queue.actor)
        except Exception:
            pass


def send(queue: Any, event: dict[str, Any]) -> bool:
    """On rank 0: put ``event`` on the driver's queue; False when the driver is gone (a killed driver
    must not fail the workers)."""
    try:
        queue.put(event, timeout=10)
    except Exception:
        return False
    return True


@contextmanager
def library_prints() -> Iterator[None]:
    """A library's own ``print`` calls inside (DeepSpeed's "... built successfully" when it sets up its
    CPU communication) are dropped, unless ``--verbose``."""
    if verbose():
        yield
        return
    with redirect_stdout(StringIO()):
        yield


@contextmanager
def step_progress(total: int) -> Iterator[ProgressChannel]:
    """A :class:`ProgressChannel` to a :class:`StepProgress` of ``total`` steps on stdout, closed (bar
    finished, every event shown) on exit. The bar starts at the first step rank 0 reports (a resumed
    run's, after its checkpoint)."""
    channel = ProgressChannel(StepProgress(total))
    try:
        yield channel
    finally:
        channel.close()
