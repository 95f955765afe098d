"""Crash-consistent checkpoints, one file per worker per outer step.

Layout: `<run.dir>/checkpoints/step-<outer step:06d>/worker-<w>.pt`.

A file is `MAGIC | sha256(payload) | len(payload) | payload`, where the payload is
`torch.save` of a dict of tensors and plain values. It is written to a temporary name,
fsynced, renamed into place and the directory fsynced, so a crash leaves either the
old set of files or the new one, never a file that looks valid but is not. Loading
checks magic, length and checksum before unpickling (with `weights_only=True`), so a
truncated or corrupt file is refused as a whole, never half-loaded.

A worker killed while writing leaves at most a temporary `.worker-<w>.pt.<random>.tmp`
file (dilo/atomic_write.py), which nothing reads and its next prune removes; the step
folder then simply lacks that worker's file.

`AsyncWriter` moves the write off the training thread: the state is copied to CPU
memory at the step boundary, serialised and written in a background thread, at most one
write in flight (a second request waits for the first; none is ever skipped).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import threading
import time
from pathlib import Path

import torch

from dilo import atomic_write

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


def write_atomic(path: Path, state: dict) -> None:
    """`MAGIC | sha256 | length | payload` to `path`, atomically and durably."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = _HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload))
    atomic_write.write_bytes(path, header, payload)


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


def save(run_dir: str | Path, worker: int, outer_step: int, state: dict, keep: int,
         num_workers: int = 1) -> Path:
    """Write this worker's checkpoint for `outer_step`, then keep only its newest `keep`."""
    path = worker_file(step_dir(run_dir, outer_step), worker)
    write_atomic(path, state)
    prune(run_dir, worker, keep, num_workers)
    return path


def prune(run_dir: str | Path, worker: int | str, keep: int, num_workers: int = 1) -> None:
    """Delete this worker's files older than its newest `keep`.

    The files of departed slots (worker ids >= num_workers after the world shrank) are
    pruned by worker `id mod num_workers`; the last file out removes the step folder.
    """
    steps = [s for s in list_steps(run_dir) if worker_file(step_dir(run_dir, s), worker).exists()]
    for old in steps[:-keep]:
        directory = step_dir(run_dir, old)
        try:  # the other workers prune the same folder at the same time: it may vanish
            for path in list(directory.glob("worker-*.pt")):
                slot = path.stem.split("-", 1)[1]  # a rank, or a swarm peer's name (peer-...)
                departed = (isinstance(worker, int) and slot.isdigit() and int(slot) >= num_workers
                            and int(slot) % num_workers == worker)
                if slot == str(worker) or departed:
                    path.unlink(missing_ok=True)
            for tmp in list(directory.glob(f".worker-{worker}.pt.*.tmp")):  # left by a killed writer
                tmp.unlink(missing_ok=True)
            directory.rmdir()  # the last worker to prune removes the folder
        except OSError:  # gone already, or not empty yet
            pass


def list_steps(run_dir: str | Path) -> list[int]:
    """Outer steps that have a checkpoint folder, oldest first (not yet verified)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(steps)


def set_aside(run_dir: str | Path) -> Path | None:
    """`checkpoint.resume fresh`: rename `<run.dir>/checkpoints` to `checkpoints.old-<UTC time>`
    (nothing is deleted); None if there is none. Several processes may call it at once on a
    shared filesystem: the first renames, the others find it gone."""
    root = checkpoint_root(run_dir)
    aside = root.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    try:
        if not any(root.iterdir()):
            return None
        root.rename(aside)
    except FileNotFoundError:  # no checkpoints, or another process moved them first
        return None
    except OSError as e:  # e.g. another process's rename won with the same name
        if aside.is_dir() and not root.exists():
            return None
        raise CheckpointError(f"checkpoint.resume = fresh: cannot set aside {root}: {e}") from None
    return aside


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


def snapshot(state: object) -> object:
    """A deep copy of a state dict with every tensor copied to CPU memory.

    Taken at the step boundary, it no longer changes when training goes on (optimizer
    moments and θ are updated in place by the next steps).
    """
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, list):
        return [snapshot(v) for v in state]
    if isinstance(state, tuple):
        return tuple(snapshot(v) for v in state)
    return state


class AsyncWriter:
    """Checkpoint writes in a background thread, at most one in flight.

    `save()` snapshots the state on the caller's thread (the copy to CPU at the step
    boundary), starts the write and returns; serialising, writing, fsync, rename and
    pruning run in the background, so training does not wait for the disk. Memory is
    bounded by one snapshot: a `save()` while the previous write is still running first
    waits for it (it is never skipped, so `resume auto` finds the same checkpoints as
    with synchronous writes) and returns how long it waited. A failed background write
    is raised by the next `save()` or `wait()`, never lost.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_seconds = 0.0

    def save(self, run_dir: str | Path, worker: int, outer_step: int, state: dict, keep: int,
             num_workers: int = 1) -> tuple[Path, float]:
        """Start writing; returns (the file it will be, seconds waited for the previous write)."""
        waited = self.wait()
        frozen = snapshot(state)
        path = worker_file(step_dir(run_dir, outer_step), worker)
        self._thread = threading.Thread(
            target=self._write, args=(run_dir, worker, outer_step, frozen, keep, num_workers),
            name=f"dilo-checkpoint-{outer_step}", daemon=False)
        self._thread.start()
        return path, waited

    def _write(self, run_dir, worker, outer_step, state, keep, num_workers) -> None:
        start = time.perf_counter()
        try:
            save(run_dir, worker, outer_step, state, keep, num_workers)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e
        self.last_write_seconds = time.perf_counter() - start

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> float:
        """Block until the write in flight (if any) is on disk; return the seconds waited."""
        start = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint write failed: {error}") from error
        return time.perf_counter() - start
