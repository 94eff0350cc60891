"""The library versions raylora's code needs, checked when raylora is imported.

Each floor is the first release that has what raylora calls (the reason is in the table). A package
that is not installed is left to the import that needs it: the recipe without Ray runs where Ray and
MLflow are absent. The same floors are pyproject's.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version

FLOORS: dict[str, tuple[str, str]] = {
    "transformers": ("5.21.0", "logits_to_keep as a 2-D boolean mask (raylora.loss)"),
    "torch": ("2.6", "transformers 5.21 needs it; flex_attention block masks"),
    "peft": ("0.18.0", "the first release that imports with transformers 5"),
    "deepspeed": ("0.16.0", "checkpoints that load under torch>=2.6 (weights_only)"),
    "ray": ("2.51.0", "Ray Train V2 by default (UserCallback, the controller's failure handling)"),
    "mlflow": ("3.2.0", "models logged from code, model ids, MLFLOW_DISABLE_TELEMETRY"),
    "tokenizers": ("0.23.1", "transformers 5.21 needs it"),
}


class VersionError(ImportError):
    """An installed library is older than raylora needs."""


def parse(text: str) -> tuple[int, ...]:
    """The release numbers of a version string ("2.11.0+cu130" -> (2, 11, 0); "5.0.0rc1" -> (5, 0, 0))."""
    numbers = []
    for part in text.split("+")[0].split("."):
        digits = part[: len(part) - len(part.lstrip("0123456789"))]  # the leading digits
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:  # "0rc1": a pre-release of 0
            break
    return tuple(numbers)


def too_old() -> list[str]:
    """One line per installed package below its floor."""
    lines = []
    for package, (floor, why) in FLOORS.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue
        if parse(installed) < parse(floor):
            lines.append(
                f"raylora needs {package}>={floor} ({why}); {installed} is installed: "
                f"pip install -U '{package}>={floor}'"
            )
    return lines


def check_versions() -> None:
    """Raise VersionError naming the first package that is too old; in a raylora command (``raylora``,
    ``python -m raylora...``) print it as one ``error:`` line and exit 2 instead of a traceback.
    ``RAYLORA_SKIP_VERSION_CHECK=1`` skips it (at your own risk)."""
    if os.environ.get("RAYLORA_SKIP_VERSION_CHECK") == "1":
        return
    lines = too_old()
    if not lines:
        return
    command = sys.argv[:1] == ["-m"] or os.path.basename(sys.argv[0] if sys.argv else "") == "raylora"
    if command:
        print(f"error: {lines[0]}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    raise VersionError(lines[0])
