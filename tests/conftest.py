"""Shared test helpers: run dilo under torchrun or python with timeouts, always cleaned up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools.proctree import children, descendants  # noqa: F401  (the tests import them from here)

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a multi-process run takes seconds on 2 cores.
SMALL = [
    "--config", str(REPO / "configs" / "tiny.toml"),
    "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.seq_len", "32",
    "--data.max_bytes", "400000", "--data.batch_size", "4", "--data.eval_batches", "2",
    "--inner.warmup_steps", "5", "--metrics.progress", "off", "--run.threads", "1",
]




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "dilo.train", *args]


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


class Procs:
    """Starts processes in their own process group; kills every one of them at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        f = open(log, "wb")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**child_env(), **(env or {})},
                             cwd=REPO, start_new_session=True)
        f.close()
        self.procs.append(p)
        return p

    def run(self, cmd: list[str], log: Path, timeout: float = 240) -> subprocess.CompletedProcess:
        p = self.start(cmd, log)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
        return subprocess.CompletedProcess(cmd, rc, log.read_text(), "")

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        """SIGKILL the process, its process group and every descendant.

        torchrun starts its workers in sessions of their own, so killing the launcher's
        group alone would orphan them: walk the tree first, then kill it all.
        """
        victims = descendants(p.pid)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)

    def cleanup(self) -> None:
        for p in self.procs:
            self.kill(p)


@pytest.fixture
def procs():
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


def summaries(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("summary-*.json"))]
