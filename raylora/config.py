"""One typed config for the whole pipeline, loaded from YAML and overridden with ``key=value``.

A config file is a YAML mapping with the sections below; a file may start from another one with
``base: other.yaml`` (resolved next to the file) and override only what differs. On the command
line, positional ``section.key=value`` pairs override any field (``train.lr=1e-4 lora.rank=16``);
values are parsed as YAML, so ``[a, b]``, ``null``, ``true`` and ``3e-4`` work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "tune_configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    path: str = "pretrained/InternVL2-2B"  # native or original InternVL checkpoint dir, or "demo"
    template: str = "internlm2-chat"  # internlm2-chat | Hermes-2 | phi3-chat | internvl2_5
    system_message: str | None = None  # None: the template's default (same in training and eval)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    attn_implementation: str = (
        "auto"  # auto (flash_attention_2 if available on GPU, else sdpa) | sdpa | eager
    )
    gradient_checkpointing: bool = True
    max_seq_length: int = 4096


@dataclass
class DataConfig:
    train: str = "data/coco/annotations/coco_karpathy_train_567k.jsonl"  # JSONL, meta JSON, or "demo"
    root: str = "data/coco"  # image root of a JSONL annotation (a meta JSON names its own)
    val: str = "data/coco/annotations/coco_karpathy_val.json"  # Karpathy-format list of images
    val_gt: str = "data/coco/annotations/coco_karpathy_val_gt.json"  # COCO caption ground truth
    val_root: str = "data/coco"
    val_size: int = 500  # fixed validation subset: the first N images of `val`, same for every trial
    test: str = "data/coco/annotations/coco_karpathy_test.json"  # what raylora.evaluate scores by default
    test_gt: str = "data/coco/annotations/coco_karpathy_test_gt.json"
    test_root: str = "data/coco"
    image_size: int = 448  # tile side in pixels
    min_num: int = 1
    max_num: int = 6
    use_thumbnail: bool = True
    strict: bool = False  # fail at the first bad row instead of rejecting it
    # Image-once training: the rows sharing an image and prompt (COCO: an image and its 5 captions)
    # become one sequence, the image prefix computed once; the batch sizes then count images.
    group_by_image: bool = False
    max_packed_tokens: int = 0  # > 0: pack a micro-batch's sequences into rows of at most this many tokens
    shuffle_seed: int = 42
    decode_actors: int = 1  # per training worker: Ray Data actors that decode, tile and tokenize its batches
    decode_cpus: float = 1.0  # CPUs reserved per decode actor (workers x actors x this, besides the workers')
    rejects: str | None = None  # where rejected rows go; default <output>/rejects.jsonl


@dataclass
class LoraConfig:
    rank: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every linear layer of the LLM's decoder blocks
    vision_lora: bool = False  # also put LoRA on the vision tower's attention
    train_projector: bool = False  # also train the vision-language projector (mlp1) fully
    train_lm_head: bool = False
    use_dora: bool = False  # DoRA: also learn a magnitude per output feature (more compute per step)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank
    # PEFT's init_lora_weights: default (B = 0) | gaussian | pissa | pissa_niter_<N> (fast SVD, N
    # iterations) | olora. pissa and olora subtract the adapter's initial components from the base
    # weights while training; the saved adapter is converted to apply to the original base.
    init: str = "default"


MERGE_RESOURCES = {"CPU": 1.0, "GPU": 0.0, "memory_gb": 0.0}  # sweep.merge_resources: keys, defaults

# lora.init values (pissa_niter_<N> stands for pissa_niter_0, pissa_niter_4, ...)
LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_<N>", "olora")


def valid_lora_init(name: str) -> bool:
    """Whether ``name`` is one of LORA_INITS (with <N> a non-negative integer)."""
    return name in LORA_INITS and "<" not in name or re.fullmatch(r"pissa_niter_[0-9]+", name) is not None


@dataclass
class TrainConfig:
    lr: float = 4e-5
    epochs: int = 1
    max_steps: int = -1  # > 0 caps the number of optimizer steps
    global_batch_size: int = 512
    per_device_batch_size: int = 4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 42
    zero_stage: int = 1  # 1 | 2 | 3
    offload_optimizer: bool = False  # ZeRO CPU offload of optimizer states
    log_every_n_steps: int = 1
    checkpoint_every_n_steps: int = 100
    num_to_keep: int = 2
    group_by_length: bool = True
    trace_data: bool = False  # record every micro-batch's record ids per rank in <run dir>/data_trace/


@dataclass
class ClusterConfig:
    address: str | None = None  # None: RAY_ADDRESS or a new local cluster; "auto" or ray://host:10001
    num_workers: int = 8
    use_gpu: bool = True
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 4.0
    storage_path: str = "runs"  # local dir, NFS path or s3://bucket/prefix; shared by every node
    run_name: str | None = None  # default: derived from the config file name
    max_failures: int = 1
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray Train's workers)
    autoscale: bool = False  # an autoscaler can add nodes: wait for resources instead of failing fast
    num_cpus: int | None = None  # only for a new local cluster
    object_store_memory: int | None = None  # bytes, only for a new local cluster


@dataclass
class EvalConfig:
    prompt: str = "Provide a one-sentence caption for the provided image."
    min_new_tokens: int = 8
    max_new_tokens: int = 30
    num_beams: int = (
        1  # 1: greedy decoding (the tutorial's protocol); N > 1: beam search (papers often use 5)
    )
    batch_size: int = 16  # images per generate call (x num_beams sequences in memory)
    every_n_steps: int = 200  # 0: only at the end
    max_num: int = 6  # dynamic tiling for evaluation
    workers: int = 1  # model replicas in the captioning actor pool (one per GPU on a GPU cluster)


@dataclass
class SweepConfig:
    rank: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    lr_min: float = 1e-5
    lr_max: float = 2e-4
    global_batch_size: list[int] = field(default_factory=lambda: [128, 256, 512])
    per_device_batch_size: list[int] = field(default_factory=list)  # empty: keep train's value
    extra: dict[str, list[Any]] = field(default_factory=dict)  # any other key -> choices
    searcher: str = "optuna"  # optuna | random
    grace_period: int = 1  # ASHA: evaluations before a trial may be stopped
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0: derived from the cluster and each trial's workers
    trials: int = 16
    alpha_ratio: float = 2.0  # lora.alpha = alpha_ratio * rank in every trial (0: keep lora.alpha)
    trial_overrides: dict[str, Any] = field(default_factory=dict)  # config keys set in every trial
    # The final task, after the champion adapter is registered: merge it into a plain checkpoint on
    # the cluster (a Ray task with these resources; memory_gb reserves that much of a node's RAM, so a
    # large model lands on a node that can hold it) and register it as <name>-merged (servable).
    merge: bool = True  # --no-merge: skip the final task
    merge_resources: dict[str, float] = field(default_factory=lambda: dict(MERGE_RESOURCES))
    merge_dtype: str = "fp32"  # fp32 | bf16: the merged weights
    # Train the champion's configuration for the full schedule first (trials are truncated by
    # trial_overrides), register that adapter, merge it instead of the trial's.
    final_train: bool = False


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow/mlflow.db
    experiment: str = "raylora"
    registered_model: str | None = None  # default raylora-<dataset>-lora
    dataset: str = "coco"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "outputs/run"
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Short hash of the resolved config (for registry tags and run names)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 4e-05, ...}``: the form MLflow params and overrides use."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for k, v in values.items():
                    out[f"{section}.{k}"] = v
            else:
                out[section] = values
        return out


# --------------------------------------------------------------------------------------- checking


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "4e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def apply_override(cfg: Config, key: str, value: Any, origin: str = "override") -> None:
    """Set ``section.key`` (or a whole section from a mapping) with type checking; ``origin`` names
    where the value came from in errors (a file, "command line", ...)."""
    parts = key.split(".")
    top_keys = _valid_keys(Config)
    if parts[0] not in top_keys:
        raise ConfigError(f"{origin}: unknown key {key!r}; valid top-level keys: {', '.join(top_keys)}")
    target: Any = cfg
    hints = typing.get_type_hints(type(target))
    if len(parts) == 1:
        if dataclasses.is_dataclass(hints[parts[0]]):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {key!r} is a section; give a mapping or use {key}.<field>=...")
            for k, v in value.items():
                apply_override(cfg, f"{key}.{k}", v, origin)
            return
        setattr(cfg, key, _coerce(value, hints[key], key))
        return
    section = getattr(cfg, parts[0])
    if not dataclasses.is_dataclass(section) or len(parts) != 2:
        raise ConfigError(f"{origin}: unknown key {key!r}")
    fields = _valid_keys(type(section))
    if parts[1] not in fields:
        raise ConfigError(
            f"{origin}: unknown key {key!r}; valid keys in {parts[0]!r}: "
            + ", ".join(f"{parts[0]}.{f}" for f in fields)
        )
    hint = typing.get_type_hints(type(section))[parts[1]]
    try:
        setattr(section, parts[1], _coerce(value, hint, key))
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], Path]]:
    """The chain of mappings to apply, base files first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping of sections")
    chain: list[tuple[dict[str, Any], Path]] = []
    base = data.pop("base", None)
    if base:
        chain += _read_yaml((path.parent / base).resolve(), (*seen, path))
    chain.append((data, path))
    return chain


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 0.0001)`` (the value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (and its ``base`` chain), then ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = resolve_config_path(path)
        for data, origin in _read_yaml(path):
            for key, value in data.items():
                apply_override(cfg, key, value, str(origin))
        if cfg.name == "run":
            cfg.name = path.stem
    for text in overrides or []:
        key, value = parse_override(text)
        apply_override(cfg, key, value, "command line")
    validate(cfg)
    return cfg


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or a bare name looked up in ``tune_configs/`` (``demo`` -> demo.yaml)."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (shipped configs: {known})")


def validate(cfg: Config) -> None:
    """Cross-field checks that a type check cannot make."""
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.per_device_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.per_device_batch_size and train.global_batch_size must be >= 1")
    if cfg.data.min_num < 1 or cfg.data.max_num < cfg.data.min_num:
        raise ConfigError(
            f"data.min_num/max_num must satisfy 1 <= min <= max, got {cfg.data.min_num}/{cfg.data.max_num}"
        )
    if cfg.lora.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {cfg.lora.rank}")
    if not valid_lora_init(cfg.lora.init):
        raise ConfigError(f"lora.init {cfg.lora.init!r} unknown; valid: {', '.join(LORA_INITS)}")
    if cfg.eval.num_beams < 1 or cfg.eval.batch_size < 1:
        raise ConfigError(
            f"eval.num_beams and eval.batch_size must be >= 1, got {cfg.eval.num_beams}, {cfg.eval.batch_size}"
        )
    if cfg.cluster.num_workers < 1:
        raise ConfigError(f"cluster.num_workers must be >= 1, got {cfg.cluster.num_workers}")
    if cfg.cluster.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ConfigError(
            f"cluster.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
            f"got {cfg.cluster.placement_strategy!r}"
        )
    s = cfg.sweep
    unknown = sorted(set(s.merge_resources) - set(MERGE_RESOURCES))
    if unknown or any(v < 0 for v in s.merge_resources.values()):
        raise ConfigError(
            f"sweep.merge_resources: keys among {', '.join(MERGE_RESOURCES)} with values >= 0, "
            f"got {s.merge_resources}"
        )
    if s.merge_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"sweep.merge_dtype must be fp32 or bf16, got {s.merge_dtype!r}")
    if cfg.data.max_packed_tokens < 0:
        raise ConfigError(f"data.max_packed_tokens must be 0 (off) or > 0, got {cfg.data.max_packed_tokens}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a saved ``config.yaml``)."""
    cfg = Config()
    for key, value in data.items():
        apply_override(cfg, key, value, "saved config")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
