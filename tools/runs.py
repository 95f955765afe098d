"""Launching dilo the way a user does (its CLI under torchrun) and reading what it wrote.

The benchmarks never import the training loop: they start `python -m dilo.train` or
`torchrun ... -m dilo.train` as subprocesses, wait with a timeout, and read
`<run.dir>/summary-<worker>.json` and `<run.dir>/metrics-<worker>.jsonl`.

Process hygiene: every child starts in its own session; on a timeout, an exception or
Ctrl-C the whole tree (torchrun puts its workers in sessions of their own, so the tree
is found through psutil, not the process group) gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dilo.config import Config, parse_args  # noqa: E402
from dilo.metrics import read_jsonl  # noqa: E402
from tools.proctree import descendants  # noqa: E402
from tools.report import ToolError  # noqa: E402

_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def child_env() -> dict[str, str]:
    """This environment, with the repository importable and no leaked torchrun variables."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(args: list[str], nproc: int = 1, nnodes: int = 1, node_rank: str = "0",
              master_addr: str = "127.0.0.1", master_port: int | None = None) -> list[str]:
    """`python -m dilo.train ARGS` for one process, else the torchrun command for nproc x nnodes."""
    if nproc == 1 and nnodes == 1:
        return [sys.executable, "-m", "dilo.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--node-rank", str(node_rank), "--nproc-per-node", str(nproc),
            "--master-addr", master_addr, "--master-port", str(master_port or free_port()),
            "-m", "dilo.train", *args]


def check_config(args: list[str]) -> Config:
    """Parse dilo arguments exactly as dilo.train will, so mistakes surface before any run."""
    try:
        return parse_args(args)
    except ValueError as e:
        raise ToolError(f"dilo config: {e}") from None


def kill_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM proc's session (torchrun forwards it), then SIGKILL whatever is left below it."""
    if proc.poll() is not None:
        return
    # psutil handles remember each process's start time: a pid reused meanwhile is not hit.
    tree = _handles([proc.pid, *descendants(proc.pid)])
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for victim in tree + _handles(descendants(proc.pid)):
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def _handles(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return found


def wait_all(procs: list[subprocess.Popen], timeout_s: float, what: str, logs: list[Path]) -> None:
    """Wait for every process; on the first failure or the timeout end them all and raise."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                i, code = bad[0]
                raise ToolError(f"{what} failed (exit {code}); log {logs[min(i, len(logs) - 1)]}:\n"
                                + tail(logs[min(i, len(logs) - 1)]))
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                raise ToolError(f"{what} did not finish within {timeout_s:.0f} s; log {logs[0]}:\n"
                                + tail(logs[0]))
            time.sleep(0.2)
    finally:
        for p in procs:
            kill_tree(p)


def run_logged(cmd: list[str], log: Path, timeout_s: float, what: str) -> None:
    """Run cmd (stdout+stderr to log) in its own session; raise ToolError if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(),
                                cwd=REPO, start_new_session=True)
    wait_all([proc], timeout_s, what, [log])


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def summaries(run_dir: str | Path) -> list[dict]:
    """Every worker's summary, in worker order."""
    found = sorted(Path(run_dir).glob("summary-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in found]


def metrics(run_dir: str | Path, worker: int = 0) -> list[dict]:
    return read_jsonl(Path(run_dir) / f"metrics-{worker}.jsonl")


def finished(run_dir: str | Path, num_workers: int) -> bool:
    """True when the run left one summary per worker (a complete, reusable run)."""
    return len(list(Path(run_dir).glob("summary-*.json"))) == num_workers


def records(run_dir: str | Path, kind: str) -> list[dict]:
    """Every worker's metrics records of one kind, read while the run may still be writing
    (a half-written last line is skipped)."""
    out = []
    for path in Path(run_dir).glob("metrics-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if record["kind"] == kind:
                out.append(record)
    return out
