"""Where config and command line meet: the options every config-driven command shares, the
recipe-or-demo default, and the expansion of the ``demo`` alias into real paths (the only place it
is expanded: the rest of raylora sees ordinary model and data paths)."""

from __future__ import annotations

import argparse
from pathlib import Path

from raylora import demo
from raylora.config import Config, ConfigError, load_config
from raylora.console import add_verbose_flag
from raylora.families import AUTO, named_templates

DEMO = "demo"  # model.path / data.train / --model value that selects the built-in demo assets
RECIPE_CONFIG = "internvl2_2b_coco"
RECIPE_PATHS = ("pretrained/InternVL2-2B", "data/coco")  # the tutorial's layout


def default_config_name(overrides: list[str] | None = None) -> str:
    """The recipe when its model and data are present in the working directory, else the demo
    (with a line saying which parts of the run are the demo's and which are the command line's)."""
    missing = [p for p in RECIPE_PATHS if not Path(p).exists()]
    if not missing:
        return RECIPE_CONFIG
    print(demo_notice(missing, load_config(DEMO, overrides)), flush=True)
    return DEMO


def demo_notice(missing: list[str], cfg: Config) -> str:
    """The line that says why the demo config runs (the recipe paths ``missing``) and, for the model
    and the data, whether they are the demo's or the user's (``model.path`` / ``data.train`` given)."""
    model = "the demo's model" if cfg.model.path == DEMO else f"your model (model.path={cfg.model.path})"
    data = "the demo's data" if cfg.data.train == DEMO else f"your data (data.train={cfg.data.train})"
    why = " and ".join(missing) + " not found"
    if len(missing) < len(RECIPE_PATHS):
        present = next(p for p in RECIPE_PATHS if p not in missing)
        why += f" ({present} is there, but the recipe needs both)"
    return (
        f"[raylora] {why}: running the built-in demo config (tune_configs/demo.yaml) with {model} and {data}"
    )


def config_parser(prog: str, doc: str | None, overrides_example: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every config-driven command shares."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", help="YAML file or name in tune_configs/ (default: the recipe if present, else demo)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {overrides_example}"
    )
    add_verbose_flag(parser)
    return parser


def expand_demo(cfg: Config) -> Config:
    """Replace ``model.path: demo`` / ``data.train: demo`` by the cached demo assets (built on first use)."""
    if DEMO not in (cfg.model.path, cfg.data.train):
        return cfg
    assets = demo.ensure_demo()
    if cfg.model.path == DEMO:
        cfg.model.path = str(assets / "base")
    if cfg.data.train == DEMO:
        for key, value in demo.data_paths(assets).items():
            setattr(cfg.data, key, str(value))
    return cfg


def model_spec(spec: str) -> str:
    """A ``--model`` value with the ``demo`` alias expanded to the demo base checkpoint."""
    if spec != DEMO:
        return spec
    return str(demo.ensure_demo() / "base")


def load(name: str | Path, overrides: list[str] | None = None) -> Config:
    """A config as the commands use it: loaded, template checked, ``demo`` expanded."""
    cfg = load_config(name, overrides)
    known = named_templates()
    if cfg.model.template not in (AUTO, *known):
        raise ConfigError(f"model.template {cfg.model.template!r} unknown; valid: auto, {', '.join(known)}")
    return expand_demo(cfg)


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    overrides = list(args.overrides) + (extra or [])
    return load(args.config or default_config_name(overrides), overrides)
