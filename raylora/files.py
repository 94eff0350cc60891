"""File-system helpers every stage shares: the cache root, atomic output folders, a cross-process
lock, telling local paths from remote URIs (``s3://``, ``gs://``, ...), and hiding the credentials
a URI may carry before it is printed or logged."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
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


REDACTED = "***"
# scheme://rest-of-the-URI (up to whitespace, quotes or angle brackets: a URI inside a longer text)
_URI = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s'\"<>]*)")
# a query parameter whose value is a credential: access_token, api_key, password, X-Amz-Signature, sig, ...
_SECRET_PARAM = re.compile(r"token|passw|pwd|secret|key|signature|credential|^sig$|^x-amz-", re.IGNORECASE)
# NAME=value where NAME looks like a secret environment variable (AWS_SECRET_ACCESS_KEY=..., HF_TOKEN=...)
_SECRET_NAME = r"(?:[A-Z0-9]+_)*(?:TOKEN|PASSWORD|PASSWD|SECRET|KEY|CREDENTIALS?|SIGNATURE)(?:_[A-Z0-9]+)*"
_SECRET_ENV = re.compile(rf"\b(?P<name>{_SECRET_NAME})=(?P<value>[^\s&'\"]+)")
_MIN_SECRET_LENGTH = 8  # shorter values of secret variables ("1", "true") are not hidden everywhere


def _redact_userinfo(rest: str) -> str:
    """``user:password@host...`` -> ``user:***@host...`` (``rest`` follows ``scheme://``)."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]  # RFC 3986: the authority ends at / ? #
    if "@" in authority:
        userinfo, _, _ = authority.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        return f"{user}:{REDACTED}" + rest[len(userinfo) :] if colon else rest
    # a password with an unencoded "/" (e.g. an S3 secret key) ends the authority early; a port
    # (digits) or an IPv6 host ("[") means there is no password here
    user, colon, after = authority.partition(":")
    if colon and after and not after.isdigit() and not authority.startswith("[") and "@" in rest:
        return f"{user}:{REDACTED}" + rest[rest.index("@") :]
    return rest


def _redact_query(rest: str) -> str:
    """Values of secret-looking query parameters -> ``***``."""
    head, q, tail = rest.partition("?")
    if not q:
        return rest
    query, hash_, fragment = tail.partition("#")
    parts = []
    for part in re.split(r"([&;])", query):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}={REDACTED}" if eq and _SECRET_PARAM.search(name) else part)
    return f"{head}?{''.join(parts)}{hash_}{fragment}"


def redact(value: str) -> str:
    """``value`` with its credentials replaced by ``***``, for printing and logging.

    In every ``scheme://`` URI: the password of the userinfo (``https://alice:***@host``, the user
    stays readable) and the values of query parameters whose names look secret (token, password,
    secret, key, signature, credential, sig, X-Amz-*). Outside URIs: the values of secret-looking
    environment variable assignments (``AWS_SECRET_ACCESS_KEY=***``), and wherever it appears, the
    value of any such variable set in this process's environment (``HF_TOKEN``,
    ``MLFLOW_TRACKING_PASSWORD``, ...; values of 8 characters or more). Paths, ``runs:/`` and
    ``models:/`` URIs and everything else are unchanged.
    """
    text = _URI.sub(lambda m: m["scheme"] + _redact_query(_redact_userinfo(m["rest"])), str(value))
    text = _SECRET_ENV.sub(lambda m: f"{m['name']}={REDACTED}", text)
    for name, secret in environ_snapshot().items():
        if len(secret) >= _MIN_SECRET_LENGTH and secret in text and re.fullmatch(_SECRET_NAME, name):
            text = text.replace(secret, REDACTED)
    return text


def environ_snapshot() -> dict[str, str]:
    """A copy of ``os.environ`` that library threads cannot change under the caller.

    Iterating ``os.environ`` while another thread sets or unsets a variable (MLflow's telemetry
    thread did, raylora switches it off) raises KeyError or RuntimeError; copying the underlying
    dict is one step under the GIL.
    """
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        raw = data.copy()
        return {os.fsdecode(k): os.fsdecode(v) for k, v in raw.items()}
    for _ in range(100):  # another Mapping implementation: retry a torn read
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return {}


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file does not exist."""
    p = Path(path)
    if default is not None and not p.is_file():
        return default
    return json.loads(p.read_text(encoding="utf-8"))


def filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """The pyarrow file system of a local path or URI (``s3://``, ``gs://``, ``hdfs://``, ...) and the
    path within it. S3's endpoint and credentials come from the AWS SDKs' environment variables
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...); file systems are cached per process."""
    import pyarrow.fs as pafs

    text = str(uri)
    if not is_remote(text):
        return pafs.LocalFileSystem(), absolute(text)
    scheme, rest = text.split("://", 1)
    if scheme not in ("s3", "gs", "gcs"):  # their paths are bucket/key; others (hdfs://host/...) vary
        return pafs.FileSystem.from_uri(text)
    key = (scheme, rest.split("/", 1)[0], os.environ.get("AWS_ENDPOINT_URL", ""))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        fs, path = pafs.FileSystem.from_uri(text)
        _FILESYSTEMS[key] = fs
        return fs, path
    return fs, rest


_FILESYSTEMS: dict[tuple[str, str, str], Any] = {}


def join_uri(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path (os.path) or a URI (``/``-separated)."""
    text = str(base)
    if not is_remote(text):
        return os.path.join(text, *parts)
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])


@dataclass
class FileEntry:
    """A file of a listing: where it is (a path or URI), its size and modification time (ns)."""

    uri: str
    size: int
    mtime_ns: int


def file_entry(uri: str | os.PathLike) -> FileEntry | None:
    """Size and modification time of one file (local or URI); None when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return _entry(str(uri), info) if info.type == pafs.FileType.File else None


def _entry(uri: str, info: Any) -> FileEntry:
    return FileEntry(uri, int(info.size or 0), int(info.mtime_ns or 0))


def list_files(uri: str | os.PathLike, suffixes: tuple[str, ...]) -> list[FileEntry]:
    """The files under a folder or prefix (recursive) whose names end in one of ``suffixes``, sorted
    by name; a single file of those suffixes lists itself."""
    import pyarrow.fs as pafs

    text = str(uri)
    fs, path = filesystem(text)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [_entry(text, info)] if text.endswith(suffixes) else []
    if info.type != pafs.FileType.Directory:
        return []
    out = []
    for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if f.type == pafs.FileType.File and f.path.endswith(suffixes):
            out.append(_entry(join_uri(text, f.path[len(path) :].lstrip("/")), f))
    return sorted(out, key=lambda e: e.uri)


def is_dir(uri: str | os.PathLike) -> bool:
    """True for an existing local folder or a URI prefix that holds files."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str | os.PathLike, offset: int = 0, size: int | None = None) -> bytes:
    """A file's bytes (local or URI), or ``size`` bytes from ``offset``. FileNotFoundError when missing."""
    if not is_remote(str(uri)):
        with open(absolute(uri), "rb") as f:
            f.seek(offset)
            return f.read() if size is None else f.read(size)
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        if size is None:
            f.seek(offset)
            return f.read()
        return f.read_at(size, offset)


def read_text(uri: str) -> str | None:
    """A small file's text (local path or URI such as ``s3://``), None when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a small file (local path or URI), creating its folder."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def remove_dir(uri: str) -> None:
    """Delete a folder (local path or URI); nothing when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


class NoSpaceError(OSError):
    """A write that ran out of disk space, in one readable line: the path, what it needs, what is free."""

    def __str__(self) -> str:
        return self.strerror or "no space left on device"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 0


def tree_size(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (a file: its size)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _out_of_space(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if isinstance(error, shutil.Error):  # copytree: a list of (src, dst, reason) for every failed file
        return any("No space left" in str(part) or "Errno 28" in str(part) for part in error.args[0])
    return False


@contextlib.contextmanager
def writes_to(path: str | os.PathLike, needed_bytes: int) -> Iterator[None]:
    """Writing about ``needed_bytes`` under ``path``: refused up front when the device has less free,
    and a full disk on the way (ENOSPC, or copytree's list of them) becomes one NoSpaceError line
    naming the path, what it needs and what is free."""
    target = Path(path)

    def error() -> NoSpaceError:
        return NoSpaceError(
            errno.ENOSPC,
            f"no space left on the device of {target}: "
            + (f"writing it needs about {_mib(needed_bytes)}, " if needed_bytes else "")
            + f"{_mib(_free_bytes(target))} free there; free some space or write elsewhere",
        )

    if _free_bytes(target) < needed_bytes:
        raise error()
    try:
        yield
    except (OSError, shutil.Error) as e:
        if _out_of_space(e):
            raise error() from None
        raise


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
