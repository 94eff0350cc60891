"""A merged checkpoint as an MLflow Model that captions images: the pyfunc flavour of ``<name>-merged``.

``raylora.merge --register`` (and the sweep's final merge) log the merged folder with
:func:`log_caption_model`, so that the registry's versions load and serve with MLflow alone:

    mlflow.pyfunc.load_model("models:/raylora-demo-lora-merged@champion").predict(df, params={...})
    mlflow models serve -m models:/raylora-demo-lora-merged@champion --env-manager local --port 5001

The MLflow Model (no pickle: "models from code"):

* ``serving_model.py``: the code file MLflow runs on load; it sets :class:`CaptionModel`.
* the pyfunc artifact ``model`` (``artifacts/<merged folder name>/``): the merged checkpoint,
  unchanged (safetensors, config, tokenizer, processor files, ``raylora.json``). :meth:`CaptionModel.load_context` loads it with transformers'
  ``AutoModelForImageTextToText`` and captions with raylora's protocol (template, tiling and
  greedy decoding of :mod:`raylora.generation`), so a caption equals ``raylora.caption``'s.
* the signature: input a table with a string column ``image`` (declared optional: see
  :func:`signature`), each a base64-encoded image file (JPEG, PNG, WebP, BMP, GIF or TIFF; a
  ``data:image/...;base64,`` prefix is accepted) or, from Python, raw bytes; params ``prompt``
  (the evaluation prompt), ``max_new_tokens`` (30) and ``num_beams`` (1: greedy); output one
  caption per row, in order (``{"predictions": [...]}``). A refused request is an HTTP 400 whose
  message says what is wrong (no rows, the row of a bad image, a bad param).
* an input example (a small real image, base64) and ``model_config`` (below).

``model_config`` (logged with its defaults; override with ``mlflow.pyfunc.load_model(uri,
model_config={...})`` or, for ``mlflow models serve``, the environment variable
``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"allow_local_paths": true}'``):

* ``allow_local_paths`` (false): also accept a path to an image file on the serving machine in
  ``image``. Off by default: a client could otherwise make the server read any image file it can.
* ``device`` (auto: CUDA when available, the weights spread over the GPUs), ``dtype`` (auto: bf16 on
  a GPU, fp32 on a CPU), ``batch_size`` (images per generate call, 8), ``max_num`` (tiles, 6).

Serving needs raylora importable (``pip install -e .``): the requirements recorded with the model
name the third-party packages only, unpinned (``--env-manager local`` uses the current environment).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from raylora import tracking
from raylora.generation import GenerationSettings, generate_captions
from raylora.model import attn_implementation, torch_dtype
from raylora.sources import resolve_source

# torch and transformers are imported in load_context: logging the model does not need them.

IMAGE_COLUMN = "image"
WEIGHTS = "model"  # the pyfunc artifact holding the merged checkpoint
CODE_FILE = Path(__file__).with_name("serving_model.py")  # the models-from-code file
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # what PIL may decode from a request
MAX_NEW_TOKENS = 512
MAX_BEAMS = 8
EXAMPLE_SIDE = 160  # the input example: a real image scaled to at most this many pixels a side
MODEL_CONFIG: dict[str, Any] = {
    "allow_local_paths": False,
    "device": "auto",
    "dtype": "auto",
    "batch_size": 8,
    "max_num": 6,
}
# What the caption model imports (unpinned; MLflow adds its own version). raylora itself must be
# importable where the model is served.
PIP_REQUIREMENTS = ["torch", "torchvision", "transformers", "pillow", "numpy", "pandas", "pyyaml", "pyarrow"]


class InputError(ValueError):
    """A request the caption model refuses (served as HTTP 400)."""


class RequestError(MlflowException):
    """How ``predict`` refuses a request: MLflow's INVALID_PARAMETER_VALUE (HTTP 400) with a message
    that stays as written.

    MLflow's scoring server rewrites the message of an MlflowException raised by ``predict`` into
    ``Failed to predict data '<the input DataFrame>'. Error: <message>``: the DataFrame's repr echoes
    the first characters of every image of the request. This message is set once and keeps its value.
    """

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


# ------------------------------------------------------------------------------------- the input


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PATHS_REFUSED = "file paths are refused (model_config allow_local_paths is off)"


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "~", "./", "../", "\\")) or Path(text).suffix.lower() in IMAGE_SUFFIXES


# What PIL's messages may quote of the input, dropped from them.
_QUOTED = re.compile(
    r"""\s*(?:
        <[^<>]*>                                      # an object's repr: <_io.BytesIO object at 0x...>
      | b'(?:[^'\\]|\\.)*' | b"(?:[^"\\]|\\.)*"          # bytes: header b'II*\x00...'
      | (?<!\w)'[^']*'(?!\w) | (?<!\w)"[^"]*"(?!\w)     # a string: a file name
    )""",
    re.VERBOSE,
)


def pil_reason(error: BaseException) -> str:
    """What PIL says is wrong with an image, without what it quotes of the input."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):  # "cannot identify image file <the file object>"
        return "cannot identify image file"
    lines = str(error).strip().splitlines()
    text = " ".join(_QUOTED.sub("", lines[0]).split()).strip(" .,:;") if lines else ""
    return text[:200] or type(error).__name__


def check_image(data: bytes | str, row: int) -> None:
    """Decode the image (bytes or a path) once: a supported format within PIL's pixel limit."""
    from PIL import Image

    formats = ", ".join(IMAGE_FORMATS[:-1]) + f" or {IMAGE_FORMATS[-1]}"
    unreadable = f"row {row}: image is not a decodable {formats} image"
    try:
        im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise InputError(f"row {row}: the image has too many pixels (PIL: {pil_reason(e)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{unreadable} (PIL: {pil_reason(e)})") from None
    with im:
        width, height = im.size
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise InputError(
                f"row {row}: the image has {width}x{height} pixels, over the limit of {Image.MAX_IMAGE_PIXELS}"
            )
        try:
            im.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"{unreadable} (PIL: {pil_reason(e)})") from None


def _decode_base64(text: str, row: int, allow_paths: bool) -> bytes:
    body = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        if allow_paths:
            raise InputError(
                f"row {row}: neither an existing image file nor base64-encoded image data"
            ) from None
        hint = f"; {PATHS_REFUSED}" if _looks_like_path(text) else ""
        raise InputError(f"row {row}: not base64-encoded image data{hint}") from None


def _existing_file(text: str) -> Path | None:
    """``text`` as the path of an existing file, else None (base64 data is rarely a short file name)."""
    if not text or len(text) > 4096 or "\n" in text:
        return None
    try:
        path = Path(text).expanduser()
        return path if path.is_file() else None
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return None


def read_image(value: Any, row: int, allow_paths: bool) -> bytes | str:
    """One ``image`` cell as checked image bytes, or a path to an image file when paths are allowed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise InputError(f"row {row}: no image")
    if isinstance(value, bytes | bytearray | memoryview):
        data: bytes | str = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        path = _existing_file(text) if allow_paths else None
        data = str(path) if path is not None else _decode_base64(text, row, allow_paths)
    else:
        raise InputError(f"row {row}: expected a base64 string or bytes, got {type(value).__name__}")
    try:
        check_image(data, row)
    except InputError:
        if isinstance(value, str) and not allow_paths and _looks_like_path(value.strip()):
            raise InputError(f"row {row}: not a base64-encoded image; {PATHS_REFUSED}") from None
        raise
    return data


def generation_settings(params: dict[str, Any] | None, batch_size: int) -> GenerationSettings:
    """The request's protocol: the evaluation protocol with ``prompt``, ``max_new_tokens`` and
    ``num_beams`` from ``params`` (min_new_tokens is lowered to max_new_tokens when above it)."""
    default = GenerationSettings()
    p = {k: v for k, v in (params or {}).items() if v is not None}
    prompt = str(p.get("prompt", default.prompt))
    if not prompt.strip():
        raise InputError("params: prompt is empty")
    max_new = _int_param(p, "max_new_tokens", default.max_new_tokens)
    beams = _int_param(p, "num_beams", default.num_beams)
    if not 1 <= max_new <= MAX_NEW_TOKENS:
        raise InputError(f"params: max_new_tokens must be 1..{MAX_NEW_TOKENS}, got {max_new}")
    if not 1 <= beams <= MAX_BEAMS:
        raise InputError(f"params: num_beams must be 1..{MAX_BEAMS}, got {beams}")
    return GenerationSettings(
        prompt=prompt,
        min_new_tokens=min(default.min_new_tokens, max_new),
        max_new_tokens=max_new,
        batch_size=batch_size,
        num_beams=beams,
    )


def _int_param(params: dict[str, Any], key: str, default: int) -> int:
    try:
        return int(params.get(key, default))
    except (TypeError, ValueError):
        raise InputError(f"params: {key} must be an integer") from None


def model_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """MODEL_CONFIG updated with ``config``; an error for an unknown key or a bad value."""
    cfg = {**MODEL_CONFIG, **(config or {})}
    unknown = sorted(set(cfg) - set(MODEL_CONFIG))
    if unknown:
        raise ValueError(f"model_config: unknown key(s) {unknown}; valid: {sorted(MODEL_CONFIG)}")
    allow = cfg["allow_local_paths"]
    if isinstance(allow, str):  # MLFLOW_PYFUNC_INFERENCE_CONFIG may carry "true"
        allow = allow.strip().lower() in ("1", "true", "yes", "on")
    cfg["allow_local_paths"] = bool(allow)
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        raise ValueError(f"model_config: device must be auto, cpu or cuda, got {cfg['device']!r}")
    if cfg["dtype"] not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"model_config: dtype must be auto, fp32, bf16 or fp16, got {cfg['dtype']!r}")
    for key in ("batch_size", "max_num"):
        cfg[key] = int(cfg[key])
        if cfg[key] < 1:
            raise ValueError(f"model_config: {key} must be >= 1, got {cfg[key]}")
    return cfg


# ------------------------------------------------------------------------------------- the model


class CaptionModel(mlflow.pyfunc.PythonModel):
    """Captions the images of a table's ``image`` column with a merged checkpoint (see the module doc)."""

    def load_context(self, context: Any) -> None:
        """The merged checkpoint of artifact ``model`` with transformers' Auto class; raylora's
        template and image settings from its ``raylora.json``."""
        import torch
        from transformers import AutoModelForImageTextToText

        self.config = model_config(context.model_config)
        weights = Path(context.artifacts[WEIGHTS])
        device = self.config["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForImageTextToText.from_pretrained(
            weights,
            dtype=torch_dtype(self.config["dtype"], device),
            attn_implementation=attn_implementation("auto", device),
            device_map="auto" if device == "cuda" else None,
        ).eval()
        self.settings = resolve_source(weights).image_settings(self.config["max_num"])
        self.conv_tok = self.settings.conversation_tokenizer()
        self.lock = threading.Lock()  # one generate call at a time (the server may run requests in threads)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """One caption per row of ``model_input[IMAGE_COLUMN]``, in order; a RequestError (HTTP 400)
        names what is wrong with a request (no rows, no image column, the row of a bad image, a bad
        param)."""
        try:
            gen = generation_settings(params, self.config["batch_size"])
            if len(model_input) == 0:
                raise InputError(f"no rows were given: send one row per image, in column {IMAGE_COLUMN!r}")
            if IMAGE_COLUMN not in model_input:
                columns = ", ".join(repr(str(c)[:40]) for c in list(model_input)[:10])
                raise InputError(f"the input has no {IMAGE_COLUMN!r} column (its columns: {columns})")
            allow = self.config["allow_local_paths"]
            images = [read_image(v, i, allow) for i, v in enumerate(model_input[IMAGE_COLUMN].tolist())]
        except InputError as e:
            raise RequestError.invalid_parameter_value(str(e)) from None
        files = [io.BytesIO(d) if isinstance(d, bytes) else d for d in images]
        with self.lock:
            return generate_captions(self.model, self.conv_tok, self.settings, files, gen)


# ---------------------------------------------------------------------------------------- logging


def signature() -> Any:
    """Input: a string column ``image``; params prompt / max_new_tokens / num_beams; output: captions.

    ``image`` is declared optional: MLflow then hands :meth:`CaptionModel.predict` a request without
    it (an empty ``dataframe_records``, a misnamed column), which answers what is wrong (no rows were
    given, no image column) instead of MLflow's "Model is missing inputs ['image']". A row without an
    image is refused all the same."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    default = GenerationSettings()
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN, required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("prompt", "string", default.prompt),
                ParamSpec("max_new_tokens", "long", default.max_new_tokens),
                ParamSpec("num_beams", "long", default.num_beams),
            ]
        ),
    )


def encode_image(path: str | Path, max_side: int | None = None) -> str:
    """An image file as base64 (re-encoded as a JPEG of at most ``max_side`` pixels a side if given)."""
    if max_side is None:
        return base64.b64encode(Path(path).read_bytes()).decode("ascii")
    from PIL import Image

    from raylora.data.records import to_rgb

    with Image.open(path) as im:
        small = to_rgb(im)
        small.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def input_example(image: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row: ``image`` scaled down to EXAMPLE_SIDE and base64-encoded, with the default params."""
    default = GenerationSettings()
    params = {"prompt": default.prompt, "max_new_tokens": default.max_new_tokens}
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(image, EXAMPLE_SIDE)]}), params


@contextmanager
def staging_near(path: Path) -> Iterator[None]:
    """Temporary folders next to ``path`` for the duration: MLflow stages a copy of the weights in a
    temp dir before storing them, and the disk that holds the merged checkpoint can hold a copy
    (``/tmp`` often cannot hold a large model)."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(path.resolve().parent)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def log_caption_model(
    weights: str | Path,
    run_id: str,
    uri: str,
    example_image: str | Path,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """Log the merged checkpoint ``weights`` as the caption model (``model``) of the run ``run_id``.

    Returns MLflow's ModelInfo (``model_uri`` ``models:/<model id>``, ``model_id``). MLflow checks
    the input example against the signature and serves it once through the logged model (a load of
    the weights and one caption: a broken model fails here, not when served).
    """
    weights = Path(weights)
    with staging_near(weights), tracking.active_run(run_id, uri):
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(CODE_FILE),
            artifacts={WEIGHTS: str(weights)},
            signature=signature(),
            input_example=input_example(example_image),
            pip_requirements=PIP_REQUIREMENTS,
            model_config=dict(MODEL_CONFIG),
            metadata={"raylora": {"task": "image-captioning", **(metadata or {})}},
        )
