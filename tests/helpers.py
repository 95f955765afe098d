"""What the tests share: running dilo under torchrun or python with timeouts (always cleaned
up), simulated workers in threads, and the small model of the streaming reference.

Test modules import from here (`from tests.helpers import ...`), never from conftest.py or
from one another; conftest.py holds only fixtures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from tools.proctree import kill_tree

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a multi-process run takes seconds on 2 cores.
SMALL = [
    "--config", str(REPO / "configs" / "tiny.toml"),
    "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.seq_len", "32",
    "--data.max_bytes", "400000", "--data.batch_size", "4", "--data.eval_batches", "2",
    "--inner.warmup_steps", "5", "--metrics.progress", "off", "--run.threads", "1",
]

# Set by torchrun in its workers; a test run started from inside one must not inherit them.
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# -- processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "dilo.train", *args]


def child_env() -> dict:
    """The environment for a child process: this repository importable, one thread, no
    torchrun variables (a copy: os.environ itself is never changed)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in _LAUNCH_ENV:
        env.pop(var, None)
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
        """SIGKILL the process, every descendant and its process group.

        torchrun starts its workers in sessions of their own, so killing the launcher's
        group alone would orphan them: the tree is walked first (kill_tree), then the
        group catches what is left of a launcher that already exited.
        """
        if p.poll() is None:  # (once reaped, its pid may belong to someone else)
            kill_tree(p.pid)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)

    def cleanup(self) -> None:
        for p in self.procs:
            self.kill(p)


def summaries(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("summary-*.json"))]


def numba_skip(what: str) -> tuple[str, object]:
    """(reason, skip marker) for a test of the numba kernels; `what`: what cannot run without numba."""
    import pytest

    from dilo import codec_kernels  # (helpers imports no dilo at the top)
    reason = f"numba not installed: {what} (`pip install -e .[test]` or `pip install numba` re-enables it)"
    return reason, pytest.mark.skipif(codec_kernels.numba is None, reason=reason)


# -- simulated workers ----------------------------------------------------------------------
def run_workers(fn, num_workers: int, timeout: float = 120.0) -> list:
    """fn(rank) in num_workers threads (with the in-process backend, dilo/comm/local.py);
    returns results in rank order, re-raises the first error."""
    results: list = [None] * num_workers
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(num_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        raise AssertionError(f"workers still running after {timeout}s")
    if errors:
        raise errors[0]
    return results


# -- the streaming reference's model (tests/test_streaming_reference.py and its users) -------
class Net(nn.Module):
    """A residual stack: embedding, a ModuleList of blocks, head (like the GPT, in small)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.tanh(self.emb(x))
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def batch(worker: int, step: int):
    g = torch.Generator().manual_seed(7919 * worker + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))


def inner_step(model, opt, worker: int, step: int) -> None:
    x, y = batch(worker, step)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def diloco_pair(codec: str, groups: list, steps: int = 6, inner_steps: int = 2) -> list:
    """Two in-process workers (`groups`: two of `local_groups`) run `Net` with DiLoCo for `steps`
    inner steps: per worker (θ, outer momentum, the SyncStats of its outer steps, the live
    parameters flat), in rank order."""
    from dilo import DiLoCo  # (helpers imports no dilo at the top)

    models = [Net() for _ in range(2)]  # (built here: Net seeds torch's global generator)

    def worker(r):
        model = models[r]
        opt = adamw(model)
        d = DiLoCo(model, opt, inner_steps=inner_steps, codec=codec, group=groups[r])
        stats = []
        for step in range(steps):
            inner_step(model, opt, r, step)
            s = d.step()
            if s is not None:
                stats.append(s)
        d.close()
        live = torch.cat([p.detach().reshape(-1) for p in d.params])
        return d.global_params.clone(), d.momentum().clone(), stats, live
    return run_workers(worker, 2)


@contextmanager
def swarm_trio():
    """Three in-process swarm peers on loopback (the first bootstraps the others), sorted by
    name and registered as one round group: yields (peers, groups); closes the peers after."""
    from dilo.comm.swarm import SwarmGroup
    from dilo.comm.swarm_auth import RunAuth

    def peer(initial):
        return SwarmGroup(auth=RunAuth(b"k" * 20), settings={}, initial=initial,
                          listen=["/ip4/127.0.0.1/tcp/0"], announce=[], timeout=30.0)

    peers = [peer([])]
    try:
        peers += [peer(peers[0].addresses[:1]) for _ in range(2)]
        names = sorted(p.name for p in peers)
        peers.sort(key=lambda p: p.name)
        group_id = os.urandom(16)

        async def register(p):
            return p.rounds.mailboxes.register(group_id, 0, names)

        yield peers, [p.node.run(register(p)) for p in peers]
    finally:
        for p in peers:
            p.close()
