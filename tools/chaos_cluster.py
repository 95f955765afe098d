"""The processes of a chaos run: simulated nodes on this machine, and how to hurt them.

tools/chaos.py talks only to `Cluster`: start a node, list its worker processes, kill a
worker or a whole node, stall a worker, end everything. `TorchrunCluster` is the torch
backend: one elastic torchrun agent per node, started by launch/torchrun_elastic.sh, with
a c10d rendezvous on 127.0.0.1 whose store runs in a process of its own
(dilo.rendezvous_store), so that any node may die. The hivemind backend gets a subclass
of its own (one peer process per node, joined through the DHT), registered in CLUSTERS.

Every process started here is ended by `close()`: agents run in their own process groups,
torchrun starts each worker in a session of its own, and workers of a killed agent are
orphans, so this process makes itself a child subreaper (orphans are re-parented to it),
remembers every worker it ever saw, and kills all of them and all their descendants.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import proctree  # noqa: E402
from tools.proctree import cmdline, descendants, parents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Linux: orphaned descendants are re-parented to this process instead of init."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def is_worker(pid: int) -> bool:
    line = cmdline(pid)
    return "dilo.train" in line and "torch.distributed.run" not in line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_quietly(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Cluster(ABC):
    """A training run's nodes. Subclass once per backend and add it to CLUSTERS."""

    num_nodes: int

    @abstractmethod
    def start_node(self, node: int) -> None:
        """Start (or restart) node `node`; it joins the running job."""

    @abstractmethod
    def node_exit_code(self, node: int) -> int | None:
        """None while the node runs; its exit code once it ended (0: the run finished)."""

    @abstractmethod
    def workers(self, node: int) -> list[int]:
        """Pids of the node's live worker processes."""

    @abstractmethod
    def kill_node(self, node: int) -> list[int]:
        """SIGKILL the node: its launcher and every worker. Returns the pids killed."""

    @abstractmethod
    def close(self) -> None:
        """End every process this cluster started, whatever state it is in."""

    def kill_worker(self, pid: int) -> None:
        signal_quietly(pid, signal.SIGKILL)

    def stall(self, pid: int) -> None:
        signal_quietly(pid, signal.SIGSTOP)

    def unstall(self, pid: int) -> None:
        signal_quietly(pid, signal.SIGCONT)

    def reap(self) -> None:
        """Collect the exit status of orphaned workers re-parented to us (no zombies)."""


class TorchrunCluster(Cluster):
    """`num_nodes` elastic torchrun agents of `procs_per_node` workers each, on 127.0.0.1."""

    def __init__(self, run_dir: Path, num_nodes: int, procs_per_node: int, train_args: list[str],
                 log_dir: Path, shutdown_timeout: int = 10, extra_env: dict | None = None):
        become_subreaper()
        self.extra_env = dict(extra_env or {})  # e.g. the liar's hook (tools/poison.py)
        self.run_dir, self.num_nodes, self.procs_per_node = run_dir, num_nodes, procs_per_node
        self.train_args, self.log_dir = train_args, log_dir
        self.shutdown_timeout = shutdown_timeout
        self.agents: dict[int, subprocess.Popen] = {}
        self.starts = [0] * num_nodes
        self.seen_workers: set[int] = set()
        self.port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "rendezvous-store.log", "wb") as out:
            self.store = subprocess.Popen(
                [sys.executable, "-m", "dilo.rendezvous_store", "--host", "127.0.0.1", "--port",
                 str(self.port)], stdout=out, stderr=subprocess.STDOUT, env=self._env(),
                cwd=REPO, start_new_session=True)
        self._wait_for_store()

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.update(self.extra_env)
        return env

    def _wait_for_store(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.store.poll() is not None:
                raise RuntimeError(f"rendezvous store exited: {(self.log_dir / 'rendezvous-store.log').read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("rendezvous store did not come up")

    def start_node(self, node: int) -> None:
        env = self._env()
        env.update(NNODES=f"1:{self.num_nodes}", NPROC=str(self.procs_per_node),
                   RDZV_HOST="127.0.0.1", RDZV_PORT=str(self.port), RDZV_STORE="external",
                   RUN_ID=f"chaos-{self.port}", MAX_RESTARTS="1000", MONITOR_INTERVAL="0.5",
                   SHUTDOWN_TIMEOUT=str(self.shutdown_timeout), LAST_CALL="2",
                   RDZV_EXTRA="keep_alive_interval=1,keep_alive_max_attempt=5",
                   PYTHON=sys.executable)
        self.starts[node] += 1
        log = self.log_dir / f"node{node}-{self.starts[node]}.log"
        with open(log, "wb") as out:
            self.agents[node] = subprocess.Popen(
                ["bash", str(REPO / "launch" / "torchrun_elastic.sh"), *self.train_args],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)

    def node_exit_code(self, node: int) -> int | None:
        agent = self.agents.get(node)
        return None if agent is None else agent.poll()

    def workers(self, node: int) -> list[int]:
        agent = self.agents.get(node)
        if agent is None or agent.poll() is not None:
            return []
        pids = [p for p in descendants(agent.pid) if is_worker(p)]
        self.seen_workers.update(pids)
        return pids

    def kill_node(self, node: int) -> list[int]:
        agent = self.agents[node]
        pids = [agent.pid, *self.workers(node)]
        for pid in pids:  # the whole node at once, as a power cut would
            signal_quietly(pid, signal.SIGKILL)
        agent.wait(timeout=30)
        return pids

    def reap(self) -> None:
        for pid in list(self.seen_workers):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (still under its agent) or gone
                continue
            if done:
                self.seen_workers.discard(pid)

    def close(self) -> None:
        table = parents()
        roots = set(self.seen_workers) | {agent.pid for agent in self.agents.values()}
        roots.update(p for p in descendants(os.getpid(), table) if "dilo" in cmdline(p))
        doomed = set(roots)
        for pid in roots:
            doomed.update(descendants(pid, table))
        for pid in doomed:
            signal_quietly(pid, signal.SIGKILL)
        for agent in self.agents.values():
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        signal_quietly(self.store.pid, signal.SIGKILL)
        self.store.wait(timeout=30)
        deadline = time.time() + 10
        while self.seen_workers and time.time() < deadline:
            self.reap()
            self.seen_workers = {p for p in self.seen_workers if proctree.alive(p)}
            time.sleep(0.05)


class HealCluster(TorchrunCluster):
    """run.failover = heal: a node is `procs_per_node` launch/heal_worker.sh loops (one per
    worker slot), each restarting its own worker; the workers meet in the same external
    store (dilo.rendezvous_store) the torchrun agents would use."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loops: dict[int, list[subprocess.Popen]] = {}

    def start_node(self, node: int) -> None:
        self.starts[node] += 1
        self.loops[node] = []
        for local in range(self.procs_per_node):
            slot = node * self.procs_per_node + local
            env = self._env()
            env.update(STORE=f"127.0.0.1:{self.port}", WORKERS=str(self.num_nodes * self.procs_per_node),
                       SLOT=str(slot), LOCAL_SLOT=str(local), LOCAL_WORKERS=str(self.procs_per_node),
                       MAX_RESTARTS="1000", RESTART_DELAY="0.5", PYTHON=sys.executable)
            log = self.log_dir / f"node{node}-slot{slot}-{self.starts[node]}.log"
            with open(log, "wb") as out:
                self.loops[node].append(subprocess.Popen(
                    ["bash", str(REPO / "launch" / "heal_worker.sh"), *self.train_args],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True))
        self.agents[node] = self.loops[node][0]  # (close() ends every agent's tree)

    def node_exit_code(self, node: int) -> int | None:
        codes = [loop.poll() for loop in self.loops.get(node, [])]
        if not codes or any(c is None for c in codes):
            return None
        return max(codes, key=abs)

    def workers(self, node: int) -> list[int]:
        pids = [p for loop in self.loops.get(node, []) if loop.poll() is None
                for p in descendants(loop.pid) if is_worker(p)]
        self.seen_workers.update(pids)
        return pids

    def kill_node(self, node: int) -> list[int]:
        loops = self.loops[node]
        pids = [loop.pid for loop in loops] + self.workers(node)
        for pid in pids:
            signal_quietly(pid, signal.SIGKILL)
        for loop in loops:
            loop.wait(timeout=30)
        return pids

    def close(self) -> None:
        for loops in self.loops.values():
            for loop in loops[1:]:
                self.seen_workers.update(descendants(loop.pid))
                signal_quietly(loop.pid, signal.SIGKILL)
        super().close()


CLUSTERS = {"torch": TorchrunCluster, "heal": HealCluster}
