"""Crash-consistent checkpoints, one file per worker per outer step.

Layout: `<run.dir>/checkpoints/step-<outer step:06d>/worker-<w>.pt`.

A file is `MAGIC | sha256(payload) | len(payload) | payload`, where the payload is
`torch.save` of a dict of tensors and plain values. It is written to a temporary name,
fsynced, renamed into place and the directory fsynced, so a crash leaves either the
old set of files or the new one, never a file that looks valid but is not. Loading
checks magic, length and checksum before unpickling (with `weights_only=True`), so a
truncated or corrupt file is refused as a whole, never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import struct
from pathlib import Path

import torch

log = logging.getLogger("dilo")

MAGIC = b"DILOCKP1"
_HEADER = struct.Struct("<8s32sQ")
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, outer_step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{outer_step:06d}"


def worker_file(directory: Path, worker: int) -> Path:
    return directory / f"worker-{worker}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = _HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def read_verified(path: str | Path) -> dict:
    """Load a checkpoint file, or raise CheckpointError saying what is wrong with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if len(data) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    magic, digest, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a dilo checkpoint (bad magic)")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(payload)} of {length} payload bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def save(run_dir: str | Path, worker: int, outer_step: int, state: dict, keep: int) -> Path:
    """Write this worker's checkpoint for `outer_step`, then keep only its newest `keep`."""
    path = worker_file(step_dir(run_dir, outer_step), worker)
    write_atomic(path, state)
    for old in list_steps(run_dir)[:-keep]:
        directory = step_dir(run_dir, old)
        worker_file(directory, worker).unlink(missing_ok=True)
        try:
            directory.rmdir()  # the last worker to prune removes the folder
        except OSError:
            pass
    return path


def list_steps(run_dir: str | Path) -> list[int]:
    """Outer steps that have a checkpoint folder, oldest first (not yet verified)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(steps)


def valid_steps(run_dir: str | Path, worker: int) -> list[int]:
    """Steps whose file for `worker` passes verification; corrupt ones are skipped loudly."""
    good = []
    for step in list_steps(run_dir):
        path = worker_file(step_dir(run_dir, step), worker)
        if not path.exists():
            continue
        try:
            read_verified(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        good.append(step)
    return good


def newest_common_step(steps_per_worker: list[list[int]]) -> int | None:
    """The newest step every worker can resume from, or None."""
    common = set(steps_per_worker[0]).intersection(*map(set, steps_per_worker[1:]))
    return max(common) if common else None


def resolve_init_from(path: str | Path) -> Path:
    """`checkpoint.init_from` may name a worker file or a step folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("worker-*.pt"))
        if not files:
            raise CheckpointError(f"checkpoint.init_from={path}: folder holds no worker-*.pt file")
        return files[0]
    if not path.exists():
        raise CheckpointError(f"checkpoint.init_from={path}: no such file or folder")
    return path


def clear(run_dir: str | Path) -> None:
    shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)
