"""Replace a file atomically: readers see the old bytes or the new ones, never a mix.

The bytes go to a temporary file in the same folder (same filesystem, so the rename is
atomic), are flushed and fsynced, the file is renamed over the target, and the folder
is fsynced so the rename itself survives a power cut. A writer killed at any point
leaves at most a hidden `.<name>.*.tmp` file beside the old one, never a torn target.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, *chunks: bytes, durable: bool = True) -> Path:
    """Write the concatenation of `chunks` to `path` atomically; `durable` adds the fsyncs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str, durable: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | Path, doc: Any, default: Callable[[Any], Any] | None = None,
               sort_keys: bool = False, durable: bool = True) -> Path:
    """`doc` as indented JSON (NaN and Inf refused: they are not JSON) plus a newline."""
    text = json.dumps(doc, indent=2, allow_nan=False, default=default, sort_keys=sort_keys) + "\n"
    return write_text(path, text, durable=durable)
