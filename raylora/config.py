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
import math
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
    template: str = "auto"  # auto: the checkpoint's own | internlm2-chat | Hermes-2 | phi3-chat | internvl2_5
    system_message: str | None = (
        "auto"  # auto (or null): the checkpoint's record, else the template's default
    )
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    attn_implementation: str = (
        "auto"  # auto (flash_attention_2 if available on GPU, else sdpa) | sdpa | eager
    )
    gradient_checkpointing: bool = True
    max_seq_length: int = 4096


@dataclass
class DataConfig:
    train: str = "data/coco/annotations/coco_karpathy_train_567k.jsonl"  # see `format`, or "demo"
    # auto (from the file or folder) | jsonl (chat rows) | coco (captions JSON) | llava (JSON list) |
    # parquet (Parquet/Arrow files: image + caption/sentences) | webdataset (tar shards) | meta
    format: str = "auto"
    root: str = "data/coco"  # image root of a JSONL annotation (a meta JSON names its own)
    val: str = "data/coco/annotations/coco_karpathy_val.json"  # Karpathy-format list of images
    val_gt: str = "data/coco/annotations/coco_karpathy_val_gt.json"  # COCO caption ground truth
    val_root: str = "data/coco"
    val_size: int = 500  # fixed validation subset: the first N images of `val`, same for every trial
    test: str = "data/coco/annotations/coco_karpathy_test.json"  # what raylora.evaluate scores by default
    test_gt: str = "data/coco/annotations/coco_karpathy_test_gt.json"
    test_root: str = "data/coco"
    image_size: int | None = None  # tiling families: the tile side in pixels (None: the checkpoint's)
    min_num: int = 1  # tiling families (InternVL): tiles per image
    max_num: int = 6
    use_thumbnail: bool = True
    min_pixels: int | None = None  # pixel-bounded families (Qwen-VL): bounds of the resized image, which
    max_pixels: int | None = None  # bound its image tokens (pixels / 28^2); None: the checkpoint's
    strict: bool = False  # fail at the first bad row instead of rejecting it
    # Image-once training: the rows sharing an image and prompt (COCO: an image and its 5 captions)
    # become one sequence, the image prefix computed once; the batch sizes then count images.
    group_by_image: bool = False
    max_packed_tokens: int = 0  # > 0: pack a micro-batch's sequences into rows of at most this many tokens
    shuffle_seed: int = 42
    decode_actors: int = 1  # per training worker: Ray Data actors that decode, tile and tokenize its batches
    # (0: the worker builds them itself, no actor pool: small data, debugging)
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
    num_to_keep: int = 2  # checkpoints kept: the best by val CIDEr (and always the latest, to resume)
    select: str = "best"  # best | last: which checkpoint's adapter --output receives
    early_stop_patience: int = 0  # > 0: stop after this many evaluations without a better val CIDEr
    group_by_length: bool = True
    trace_data: bool = False  # record every micro-batch's record ids per rank in <run dir>/data_trace/
    device_audit: bool = False  # fail on a tensor off the training device (raylora.device_audit; tests)


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
    # during training: inline: the training ranks caption their shares of the validation set at the
    # step; async (Ray): a validator actor of the run captions each validated checkpoint while training
    # goes on, on validation_cpus / validation_gpus of its own (without Ray: always inline)
    validation: str = "inline"
    validation_cpus: float = 1.0
    validation_gpus: float = 0.0


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
class ServeConfig:
    """``raylora serve``: one base model per replica, adapters loaded on demand (raylora.serve)."""

    host: str = "127.0.0.1"  # anything else needs an API key (RAYLORA_API_KEY or serve.api_key_file)
    port: int = 8000
    api_key_file: str | None = None  # a file holding the key clients send as "Authorization: Bearer KEY"
    max_adapters: int = 4  # adapters kept loaded per replica (least recently used evicted)
    num_replicas: int = 1  # fixed replicas; or autoscale between min_replicas and max_replicas
    min_replicas: int = 0  # with max_replicas > 0: Ray Serve autoscaling
    max_replicas: int = 0
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    dtype: str = "auto"  # bf16 on a GPU, fp32 on a CPU
    max_batch_size: int = 8  # requests batched across clients and adapters (@serve.batch)
    batch_wait_timeout_s: float = 0.05
    max_tokens: int = 64  # the largest max_tokens a request may ask
    max_image_bytes: int = 20 << 20  # a decoded data: URL (or fetched image) larger than this is refused
    allow_remote_images: bool = False  # http(s):// image URLs fetched by the server
    max_num: int = 6  # tiles per image


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow/mlflow.db
    experiment: str = "raylora"
    # where a new experiment keeps its artifacts (adapters, reports): s3://bucket/prefix for a cluster
    # without a shared file system; None: beside a sqlite store, or the MLflow server's default root
    artifact_location: str | None = None
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
    serve: ServeConfig = field(default_factory=ServeConfig)
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
    _record_origin(cfg, key, origin)


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


def origin_of(cfg: Config, key: str) -> str | None:
    """Where ``key``'s value was set (a config file or "command line"), None for a default."""
    return cfg.__dict__.get("_origins", {}).get(key)


def _record_origin(cfg: Config, key: str, origin: str) -> None:
    cfg.__dict__.setdefault("_origins", {})[key] = origin


class _Checker:
    """Collects value checks; raises one ConfigError naming the key, its value, where it was set
    and what it must be (the first failed check)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, ok: bool, key: str, requirement: str) -> None:
        if ok:
            return
        section, _, name = key.partition(".")
        value = getattr(getattr(self.cfg, section), name) if name else getattr(self.cfg, section)
        where = origin_of(self.cfg, key)
        raise ConfigError(
            f"{key} must be {requirement}, got {value!r}" + (f" (set in {where})" if where else "")
        )


def _finite(x: float) -> bool:
    return math.isfinite(x)


def validate(cfg: Config) -> None:
    """Every value a config can get wrong, checked where the config is parsed (before any cluster,
    data or model work): ranges, cross-field rules and the batch arithmetic."""
    check = _Checker(cfg)
    t, d, lo, c, e, m = cfg.train, cfg.data, cfg.lora, cfg.cluster, cfg.eval, cfg.model
    check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", "0, 1, 2 or 3")
    check(_finite(t.lr) and t.lr > 0, "train.lr", "a positive number")
    check(0 <= t.adam_beta1 < 1, "train.adam_beta1", "in [0, 1)")
    check(0 <= t.adam_beta2 < 1, "train.adam_beta2", "in [0, 1)")
    check(_finite(t.adam_eps) and t.adam_eps > 0, "train.adam_eps", "a positive number")
    check(0 <= t.warmup_ratio <= 1, "train.warmup_ratio", "in [0, 1] (a fraction of the steps)")
    check(_finite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", ">= 0")
    check(_finite(t.grad_clip) and t.grad_clip >= 0, "train.grad_clip", ">= 0 (0: no clipping)")
    check(t.epochs >= 0, "train.epochs", ">= 0")
    check(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", "-1 (no cap) or > 0")
    check(t.epochs > 0 or t.max_steps > 0, "train.epochs", "> 0 unless train.max_steps > 0")
    check(t.per_device_batch_size >= 1, "train.per_device_batch_size", ">= 1")
    check(t.global_batch_size >= 1, "train.global_batch_size", ">= 1")
    check(c.num_workers >= 1, "cluster.num_workers", ">= 1")
    per_step = t.per_device_batch_size * c.num_workers
    check(
        t.global_batch_size % per_step == 0,
        "train.global_batch_size",
        f"a multiple of train.per_device_batch_size {t.per_device_batch_size} x cluster.num_workers "
        f"{c.num_workers} = {per_step} (e.g. {max(per_step, t.global_batch_size // per_step * per_step)}), "
        "or change the per-device batch",
    )
    check(t.log_every_n_steps >= 1, "train.log_every_n_steps", ">= 1")
    check(t.checkpoint_every_n_steps >= 1, "train.checkpoint_every_n_steps", ">= 1")
    check(t.num_to_keep >= 1, "train.num_to_keep", ">= 1")
    check(t.select in ("best", "last"), "train.select", "best (highest val CIDEr) or last")
    check(t.early_stop_patience >= 0, "train.early_stop_patience", "0 (off) or >= 1 evaluations")
    check(lo.rank >= 1, "lora.rank", ">= 1")
    check(_finite(lo.alpha) and lo.alpha > 0, "lora.alpha", "> 0")
    check(0 <= lo.dropout < 1, "lora.dropout", "in [0, 1)")
    if not valid_lora_init(lo.init):
        raise ConfigError(f"lora.init {lo.init!r} unknown; valid: {', '.join(LORA_INITS)}")
    check(m.max_seq_length >= 16, "model.max_seq_length", ">= 16 tokens")
    check(m.dtype in ("auto", "bf16", "fp16", "fp32"), "model.dtype", "auto, bf16, fp16 or fp32")
    check(
        d.format in ("auto", "jsonl", "coco", "llava", "parquet", "webdataset", "meta"),
        "data.format",
        "auto, jsonl, coco, llava, parquet, webdataset or meta",
    )
    check(d.image_size is None or d.image_size >= 14, "data.image_size", ">= 14 pixels (or null)")
    check(d.min_pixels is None or d.min_pixels > 0, "data.min_pixels", "> 0 (or null)")
    check(
        d.max_pixels is None or d.max_pixels >= (d.min_pixels or 1),
        "data.max_pixels",
        ">= data.min_pixels (or null)",
    )
    check(d.min_num >= 1, "data.min_num", ">= 1 tile")
    check(d.max_num >= d.min_num, "data.max_num", f">= data.min_num ({d.min_num})")
    check(d.max_packed_tokens >= 0, "data.max_packed_tokens", "0 (off) or > 0")
    check(d.val_size >= 1, "data.val_size", ">= 1 image")
    check(d.decode_actors >= 0, "data.decode_actors", ">= 0")
    check(d.decode_cpus >= 0, "data.decode_cpus", ">= 0")
    check(e.num_beams >= 1, "eval.num_beams", ">= 1")
    check(e.batch_size >= 1, "eval.batch_size", ">= 1")
    check(e.every_n_steps >= -1, "eval.every_n_steps", "-1 (never), 0 (at the end only) or > 0")
    check(e.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1")
    check(0 <= e.min_new_tokens <= e.max_new_tokens, "eval.min_new_tokens", "in [0, eval.max_new_tokens]")
    check(e.max_num >= 1, "eval.max_num", ">= 1 tile")
    check(e.workers >= 1, "eval.workers", ">= 1")
    check(e.validation in ("async", "inline"), "eval.validation", "async or inline")
    check(e.validation_cpus >= 0, "eval.validation_cpus", ">= 0")
    check(e.validation_gpus >= 0, "eval.validation_gpus", ">= 0")
    check(c.cpus_per_worker > 0, "cluster.cpus_per_worker", "> 0")
    check(c.gpus_per_worker >= 0, "cluster.gpus_per_worker", ">= 0")
    check(c.max_failures >= -1, "cluster.max_failures", "-1 (no limit) or >= 0")
    check(
        c.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        "cluster.placement_strategy",
        "PACK, SPREAD, STRICT_PACK or STRICT_SPREAD",
    )
    check(c.num_cpus is None or c.num_cpus >= 1, "cluster.num_cpus", "null or >= 1")
    _validate_sweep(cfg, check)


def _validate_sweep(cfg: Config, check: _Checker) -> None:
    s = cfg.sweep
    unknown = sorted(set(s.merge_resources) - set(MERGE_RESOURCES))
    if unknown or any(v < 0 for v in s.merge_resources.values()):
        raise ConfigError(
            f"sweep.merge_resources: keys among {', '.join(MERGE_RESOURCES)} with values >= 0, "
            f"got {s.merge_resources}"
        )
    check(s.merge_dtype in ("fp32", "bf16"), "sweep.merge_dtype", "fp32 or bf16")
    check(all(r >= 1 for r in s.rank), "sweep.rank", "a list of ranks >= 1")
    check(all(b >= 1 for b in s.global_batch_size), "sweep.global_batch_size", "a list of batch sizes >= 1")
    check(
        all(b >= 1 for b in s.per_device_batch_size),
        "sweep.per_device_batch_size",
        "a list of batch sizes >= 1",
    )
    check(s.lr_min >= 0 and _finite(s.lr_min), "sweep.lr_min", ">= 0")
    check(s.lr_max >= 0 and _finite(s.lr_max), "sweep.lr_max", ">= 0")
    check(s.trials >= 1, "sweep.trials", ">= 1")
    check(s.grace_period >= 1, "sweep.grace_period", ">= 1 evaluation")
    check(s.reduction_factor >= 2, "sweep.reduction_factor", ">= 2")
    check(s.max_concurrent >= 0, "sweep.max_concurrent", "0 (derived) or >= 1")
    check(s.alpha_ratio >= 0, "sweep.alpha_ratio", ">= 0 (0: keep lora.alpha)")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a saved ``config.yaml``)."""
    cfg = Config()
    for key, value in data.items():
        apply_override(cfg, key, value, "saved config")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
