"""Model sources and the MLflow model registry.

A *model source* is everything needed to rebuild a captioning model: a native base checkpoint, an
optional PEFT adapter on top, and the chat template (plus system message) it was trained with.
:func:`resolve_source` turns any of these specs into one:

* a native (or merged) checkpoint dir with ``config.json``; an original ``internvl_chat`` checkpoint
  is converted once through :func:`raylora.convert.ensure_native`; ``demo`` is the demo base;
* a PEFT adapter dir with ``adapter_config.json`` (its base: ``raylora.json`` ``base_model``, else
  ``adapter_config.json`` ``base_model_name_or_path``), or a training output dir holding ``adapter/``;
* an MLflow URI: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``, downloaded
  once into ``<raylora cache>/mlflow/``.

Adapters are registered as plain artifact folders: ``mlflow.register_model`` refuses those ("Unable
to find a logged_model"), so :func:`register_adapter` creates the model version from the folder's
artifact URI. The ``champion`` alias only moves to a version whose metric beats the current one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylora import tracking

MLFLOW_SCHEMES = ("models:/", "runs:/")
# LLM model_type -> the InternVL2 chat template of that family
TEMPLATE_BY_LLM = {
    "qwen2": "Hermes-2",
    "llama": "internlm2-chat",
    "internlm2": "internlm2-chat",
    "phi3": "phi3-chat",
}
TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


class SourceError(ValueError):
    """A model spec that cannot be resolved into a loadable model."""


@dataclass
class ModelSource:
    """A base checkpoint, an optional adapter on it, and its conversation template."""

    base_dir: Path
    adapter_dir: Path | None
    template: str
    system_message: str | None
    spec: str = ""
    # registry provenance when resolved from MLflow: name, version, run_id, uri
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def tokenizer_dir(self) -> Path:
        """The adapter dir when it carries tokenizer files (training writes them), else the base."""
        if self.adapter_dir is not None and any((self.adapter_dir / f).is_file() for f in TOKENIZER_MARKERS):
            return self.adapter_dir
        return self.base_dir

    def image_settings(self, max_num: int = 6, tokenizer_dir: Path | None = None) -> Any:
        """ImageSettings for inference: tile size and tokens per tile from the base, this template."""
        from raylora.data.pipeline import ImageSettings
        from raylora.model import model_info

        info = model_info(self.base_dir)
        return ImageSettings(
            tokenizer_path=str(tokenizer_dir or self.tokenizer_dir),
            template=self.template,
            system_message=self.system_message,
            image_size=info["image_size"],
            max_num=max_num,
            tokens_per_tile=info["tokens_per_tile"],
            max_seq_length=1 << 20,  # inference: never reject a prompt
        )


# ------------------------------------------------------------------------------------ resolution


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def current_tracking_uri() -> str:
    """mlflow's tracking URI if the process set one, else raylora's default store."""
    import mlflow

    return mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else tracking.tracking_uri()


def _client(tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or current_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _template_record(model_dir: Path) -> dict[str, Any]:
    f = model_dir / "raylora.json"
    return _read_json(f) if f.is_file() else {}


def infer_template(model_dir: Path) -> str:
    """``raylora_template`` of config.json, else the InternVL2 template of the LLM family."""
    cfg = _read_json(model_dir / "config.json")
    if cfg.get("raylora_template"):
        return str(cfg["raylora_template"])
    text = cfg.get("text_config") or cfg.get("llm_config") or {}
    llm = text.get("model_type") or ""
    arch = " ".join(text.get("architectures") or []).lower()
    for key, template in TEMPLATE_BY_LLM.items():
        if llm == key or key in arch:
            return template
    raise SourceError(
        f"{model_dir}: cannot tell the chat template (no raylora.json, no raylora_template in config.json, "
        f"unknown LLM type {llm!r}); write raylora.json with {{'template': ...}} next to the weights"
    )


def _template_of(base_dir: Path, adapter_dir: Path | None) -> tuple[str, str | None]:
    for d in (adapter_dir, base_dir):
        if d is None:
            continue
        rec = _template_record(d)
        if rec.get("template"):
            return str(rec["template"]), rec.get("system_message")
    return infer_template(base_dir), None


def _base_of_adapter(adapter_dir: Path, spec: str, base: str | None) -> Path:
    from raylora.model import resolve_model_dir

    candidates = []
    if base:
        candidates.append(("--base", base))
    rec = _template_record(adapter_dir)
    if rec.get("base_model"):
        candidates.append(("raylora.json base_model", str(rec["base_model"])))
    peft_base = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if peft_base:
        candidates.append(("adapter_config.json base_model_name_or_path", str(peft_base)))
    if not candidates:
        raise SourceError(
            f"{spec}: the adapter {adapter_dir} does not name its base model (raylora.json base_model or "
            "adapter_config.json base_model_name_or_path); pass the base checkpoint explicitly"
        )
    tried = []
    for origin, value in candidates:
        path = Path(value).expanduser()
        if not path.is_absolute() and not path.exists() and (adapter_dir / path).exists():
            path = adapter_dir / path
        if value == "demo" or (path / "config.json").is_file():
            return resolve_model_dir("demo" if value == "demo" else str(path), log=lambda *_: None)
        tried.append(f"{origin} = {value!r}")
        if origin == "--base":  # an explicit base that does not exist is an error, not a fallback
            break
    raise SourceError(
        f"{spec}: the base model of adapter {adapter_dir} is not a checkpoint directory on this machine "
        f"(tried {'; '.join(tried)}); pass the native base checkpoint explicitly (e.g. --base DIR)"
    )


def _resolve_local(path: Path, spec: str, base: str | None) -> ModelSource:
    from raylora.model import resolve_model_dir

    if (path / "adapter_config.json").is_file():
        adapter_dir = path
    elif (path / "adapter" / "adapter_config.json").is_file():  # a training output dir
        adapter_dir = path / "adapter"
    else:
        adapter_dir = None
    if adapter_dir is not None:
        base_dir = _base_of_adapter(adapter_dir, spec, base)
    elif (path / "config.json").is_file():
        base_dir = resolve_model_dir(str(path), log=lambda *_: None)
    else:
        raise SourceError(
            f"{spec!r} is neither a checkpoint dir (config.json), a PEFT adapter dir (adapter_config.json) "
            "nor an MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH)"
        )
    template, system = _template_of(base_dir, adapter_dir)
    return ModelSource(base_dir, adapter_dir, template, system, spec=spec)


def _download(uri: str, target: Path, tracking_uri: str) -> Path:
    """Download ``uri`` into ``target`` once (atomically: a temp dir renamed at the end)."""
    import mlflow

    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(tmp), tracking_uri=tracking_uri
            )
        )
        if local.is_file():
            raise SourceError(f"{uri} is a single file, expected a model or adapter folder")
        try:
            os.replace(local, target)
        except OSError:
            if not target.is_dir():  # else another process downloaded it meanwhile
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_mlflow(spec: str, base: str | None, cache_dir: Path | None) -> ModelSource:
    from mlflow.exceptions import MlflowException

    from raylora.demo import cache_root

    uri = current_tracking_uri()
    client = _client(uri)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "mlflow"
    store = hashlib.sha256(uri.encode()).hexdigest()[:8]  # the same name/version in another store differs
    origin: dict[str, str] = {"uri": spec, "tracking_uri": uri}
    try:
        if spec.startswith("models:/"):
            m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", spec)
            if not m:
                raise SourceError(f"{spec!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
            name, alias, version = m.groups()
            mv = (
                client.get_model_version_by_alias(name, alias)
                if alias
                else client.get_model_version(name, version)
            )
            origin.update(name=name, version=str(mv.version), run_id=mv.run_id or "")
            download_uri = client.get_model_version_download_uri(name, mv.version)
            target = root / "models" / f"{_safe(name)}-v{mv.version}-{store}"
        else:
            m = re.fullmatch(r"runs:/([0-9a-zA-Z]+)/(.+?)/?", spec)
            if not m:
                raise SourceError(f"{spec!r}: expected runs:/RUN_ID/PATH, e.g. runs:/<run id>/adapter")
            run_id, artifact_path = m.groups()
            origin.update(run_id=run_id)
            download_uri = spec
            target = root / "runs" / f"{run_id}-{store}" / artifact_path
        local = _download(download_uri, target, uri)
    except MlflowException as e:
        raise SourceError(f"{spec}: {e.message} (tracking store {uri})") from None
    if not (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        raise SourceError(
            f"{spec}: the downloaded folder {local} holds neither an adapter (adapter_config.json) "
            "nor a checkpoint (config.json)"
        )
    src = _resolve_local(local, spec, base)
    src.origin = origin
    return src


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", name)


def resolve_source(
    spec: str | os.PathLike, base: str | None = None, cache_dir: str | Path | None = None
) -> ModelSource:
    """Base dir, adapter dir and template of a local dir or an MLflow ``models:/`` / ``runs:/`` URI.

    ``base`` overrides the adapter's recorded base checkpoint (an adapter trained on another
    machine); ``cache_dir`` is where MLflow downloads go (default ``<raylora cache>/mlflow``).
    """
    spec = str(spec)
    if spec.startswith(MLFLOW_SCHEMES):
        return _resolve_mlflow(spec, base, Path(cache_dir) if cache_dir else None)
    if "://" in spec or spec.startswith(("models:", "runs:")):
        raise SourceError(
            f"{spec!r}: unsupported URI; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"
        )
    if spec == "demo":
        return _resolve_local(_demo_base(), spec, base)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise SourceError(
            f"{spec!r} does not exist: expected a checkpoint dir, an adapter dir or an MLflow URI "
            "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH)"
        )
    return _resolve_local(path, spec, base)


def _demo_base() -> Path:
    from raylora.model import resolve_model_dir

    return resolve_model_dir("demo")


# ------------------------------------------------------------------------------------- loading


def _dtype(dtype: Any) -> Any:
    if dtype is None or not isinstance(dtype, str):
        return dtype
    from raylora.model import torch_dtype

    return torch_dtype(dtype, "cpu")


def load_model(source: ModelSource, dtype: Any = None, merge: bool = False) -> Any:
    """The base model (``InternVLForConditionalGeneration``), wrapped in its adapter if any.

    ``dtype`` is a torch dtype or a name (fp32, bf16, fp16, auto); ``merge=True`` folds the adapter
    into the weights (``merge_and_unload``) and returns the plain transformers model.
    """
    from raylora.model import load_base_model

    model = load_base_model(source.base_dir, _dtype(dtype))
    if source.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter_dir))
        if merge:
            model = model.merge_and_unload()
    return model.eval()


# ------------------------------------------------------------------------------------- registry


def artifact_uri(run_id: str, artifact_path: str, tracking_uri: str | None = None) -> str:
    """The storage URI of a run's artifact folder (what a model version's ``source`` must be)."""
    run = _client(tracking_uri).get_run(run_id)
    return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as e2:  # created by a concurrent process meanwhile
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def _version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _metric(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def register_adapter(
    name: str,
    source_uri: str,
    run_id: str | None,
    tags: dict[str, Any] | None = None,
    metric_key: str = "cider",
    metric_value: float | None = None,
    alias: str = "champion",
    force_alias: bool = False,
    tracking_uri: str | None = None,
) -> tuple[int, bool]:
    """Register the artifact folder ``source_uri`` as a new version of ``name``; maybe move ``alias``.

    ``source_uri`` is the folder's artifact URI or ``runs:/RUN_ID/PATH`` (resolved to it). The
    version gets ``tags`` plus ``metric_key`` = ``metric_value``. ``alias`` moves to it when there is
    no current holder, when the holder has no parsable ``metric_key`` tag, when ``metric_value`` is
    higher, or with ``force_alias``; a version without a metric never displaces a scored holder.
    Returns (version, whether the alias moved). Two processes registering at once may both compare
    against the same holder: the later ``set`` wins.
    """
    client = _client(tracking_uri)
    if source_uri.startswith("runs:/"):
        m = re.fullmatch(r"runs:/([0-9a-zA-Z]+)/(.+?)/?", source_uri)
        if not m:
            raise SourceError(f"{source_uri!r}: expected runs:/RUN_ID/PATH")
        run_id = run_id or m.group(1)
        source_uri = artifact_uri(m.group(1), m.group(2), tracking_uri)
    all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
    if metric_value is not None:
        all_tags[metric_key] = repr(float(metric_value))
    _ensure_registered_model(client, name)
    mv = client.create_model_version(name, source=source_uri, run_id=run_id, tags=all_tags)
    version = int(mv.version)
    holder = _version_by_alias(client, name, alias)
    if force_alias or holder is None:
        move = True
    else:
        held = _metric(holder.tags, metric_key)
        move = metric_value is not None and (held is None or held < float(metric_value))
    if move:
        client.set_registered_model_alias(name, alias, str(version))
    return version, move


def champion(
    name: str, alias: str = "champion", tracking_uri: str | None = None
) -> tuple[int, dict[str, str]] | None:
    """(version, tags) of the version holding ``alias``, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        mv = _version_by_alias(client, name, alias)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if mv is None else (int(mv.version), dict(mv.tags))


def version_info(name: str, version: int | str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run id, source and tags of one model version."""
    mv = _client(tracking_uri).get_model_version(name, str(version))
    return {"version": int(mv.version), "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags)}
