"""The package's shape: one import direction, no cycles, no reaching into another module's privates."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "raylora"

# Bottom to top; a module may import its own layer or lower ones (function-local imports included).
LAYERS = [
    ["telemetry", "versions", "device_audit", "files", "console", "pages", "metrics"]
    + ["metrics.ptb", "metrics.cider", "metrics.coco"],
    ["config", "monitoring", "cluster"],
    ["data", "data.images", "data.records", "data.templates"],
    ["data.shards"],
    ["data.readers"],
    ["families.base"],
    ["families.internvl.templates", "families.internvl.tiling", "families.qwen_vl.family"],
    ["families.internvl.family", "families.qwen_vl.tiny"],
    ["families.internvl", "families.internvl.tiny", "families.qwen_vl"],
    ["families"],
    ["data.settings", "data.plan", "data.pipeline"],
    ["data.prepare"],
    ["model", "generation", "convert", "loss"],
    ["tracking", "runs"],
    ["registry"],
    ["sources"],
    ["validation"],
    ["serving", "serving_model", "serve_api"],
    ["serve_app"],
    ["demo"],
    ["cli"],
    ["recipe"],
    ["driver"],
    ["train", "evaluate", "sweep", "merge", "caption", "serve", "data.__main__", "__init__", "__main__"],
]
LAYER = {f"raylora.{m}" if m != "__init__" else "raylora": i for i, ms in enumerate(LAYERS) for m in ms}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every raylora import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("raylora")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raylora"):
            for a in node.names:
                target = f"{node.module}.{a.name}"
                found.append((target if target in LAYER else node.module, a.name, node.lineno))
    return found


MODULES = _modules()


def test_every_module_has_a_layer():
    assert set(MODULES) <= set(LAYER), sorted(set(MODULES) - set(LAYER))


def test_imports_go_down_the_layers():
    wrong = [
        f"{name}:{line} imports {target} (layer {LAYER[target]} > {LAYER[name]})"
        for name, tree in MODULES.items()
        for target, _, line in _imports(name, tree)
        if LAYER[target] > LAYER[name]
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in _imports(name, tree) if t != name} for name, tree in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_private_names_across_modules():
    leaks = []
    for name, tree in MODULES.items():
        for target, imported, line in _imports(name, tree):
            if imported.startswith("_") and target != name:
                leaks.append(f"{name}:{line} imports {target}.{imported}")
        aliases = {
            a.asname or a.name.rsplit(".", 1)[-1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom | ast.Import)
            for a in node.names
            if (getattr(node, "module", None) or a.name).startswith("raylora")
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                leaks.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not leaks, leaks


def test_only_cli_and_commands_know_the_demo():
    users = {
        name for name, tree in MODULES.items() for t, _, _ in _imports(name, tree) if t == "raylora.demo"
    }
    assert users <= {"raylora.cli", "raylora.merge"}, users


def test_image_settings_built_in_one_function():
    calls = [
        f"{name}:{node.lineno}"
        for name, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ImageSettings"
    ]
    assert len(calls) == 1, calls


def test_commands_have_no_function_over_60_lines():
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name in ("raylora.recipe", "raylora.driver", "raylora.train", "raylora.sweep", "raylora.merge")
        for node in ast.walk(MODULES[name])
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long


# Names that belong to one model family (its classes, image tokens, LLMs): only in that family's
# folder under raylora/families/ and in the original-format converter. The registry
# (raylora/families/__init__.py) imports each family by module name; the two recipe defaults below
# and the demo base's family are values, not knowledge.
FAMILY_NAMES = re.compile(
    r"internvl|internlm|qwen|img_context|<img>|</img>|vision_start|image_pad|gotocr", re.I
)
FAMILY_NAME_VALUES = {
    ("raylora.cli", "internvl2_2b_coco"),  # the default recipe's config name
    ("raylora.cli", "pretrained/InternVL2-2B"),  # the default recipe's checkpoint folder
    ("raylora.config", "pretrained/InternVL2-2B"),
    ("raylora.demo", "internvl"),  # DEMO_FAMILY: the demo base's family, by name
}


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef)]
    return {
        id(n.body[0].value)
        for n in nodes
        if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
    }


def _names_and_strings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, text) of every identifier, imported name and non-docstring string constant."""
    docs, found = _docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            found.append((node.lineno, node.name))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, node.module or "")] + [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found.append((node.lineno, node.value))
    return found


def test_family_names_only_in_their_family_modules():
    """Done when a family's knowledge lives in its folder: no module outside raylora/families/<family>/
    (and the converter) names InternVL's or Qwen-VL's classes, tokens or LLMs."""
    leaks = [
        f"{name}:{line}: {text[:80]!r}"
        for name, tree in MODULES.items()
        if not name.startswith(("raylora.families.internvl", "raylora.families.qwen_vl"))
        and name not in ("raylora.convert", "raylora.families")
        for line, text in _names_and_strings(tree)
        if FAMILY_NAMES.search(text) and (name, text) not in FAMILY_NAME_VALUES
    ]
    assert not leaks, leaks


def test_the_family_names_check_catches_a_leak():
    """Negative control: the check above finds a family's token or class named outside its folder."""
    tree = ast.parse('from transformers import Qwen2VLImageProcessor\nTOKEN = "<IMG_CONTEXT>"\n')
    found = [text for _, text in _names_and_strings(tree) if FAMILY_NAMES.search(text)]
    assert found == ["Qwen2VLImageProcessor", "<IMG_CONTEXT>"]


# File contracts, each spelled in one module: a checkpoint folder's layout (runs), a model's record
# (model), a run folder's record (runs)
FILE_CONTRACTS = {
    "train_state.json": "raylora.runs",
    "raylora_run.json": "raylora.runs",
    "raylora.json": "raylora.model",
}


def test_each_file_contract_is_spelled_in_one_module():
    spelled = {
        f"{name}:{line}: {text!r}"
        for name, tree in MODULES.items()
        for line, text in _names_and_strings(tree)
        for contract, owner in FILE_CONTRACTS.items()
        if contract in text and name != owner
    }
    assert not spelled, sorted(spelled)
