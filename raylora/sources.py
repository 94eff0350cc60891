"""Model sources: from a directory or an MLflow URI to a base checkpoint, an adapter and a template.

A *model source* is everything needed to rebuild a captioning model: a native base checkpoint, an
optional PEFT adapter on top, and the chat template (plus system message) it was trained with.
:func:`resolve_source` turns any of these specs into one:

* a native (or merged) checkpoint dir with ``config.json``; an original ``internvl_chat`` checkpoint
  is converted once through :func:`raylora.convert.ensure_native`;
* a PEFT adapter dir with ``adapter_config.json`` (its base: ``raylora.json`` ``base_model``, else
  ``adapter_config.json`` ``base_model_name_or_path``), or a training output dir holding ``adapter/``;
* an MLflow URI: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``, downloaded
  once into ``<raylora cache>/mlflow/``;
* an MLflow Model folder (``MLmodel``) whose pyfunc artifact ``model`` (or ``adapter``) holds one of
  the above: the merged models that ``raylora.merge --register`` logs (:mod:`raylora.serving`).

``raylora.json`` next to the weights records the template, the system message and (for adapters)
the base checkpoint. :func:`image_settings` is the one place that turns a model (tile size and
tokens per tile from its config.json) and the data settings into an ``ImageSettings``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylora import registry, runs, tracking
from raylora.config import DataConfig
from raylora.data.settings import ImageSettings
from raylora.families import (
    AUTO,
    chat_template,
    family_of,
    family_of_config,
    named_templates,
    original_format,
)
from raylora.files import cache_root, is_remote, redact
from raylora.model import RECORD, init_mutates_base, load_base_model, torch_dtype

MLFLOW_SCHEMES = ("models:/", "runs:/")
MLMODEL = "MLmodel"
PYFUNC_WEIGHT_ARTIFACTS = ("model", "adapter")  # pyfunc artifacts that hold a checkpoint or an adapter
TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
INFERENCE_MAX_LENGTH = 1 << 20  # inference: never reject a prompt for its length


class SourceError(ValueError):
    """A model spec that cannot be resolved into a loadable model."""


def image_settings(
    model_dir: str | Path,
    template: str = AUTO,
    system_message: str | None = AUTO,
    data: DataConfig | None = None,
    max_num: int | None = None,
    max_seq_length: int = INFERENCE_MAX_LENGTH,
    tokenizer_dir: str | Path | None = None,
) -> ImageSettings:
    """The ImageSettings of a model: its family (:func:`raylora.families.family_of`), chat template
    (``auto``: the checkpoint's record, else its own chat template) and system message (``auto``: the
    record's, else the template's default), image options from ``data`` (``max_num`` overrides its
    max tiles), the tokenizer of ``tokenizer_dir`` or the model."""
    model_dir = Path(model_dir)
    family = family_of(model_dir)
    data = data or DataConfig()
    size = getattr(family, "image_size", None)
    if data.image_size is not None and size is not None and data.image_size != size:
        raise ValueError(
            f"data.image_size is {data.image_size} but the model {model_dir} takes {size} px "
            f"tiles; set data.image_size={size} (or leave it out)"
        )
    record = read_record(tokenizer_dir or model_dir) or read_record(model_dir)
    if template in (AUTO, "", None) and record.get("template") not in (None, "", AUTO):
        template = str(record["template"])
    if system_message in (AUTO, None):
        system_message = record.get("system_message") if record.get("system_message") != AUTO else None
    chat = chat_template(family, Path(tokenizer_dir or model_dir), template)
    return ImageSettings(
        tokenizer_path=str(tokenizer_dir or model_dir),
        template=chat,
        family=family,
        system_message=system_message,
        min_num=data.min_num,
        max_num=data.max_num if max_num is None else max_num,
        use_thumbnail=data.use_thumbnail,
        min_pixels=data.min_pixels,
        max_pixels=data.max_pixels,
        max_seq_length=max_seq_length,
    )


# ------------------------------------------------------------------------------------ the record


def read_record(model_dir: str | Path) -> dict[str, Any]:
    """``raylora.json`` of a model or adapter dir ({} when absent or unreadable)."""
    f = Path(model_dir) / RECORD
    try:
        data = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def complete_adapter_dir(adapter: Path, model_dir: Path, settings: ImageSettings) -> None:
    """Add to a saved PEFT adapter dir what loading it needs: the base's tokenizer and processor
    files, and raylora.json (the template the run trained with, by name, or ``auto`` for the
    checkpoint's own; the system message; the base model dir; the LoRA settings that
    :func:`raylora.model.save_adapter` recorded are kept)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter)
    for name in (
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "chat_template.json",
    ):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, adapter / name)
    template = settings.template.name
    record = {
        **read_record(adapter),
        "template": template if template in named_templates() else AUTO,
        "system_message": settings.system_message,
        "base_model": str(model_dir),
    }
    (adapter / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False))


def infer_template(model_dir: Path) -> str:
    """``raylora_template`` of config.json (what an original checkpoint was trained with, kept by
    the converter), else the family's default template by name, or ``auto`` when that is the
    checkpoint's own chat template (read again wherever the model is used)."""
    cfg = _read_json(model_dir / "config.json")
    if cfg.get("raylora_template"):
        return str(cfg["raylora_template"])
    try:
        family = family_of_config(cfg, str(model_dir / "config.json"))
        name = family.default_template(model_dir).name
    except ValueError as e:
        raise SourceError(
            f"{model_dir}: cannot tell the chat template ({e}); write {RECORD} with "
            "{'template': ...} next to the weights"
        ) from None
    return name if name in named_templates() else AUTO


# ------------------------------------------------------------------------------------ resolution


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

    def image_settings(
        self,
        max_num: int = 6,
        tokenizer_dir: Path | None = None,
        data: DataConfig | None = None,
        max_seq_length: int = INFERENCE_MAX_LENGTH,
    ) -> ImageSettings:
        """ImageSettings for inference with this model (see :func:`image_settings`)."""
        return image_settings(
            self.base_dir,
            self.template,
            self.system_message,
            data,
            max_num=max_num,
            max_seq_length=max_seq_length,
            tokenizer_dir=tokenizer_dir or self.tokenizer_dir,
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def resolve_model_dir(path: str | Path) -> Path:
    """A native checkpoint dir for ``path``: itself, or the cached conversion of an original one."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path {str(path)!r} is not a checkpoint directory (no config.json); "
            "download one (the README's download scripts) or use model.path=demo"
        )
    if original_format(json.loads((p / "config.json").read_text())):
        from raylora.convert import ensure_native  # converting pulls in torch: only when needed

        return ensure_native(p)
    return p


def _template_of(base_dir: Path, adapter_dir: Path | None) -> tuple[str, str | None]:
    for d in (adapter_dir, base_dir):
        if d is None:
            continue
        rec = read_record(d)
        if rec.get("template"):
            return str(rec["template"]), rec.get("system_message")
    return infer_template(base_dir), None


def _base_of_adapter(adapter_dir: Path, spec: str, base: str | None) -> Path:
    candidates = []
    if base:
        candidates.append(("--base", base))
    rec = read_record(adapter_dir)
    if rec.get("base_model"):
        candidates.append((f"{RECORD} base_model", str(rec["base_model"])))
    peft_base = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if peft_base:
        candidates.append(("adapter_config.json base_model_name_or_path", str(peft_base)))
    if not candidates:
        raise SourceError(
            f"{spec}: the adapter {adapter_dir} does not name its base model ({RECORD} base_model or "
            "adapter_config.json base_model_name_or_path); pass the base checkpoint explicitly"
        )
    tried = []
    for origin, value in candidates:
        path = Path(value).expanduser()
        if not path.is_absolute() and not path.exists() and (adapter_dir / path).exists():
            path = adapter_dir / path
        if (path / "config.json").is_file():
            return resolve_model_dir(path)
        tried.append(f"{origin} = {value!r}")
        if origin == "--base":  # an explicit base that does not exist is an error, not a fallback
            break
    raise SourceError(
        f"{spec}: the base model of adapter {adapter_dir} is not a checkpoint directory on this machine "
        f"(tried {'; '.join(tried)}); pass the native base checkpoint explicitly (e.g. --base DIR)"
    )


def check_adapter_init(adapter_dir: Path, spec: str) -> None:
    """Refuse or flag an adapter saved with a PiSSA/OLoRA init and not converted for the original base.

    Loading such an adapter makes PEFT redo the decomposition on the base (subtracting the adapter's
    initial components again): right only when that reproduces the training-time residual weights
    exactly. Randomized SVD (pissa_niter_N) never does: that adapter would silently give wrong weights.
    raylora's training saves converted adapters (``init_lora_weights: true``); see
    :func:`raylora.model.save_adapter`.
    """
    init = _read_json(adapter_dir / "adapter_config.json").get("init_lora_weights", True)
    if not init_mutates_base(init):
        return
    how = (
        "save it for the original base (raylora.train does; with PEFT: "
        "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved before training>))"
    )
    if str(init).startswith("pissa_niter_"):
        raise SourceError(
            f"{spec}: the adapter {adapter_dir} was saved with init_lora_weights={init!r} and not converted: "
            f"loading it re-runs a randomized SVD on the base, which does not reproduce the weights it was "
            f"trained on; {how}"
        )
    warnings.warn(
        f"{spec}: the adapter {adapter_dir} was saved with init_lora_weights={init!r} and not converted: "
        f"PEFT re-runs the decomposition on the base while loading it, which reproduces the training-time "
        f"weights only on the same base weights and numerics; {how}",
        stacklevel=2,
    )


def pyfunc_weights(model_dir: Path) -> Path | None:
    """The checkpoint or adapter folder inside an MLflow Model folder: its python_function flavour's
    artifact ``model`` (or ``adapter``); None when ``model_dir`` is not such a folder."""
    import yaml

    try:
        meta = yaml.safe_load((model_dir / MLMODEL).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    flavor = ((meta or {}).get("flavors") or {}).get("python_function") or {}
    artifacts = flavor.get("artifacts") or {}
    for name in PYFUNC_WEIGHT_ARTIFACTS:
        rel = (artifacts.get(name) or {}).get("path")
        target = (model_dir / rel).resolve() if rel else None
        if target is not None and target.is_dir() and target.is_relative_to(model_dir.resolve()):
            return target
    return None


def _resolve_local(path: Path, spec: str, base: str | None) -> ModelSource:
    if (path / MLMODEL).is_file() and not (path / "config.json").is_file():
        path = pyfunc_weights(path) or path
    if (path / "adapter_config.json").is_file():
        adapter_dir = path
    elif (runs.adapter_dir(path) / "adapter_config.json").is_file():  # a training output dir
        adapter_dir = runs.adapter_dir(path)
    else:
        adapter_dir = None
    if adapter_dir is not None:
        check_adapter_init(adapter_dir, spec)
        base_dir = _base_of_adapter(adapter_dir, spec, base)
    elif (path / "config.json").is_file():
        base_dir = resolve_model_dir(path)
    else:
        raise SourceError(
            f"{spec!r} is neither a checkpoint dir (config.json), a PEFT adapter dir (adapter_config.json) "
            "nor an MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH)"
        )
    template, system = _template_of(base_dir, adapter_dir)
    return ModelSource(base_dir, adapter_dir, template, system, spec=spec)


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", name)


def _resolve_mlflow(spec: str, base: str | None, cache_dir: Path | None) -> ModelSource:
    from mlflow.exceptions import MlflowException

    uri = tracking.current_uri()
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "mlflow"
    store = hashlib.sha256(uri.encode()).hexdigest()[:8]  # the same name/version in another store differs
    origin: dict[str, str] = {"uri": spec, "tracking_uri": uri}
    try:
        if spec.startswith("models:/"):
            m = registry.MODEL_URI.fullmatch(spec)
            if not m:
                raise SourceError(f"{spec!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
            name, alias, number = m.groups()
            version = registry.get_version(name, number, alias=alias, uri=uri)
            origin.update(name=name, version=str(version.version), run_id=version.run_id)
            artifact = registry.download_uri(name, version.version, uri)
            target = root / "models" / f"{_safe(name)}-v{version.version}-{store}"
        else:
            m = registry.RUN_URI.fullmatch(spec)
            if not m:
                raise SourceError(f"{spec!r}: expected runs:/RUN_ID/PATH, e.g. runs:/<run id>/adapter")
            run_id, artifact_path = m.groups()
            origin.update(run_id=run_id)
            artifact = spec
            target = root / "runs" / f"{run_id}-{store}" / artifact_path
        local = tracking.download(artifact, target, uri)
    except MlflowException as e:
        raise SourceError(f"{spec}: {e.message} (tracking store {redact(uri)})") from None
    except ValueError as e:
        raise SourceError(f"{spec}: {e}") from None
    markers = ("adapter_config.json", "config.json", MLMODEL)
    if not any((local / m).is_file() for m in markers):
        raise SourceError(
            f"{spec}: the downloaded folder {local} holds neither an adapter (adapter_config.json), "
            "a checkpoint (config.json) nor an MLflow Model (MLmodel)"
        )
    src = _resolve_local(local, spec, base)
    src.origin = origin
    return src


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
    if is_remote(spec) or spec.startswith(("models:", "runs:")):
        raise SourceError(
            f"{spec!r}: unsupported URI; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"
        )
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise SourceError(
            f"{spec!r} does not exist: expected a checkpoint dir, an adapter dir or an MLflow URI "
            "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH)"
        )
    return _resolve_local(path, spec, base)


def load_model(source: ModelSource, dtype: Any = None, merge: bool = False) -> Any:
    """The base model (``InternVLForConditionalGeneration``), wrapped in its adapter if any.

    ``dtype`` is a torch dtype or a name (fp32, bf16, fp16, auto); ``merge=True`` folds the adapter
    into the weights (``merge_and_unload``) and returns the plain transformers model.
    """
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype, "cpu")
    model = load_base_model(source.base_dir, dtype)
    if source.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter_dir))
        if merge:
            model = model.merge_and_unload()
    return model.eval()
