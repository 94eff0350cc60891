"""Serving every adapter from one base model: the OpenAI-compatible request and response shapes, the
adapter catalog, and the replica that captions (no Ray Serve here: :mod:`raylora.serve_app` wraps it).

A request is OpenAI's ``POST /v1/chat/completions``: ``model`` names an adapter of the catalog (or the
base model, for no adapter), the last user message holds one image as an ``image_url`` part (a
``data:image/...;base64,`` URL; ``http(s)://`` only with ``serve.allow_remote_images``; never a
local path) and, optionally, text parts (the prompt; default the evaluation prompt). ``max_tokens``
(up to ``serve.max_tokens``), ``temperature`` (0: greedy, the evaluation protocol, so a caption equals
``raylora caption``'s; > 0: sampling) and ``n`` (1) are honoured. Every refusal is an
:class:`APIError`: an HTTP status and OpenAI's error object.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
import urllib.request
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylora.config import ServeConfig
from raylora.generation import GenerationSettings, generate_captions
from raylora.serving import InputError, check_image
from raylora.sources import ModelSource, load_model, resolve_source

DEFAULT_MAX_TOKENS = 30  # the evaluation protocol's caption length


class APIError(Exception):
    """A refused request: ``status`` and OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class CaptionRequest:
    """One chat completion to answer: the catalog name, the image bytes and the decoding."""

    model: str
    image: bytes
    prompt: str
    max_tokens: int
    temperature: float


# ------------------------------------------------------------------------------------ the catalog


def parse_adapters(values: list[str]) -> dict[str, str]:
    """``NAME=SPEC`` arguments (SPEC an adapter folder or a ``models:/`` URI) -> {name: spec}."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ValueError(f"--adapter {value!r}: expected NAME=SPEC (a folder or models:/NAME@ALIAS)")
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        out[name.strip()] = spec.strip()
    return out


def registered_adapters(name: str, tracking_uri: str | None = None) -> dict[str, str]:
    """Every version of the registered model ``name``, as ``NAME/VERSION``, and every alias, as
    ``NAME@ALIAS``: the names a client asks for."""
    from raylora import tracking

    client = tracking.client(tracking_uri)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise ValueError(f"no registered model {name!r} (or it has no versions) in {tracking.current_uri()}")
    out = {
        f"{name}/{v.version}": f"models:/{name}/{v.version}"
        for v in sorted(versions, key=lambda v: int(v.version))
    }
    for alias in sorted(client.get_registered_model(name).aliases):  # search results may not carry them
        out[f"{name}@{alias}"] = f"models:/{name}@{alias}"
    return out


def same_base(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def base_of(adapters: dict[str, str], base: str | None) -> str:
    """The base model to serve: ``base``, else the one every adapter records (an error naming them
    when they record different ones)."""
    if base:
        return base
    if not adapters:
        raise ValueError("nothing to serve: give --adapter NAME=SPEC, --registered NAME or --base MODEL")
    bases = {name: resolve_source(spec).base_dir for name, spec in adapters.items()}
    first = next(iter(bases.values()))
    other = {n: b for n, b in bases.items() if not same_base(b, first)}
    if other:
        raise ValueError(
            f"the adapters record different base models ({', '.join(f'{n}: {b}' for n, b in bases.items())}); "
            "serve each base separately, or name one with --base"
        )
    return str(first)


# ------------------------------------------------------------------------------------ the request


def _image_bytes(url: str, cfg: ServeConfig) -> bytes:
    if url.startswith("data:"):
        head, sep, body = url.partition(",")
        if not sep or ";base64" not in head:
            raise APIError(
                400,
                "the image_url is a data: URL without base64 data (data:image/jpeg;base64,...)",
                "messages",
            )
        if len(body) * 3 // 4 > cfg.max_image_bytes:
            raise APIError(
                413, f"the image is over serve.max_image_bytes ({cfg.max_image_bytes} bytes)", "messages"
            )
        try:
            return base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image_url's data is not valid base64", "messages") from None
    if url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise APIError(
                400,
                "remote image URLs are refused (serve.allow_remote_images is off): send the image as a "
                "data:image/...;base64, URL",
                "messages",
            )
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                data = r.read(cfg.max_image_bytes + 1)
        except OSError as e:
            raise APIError(400, f"the image could not be fetched: {e}", "messages") from None
        if len(data) > cfg.max_image_bytes:
            raise APIError(
                413, f"the image is over serve.max_image_bytes ({cfg.max_image_bytes} bytes)", "messages"
            )
        return data
    raise APIError(400, "an image_url must be a data: URL (base64); local paths are never read", "messages")


def parse_chat_request(body: Any, cfg: ServeConfig, models: list[str]) -> CaptionRequest:
    """An OpenAI chat completion request -> what to caption; APIError (4xx) saying what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(
            400, "'model' is required: an adapter name or the base model (GET /v1/models)", "model"
        )
    if model not in models:
        raise APIError(
            404,
            f"the model {model!r} does not exist; served: {', '.join(models)}",
            "model",
            "model_not_found",
        )
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    if body.get("stream"):
        raise APIError(400, "streaming is not supported", "stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, cfg.max_tokens)
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= cfg.max_tokens
    ):
        raise APIError(
            400, f"max_tokens must be an integer from 1 to {cfg.max_tokens}, got {max_tokens!r}", "max_tokens"
        )
    temperature = body.get("temperature", 0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be a number from 0 to 2, got {temperature!r}", "temperature")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        raise APIError(400, "no user message", "messages")
    content = user.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise APIError(400, "a message's content must be a string or a list of parts", "messages")
    texts, urls = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise APIError(400, "an image_url part needs image_url.url", "messages")
            urls.append(url)
        else:
            raise APIError(400, f"unsupported content part {kind!r}: text and image_url only", "messages")
    if len(urls) != 1:
        what = "no image" if not urls else f"{len(urls)} images"
        raise APIError(400, f"the user message has {what}: send exactly one image_url part", "messages")
    data = _image_bytes(urls[0], cfg)
    try:
        check_image(data, 0)
    except InputError as e:
        raise APIError(400, str(e).removeprefix("row 0: "), "messages") from None
    prompt = " ".join(t.strip() for t in texts if t.strip()) or GenerationSettings().prompt
    return CaptionRequest(model, data, prompt, int(max_tokens), float(temperature))


def completion(request: CaptionRequest, caption: str, tokens: int) -> dict[str, Any]:
    """OpenAI's chat.completion object for a caption."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": caption},
                "finish_reason": "length" if tokens >= request.max_tokens else "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens},
    }


# ------------------------------------------------------------------------------------ the replica


class CaptionReplica:
    """One base model and the adapters loaded on it (the ``max_adapters`` most recently used)."""

    def __init__(self, base: str, adapters: dict[str, str], cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.catalog = dict(adapters)
        import torch

        from raylora.model import torch_dtype

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.source = resolve_source(base)
        self.base_name = Path(str(self.source.base_dir)).name
        self.model = load_model(self.source, dtype=torch_dtype(cfg.dtype, device)).to(device)
        self.settings = self.source.image_settings(cfg.max_num)
        self.conv_tok = self.settings.conversation_tokenizer()
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()  # one generate at a time on this replica's model

    def models(self) -> list[str]:
        return [self.base_name, *self.catalog]

    def _adapter_source(self, name: str) -> ModelSource:
        source = resolve_source(self.catalog[name])
        if source.adapter_dir is None:
            raise APIError(400, f"{name!r} ({self.catalog[name]}) is not an adapter", "model")
        if not same_base(source.base_dir, self.source.base_dir):
            raise APIError(
                400,
                f"the adapter {name!r} was trained on {source.base_dir}, but this server's base model is "
                f"{self.source.base_dir}: serve it with --base {source.base_dir}",
                "model",
                "base_mismatch",
            )
        return source

    def use(self, name: str) -> None:
        """Make ``name`` the active adapter, loading it (and evicting the least recently used)."""
        from peft import PeftModel

        if name in self.loaded:
            self.loaded.move_to_end(name)
        else:
            source = self._adapter_source(name)
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, str(source.adapter_dir), adapter_name=name)
            else:
                self.model.load_adapter(str(source.adapter_dir), adapter_name=name)
            self.loaded[name] = None
            while len(self.loaded) > self.cfg.max_adapters:
                old, _ = self.loaded.popitem(last=False)
                self.model.delete_adapter(old)
        self.model.set_adapter(name)
        self.model.eval()

    def caption(self, requests: list[CaptionRequest]) -> list[tuple[str, int] | APIError]:
        """Captions (and their token counts) of a batch, in order: grouped by adapter and decoding,
        one generate call per group; a group that fails answers each of its requests with the error."""
        import contextlib

        out: list[tuple[str, int] | APIError | None] = [None] * len(requests)
        groups: dict[tuple[str, int, float, str], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.model, r.max_tokens, r.temperature, r.prompt), []).append(i)
        with self.lock:
            for (model, max_tokens, temperature, prompt), members in groups.items():
                try:
                    if model == self.base_name:
                        disable = getattr(self.model, "disable_adapter", None)
                        context = disable() if disable is not None else contextlib.nullcontext()
                    else:
                        self.use(model)
                        context = contextlib.nullcontext()
                    gen = GenerationSettings(
                        prompt=prompt,
                        min_new_tokens=min(8, max_tokens),
                        max_new_tokens=max_tokens,
                        batch_size=max(1, len(members)),
                        temperature=temperature,
                    )
                    with context:
                        images = [io.BytesIO(requests[i].image) for i in members]
                        captions = generate_captions(self.model, self.conv_tok, self.settings, images, gen)
                    for i, text in zip(members, captions):
                        tokens = len(self.conv_tok.tokenizer.encode(text, add_special_tokens=False))
                        out[i] = (text, tokens)
                except APIError as e:
                    for i in members:
                        out[i] = e
                except Exception as e:  # a replica answers every request, whatever one group does
                    for i in members:
                        out[i] = APIError(500, f"captioning failed: {type(e).__name__}: {e}")
        return [o if o is not None else APIError(500, "no caption") for o in out]
