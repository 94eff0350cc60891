"""``raylora VERB [ARGS ...]`` (or ``python -m raylora VERB ...``): every raylora command under one name.

Each verb hands the rest of the command line to a command's own ``main``, so ``raylora train ...``
is ``python -m raylora.train ...`` with the same options and help. Only the chosen command is
imported: ``raylora --help`` answers without loading torch or Ray.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module whose main(argv) runs it, one line for `raylora --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("raylora.train", "LoRA training: the recipe if its model and data are present, else the demo"),
    "sweep": ("raylora.sweep", "Ray Tune sweep; the champion into the MLflow registry, merged and servable"),
    "evaluate": ("raylora.evaluate", "caption a split with Ray Data, COCO metrics, gallery"),
    "merge": ("raylora.merge", "merge LoRA into a plain, verified Hugging Face checkpoint"),
    "caption": ("raylora.caption", "caption images with the evaluation protocol"),
    "serve": ("raylora.serve", "every adapter of a base model behind an OpenAI-compatible API (Ray Serve)"),
    "convert": (
        "raylora.convert",
        "an original-format (remote-code) checkpoint -> native transformers layout",
    ),
    "data": ("raylora.data.__main__", "pre-flight report on a caption dataset (an annotation file)"),
    "demo": ("raylora.demo", "build (or rebuild) the cached demo assets"),
}
VERB_NAMES = {"data": "data check"}  # how a verb is shown when it takes a sub-verb


USAGE = "usage: raylora VERB [ARGS ...]      (also: python -m raylora VERB [ARGS ...])"


def usage() -> str:
    """The text of ``raylora --help``: the verbs, one line each."""
    width = max(len(VERB_NAMES.get(v, v)) for v in COMMANDS)
    lines = [
        USAGE,
        "",
        "LoRA fine-tuning of vision-language models as a Ray application (families: see the README).",
        "",
        "verbs:",
        *(f"  {VERB_NAMES.get(v, v).ljust(width)}  {line}" for v, (_, line) in COMMANDS.items()),
        "",
        "raylora VERB --help shows a verb's options (the same as python -m raylora.VERB --help).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``raylora VERB ARGS``: the verb's command with ARGS; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown verb {argv[0]!r}" if argv else "a verb is required"
        names = ", ".join(VERB_NAMES.get(v, v) for v in COMMANDS)
        print(f"{USAGE}\nraylora: error: {what}; verbs: {names}", file=sys.stderr)
        return 2
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
