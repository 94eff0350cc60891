"""File-system helpers every stage shares: the cache root, atomic output folders, a cross-process
lock, and telling local paths from remote URIs (``s3://``, ``gs://``, ...)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """``$RAYLORA_CACHE`` or ``~/.cache/raylora``: demo assets, converted checkpoints, MLflow downloads."""
    root = os.environ.get("RAYLORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "raylora"


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI such as ``s3://bucket/x`` (``file://`` counts as local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def absolute(path: str | os.PathLike) -> str:
    """A remote URI unchanged, a local path made absolute (what Ray and pyarrow want)."""
    text = str(path)
    if is_remote(text):
        return text
    return os.path.abspath(text[len("file://") :] if text.startswith("file://") else text)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file does not exist."""
    p = Path(path)
    if default is not None and not p.is_file():
        return default
    return json.loads(p.read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder all at once: yields a temp folder next to ``target``, renamed to it on success.

    On an exception the temp folder is deleted and ``target`` is untouched. A non-empty ``target``
    is an error unless ``overwrite``; a replaced one is moved aside until the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            if target.is_dir() and any(target.iterdir()) and not overwrite:
                raise FileExistsError(f"{target} is not empty (it appeared while writing); nothing replaced")
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None and not target.exists():
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock between processes on this machine (e.g. Ray workers building one cache)."""
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
