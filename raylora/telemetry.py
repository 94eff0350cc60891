"""What raylora lets its libraries send home: nothing, unless the user opts in.

MLflow (since 3.x) starts a telemetry thread when it is imported, Ray reports usage statistics from
a cluster it starts, and the Hugging Face hub client sends usage headers. A training job on a
private cluster should talk to nothing but the services it was pointed at, so raylora switches each
of them off through its library's own switch, in its own process (before the library is imported:
``import raylora`` does it) and in every Ray process it starts (``raylora.cluster.runtime_env``):

- ``MLFLOW_DISABLE_TELEMETRY=true``, ``RAY_USAGE_STATS_ENABLED=0``, ``HF_HUB_DISABLE_TELEMETRY=1``;
- a value the user set for any of these is kept (``MLFLOW_DISABLE_TELEMETRY=false`` opts in to
  MLflow's telemetry alone);
- ``RAYLORA_TELEMETRY=1`` leaves every library at its own default (opting in to all of them), except
  that ``DO_NOT_TRACK`` (any value but empty, 0, false, no) always wins: everything stays off.
"""

from __future__ import annotations

import os

OPT_IN_ENV = "RAYLORA_TELEMETRY"
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def telemetry_env() -> dict[str, str]:
    """The telemetry switches for this process and its Ray processes ({} when the user opted in)."""
    if _truthy(os.environ.get(OPT_IN_ENV)) and not _truthy(os.environ.get("DO_NOT_TRACK")):
        return {}
    if _truthy(os.environ.get("DO_NOT_TRACK")):
        return dict(TELEMETRY_OFF)  # DO_NOT_TRACK wins over any opt-in
    return {key: os.environ.get(key, value) for key, value in TELEMETRY_OFF.items()}


def disable_telemetry() -> None:
    """Set the switches in this process's environment (before MLflow, Ray or the hub are imported)."""
    os.environ.update(telemetry_env())
