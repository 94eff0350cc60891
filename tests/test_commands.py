"""``raylora VERB``: the console script forwards to each command's own ``main``, lazily."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raylora.__main__ import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
VERBS = ["train", "sweep", "evaluate", "merge", "caption", "serve", "convert", "data", "demo"]


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )


def _help(entry, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        entry(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_the_console_script_is_the_dispatcher() -> None:
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["raylora"].partition(":")
    assert getattr(importlib.import_module(module), function) is main
    assert list(COMMANDS) == VERBS
    table = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `raylora ")]
    assert sorted(line.split()[2].strip("`") for line in table) == sorted(VERBS)  # the README table


@pytest.mark.parametrize("verb", VERBS)
def test_a_verb_is_its_command(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``raylora VERB --help`` is the command's own help (the same options, the same text)."""
    module = importlib.import_module(COMMANDS[verb][0])
    sub = ["check"] if verb == "data" else []
    assert _help(main, [verb, *sub, "--help"], capsys) == _help(module.main, [*sub, "--help"], capsys)


def test_python_dash_m_raylora_forwards_like_the_module_form() -> None:
    via_verb = _python("-m", "raylora", "train", "--help")
    via_module = _python("-m", "raylora.train", "--help")
    assert via_verb.returncode == via_module.returncode == 0, via_verb.stderr
    assert via_verb.stdout == via_module.stdout and "--config" in via_verb.stdout
    check = _python("-m", "raylora", "data", "check", "--help")
    assert check.returncode == 0 and check.stdout == _python("-m", "raylora.data", "check", "--help").stdout


def test_help_lists_every_verb_without_loading_torch_or_ray() -> None:
    probe = (
        "import sys; from raylora.__main__ import main; main(['--help']); "
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'mlflow') if m in sys.modules))"
    )
    out = _python("-c", probe)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "[]"  # nothing heavy imported
    for verb in ("train", "sweep", "evaluate", "merge", "caption", "serve", "convert", "data check", "demo"):
        assert sum(line.startswith(f"  {verb}  ") for line in lines) == 1, verb


@pytest.mark.parametrize("argv", [["frobnicate"], []], ids=["unknown verb", "no verb"])
def test_a_wrong_verb_names_the_verbs(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "verbs: train, sweep, evaluate, merge, caption, serve, convert, data check, demo" in err
    assert ("unknown verb 'frobnicate'" if argv else "a verb is required") in err
