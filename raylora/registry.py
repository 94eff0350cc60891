"""The MLflow Model Registry: versions of adapters and merged models, and the ``champion`` alias.

Adapters are registered as plain artifact folders: ``mlflow.register_model`` refuses those ("Unable
to find a logged_model"), so :func:`register_version` creates the model version from the folder's
artifact URI. Merged models are logged MLflow Models (:mod:`raylora.serving`): their versions point
at the logged model (``models:/<model id>``), as ``mlflow.register_model`` would. The ``champion``
alias only moves to a version whose metric beats the current one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from raylora import tracking
from raylora.files import redact

# mlflow is imported inside the functions (through tracking): it costs seconds at start-up.

MODEL_URI = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?")
RUN_URI = re.compile(r"runs:/([0-9a-zA-Z]+)/(.+?)/?")


@dataclass(frozen=True)
class Version:
    """One registered model version."""

    name: str
    version: int
    run_id: str
    source: str
    tags: dict[str, str]


def _version(mv: Any) -> Version:
    return Version(mv.name, int(mv.version), mv.run_id or "", mv.source, dict(mv.tags))


def get_version(
    name: str, version: int | str | None = None, alias: str | None = None, uri: str | None = None
) -> Version:
    """A version by number or by alias (MlflowException when there is none)."""
    c = tracking.client(uri)
    mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, str(version))
    return _version(mv)


def version_by_alias(name: str, alias: str = "champion", uri: str | None = None) -> Version | None:
    """The version holding ``alias``, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return get_version(name, alias=alias, uri=uri)
    except MlflowException as e:
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def download_uri(name: str, version: int | str, uri: str | None = None) -> str:
    """Where a version's files are (what ``tracking.download`` takes)."""
    return tracking.client(uri).get_model_version_download_uri(name, str(version))


def metric_tag(tags: dict[str, str], key: str) -> float | None:
    """A numeric tag (e.g. ``cider``) as a float, None when absent or not a number."""
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def _ensure_registered_model(c: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            c.create_registered_model(name)
        except MlflowException as e2:  # created by a concurrent process meanwhile
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def register_version(
    name: str,
    source_uri: str,
    run_id: str | None,
    tags: dict[str, Any] | None = None,
    metric_key: str = "cider",
    metric_value: float | None = None,
    alias: str = "champion",
    force_alias: bool = False,
    tracking_uri: str | None = None,
    model_id: str | None = None,
) -> tuple[int, bool]:
    """Register the artifact folder ``source_uri`` as a new version of ``name``; maybe move ``alias``.

    ``source_uri`` is the folder's artifact URI or ``runs:/RUN_ID/PATH`` (resolved to it), or with
    ``model_id`` (a model logged with ``mlflow.<flavour>.log_model``) ``models:/<model_id>``. The
    version gets ``tags`` plus ``metric_key`` = ``metric_value``. ``alias`` moves to it when there is
    no current holder, when the holder has no parsable ``metric_key`` tag, when ``metric_value`` is
    higher, or with ``force_alias``; a version without a metric never displaces a scored holder.
    Returns (version, whether the alias moved). Two processes registering at once may both compare
    against the same holder: the later ``set`` wins.
    """
    c = tracking.client(tracking_uri)
    if source_uri.startswith("runs:/"):
        m = RUN_URI.fullmatch(source_uri)
        if not m:
            raise ValueError(f"{source_uri!r}: expected runs:/RUN_ID/PATH")
        run_id = run_id or m.group(1)
        source_uri = tracking.artifact_uri(m.group(1), m.group(2), tracking_uri)
    all_tags = {k: redact(str(v)) for k, v in (tags or {}).items() if v is not None}
    if metric_value is not None:
        all_tags[metric_key] = repr(float(metric_value))
    _ensure_registered_model(c, name)
    mv = c.create_model_version(name, source=source_uri, run_id=run_id, tags=all_tags, model_id=model_id)
    version = int(mv.version)
    holder = version_by_alias(name, alias, tracking_uri)
    if force_alias or holder is None:
        move = True
    else:
        held = metric_tag(holder.tags, metric_key)
        move = metric_value is not None and (held is None or held < float(metric_value))
    if move:
        c.set_registered_model_alias(name, alias, str(version))
    return version, move


def champion(
    name: str, alias: str = "champion", tracking_uri: str | None = None
) -> tuple[int, dict[str, str]] | None:
    """(version, tags) of the version holding ``alias``, or None (no such model or alias)."""
    held = version_by_alias(name, alias, tracking_uri)
    return None if held is None else (held.version, held.tags)


def version_info(name: str, version: int | str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run id, source and tags of one model version."""
    v = get_version(name, version, uri=tracking_uri)
    return {"version": v.version, "run_id": v.run_id, "source": v.source, "tags": v.tags}
