"""Image references: how a record names its image, and opening one.

A reference is a local path, a URI (``s3://bucket/key.jpg``, anything pyarrow reaches), or an image
inside a container file, spelled ``<container>#offset=<o>&size=<n>`` (a WebDataset tar member's
bytes, stored uncompressed at that offset) or ``<container>#row=<r>&column=<c>`` (the image bytes of
row ``r``, from 0, of a Parquet or Arrow file). Any node opens any of them through the store: no
shared file system is needed, and nothing is extracted to disk.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from typing import Any, BinaryIO

from raylora.files import filesystem, is_remote, read_bytes

_REF_RE = re.compile(
    r"^(?P<container>.+)#(?:offset=(?P<offset>\d+)&size=(?P<size>\d+)|row=(?P<row>\d+)&column=(?P<column>[^&#]+))$"
)
_ROW_CACHE: OrderedDict[tuple[str, int, str], Any] = OrderedDict()  # (file, row group, column) -> array
_ROW_CACHE_SIZE = 8
_FILE_CACHE: dict[str, tuple[Any, list[int]]] = {}  # file -> (reader, first row of each row group)


def member_ref(container: str, offset: int, size: int) -> str:
    """The reference of ``size`` bytes at ``offset`` of ``container`` (a tar member's data)."""
    return f"{container}#offset={offset}&size={size}"


def row_ref(container: str, row: int, column: str) -> str:
    """The reference of the image bytes in ``column`` of row ``row`` (from 0) of a Parquet/Arrow file."""
    return f"{container}#row={row}&column={column}"


def container_of(ref: str) -> str:
    """The file that holds the image: the container of a member or row reference, else ``ref``."""
    m = _REF_RE.match(ref)
    return m["container"] if m else ref


def open_image(ref: str) -> str | BinaryIO:
    """What ``PIL.Image.open`` takes for a reference: a local path as is, else the bytes in memory.
    FileNotFoundError when the file is not there; ``EOFError`` when a member is cut short."""
    m = _REF_RE.match(ref)
    if m is None:
        return ref if not is_remote(ref) else io.BytesIO(read_bytes(ref))
    container = m["container"]
    if m["offset"] is not None:
        size = int(m["size"])
        data = read_bytes(container, int(m["offset"]), size)
        if len(data) < size:
            raise EOFError(f"{ref}: the container ends {size - len(data)} bytes into the image (truncated)")
        return io.BytesIO(data)
    value = _row_value(container, int(m["row"]), m["column"])
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes):
        raise ValueError(f"{ref}: the row holds no image bytes")
    return io.BytesIO(value)


def _row_value(container: str, row: int, column: str) -> Any:
    import bisect

    reader, starts = _open_table(container)
    group = bisect.bisect_right(starts, row) - 1
    key = (container, group, column)
    array = _ROW_CACHE.get(key)
    if array is None:
        if hasattr(reader, "read_row_group"):
            array = reader.read_row_group(group, columns=[column]).column(column)
        else:
            array = reader.column(column)
        _ROW_CACHE[key] = array
        while len(_ROW_CACHE) > _ROW_CACHE_SIZE:
            _ROW_CACHE.popitem(last=False)
    else:
        _ROW_CACHE.move_to_end(key)
    return array[row - starts[group]].as_py()


def _open_table(container: str) -> tuple[Any, list[int]]:
    """A Parquet file's reader and row-group starts, or an Arrow file's (memory-mapped) table."""
    cached = _FILE_CACHE.get(container)
    if cached is not None:
        return cached
    reader, starts = open_table(container)
    if len(_FILE_CACHE) > 64:
        _FILE_CACHE.clear()
    _FILE_CACHE[container] = (reader, starts)
    return reader, starts


def open_table(uri: str) -> tuple[Any, list[int]]:
    """A Parquet file (``pyarrow.parquet.ParquetFile``, with the first row of each row group) or an
    Arrow IPC file or stream as written by ``datasets``' ``save_to_disk`` (a ``pyarrow.Table``, one
    group). Raises ``pyarrow.ArrowInvalid`` / OSError on a file that is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if uri.endswith(".arrow"):
        source = pa.memory_map(uri) if not is_remote(uri) else pa.BufferReader(read_bytes(uri))
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
        return table, [0]
    fs, path = filesystem(uri)
    pf = pq.ParquetFile(fs.open_input_file(path))
    starts, n = [], 0
    for i in range(pf.metadata.num_row_groups):
        starts.append(n)
        n += pf.metadata.row_group(i).num_rows
    return pf, starts or [0]
