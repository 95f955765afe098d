"""Cleans up after a swarm peer however it ends, even on SIGKILL.

A swarm peer starts a libp2p daemon (`p2pd`, a Go binary) and two unix sockets in /tmp.
If the peer is killed, nothing in the peer can stop the daemon: it would go on answering
the other peers as a ghost of the dead one (they would wait for it in every round) and
its socket files would stay in /tmp forever. So each peer starts this small supervisor
first, in its own session (a `killpg` of the peer's process group does not reach it):

    reaper = Reaper.start()
    reaper.watch_glob("/tmp/dilo-123-ab-*")  # the daemon's sockets, before it starts
    reaper.watch_pid(p2pd_pid)               # once the daemon is up
    ...
    reaper.close()                  # normal exit: the peer cleaned up itself

The supervisor reads commands from a pipe. End of file on that pipe means the peer is
gone (the kernel closes the pipe when the process dies, whatever killed it): then it
terminates the watched processes that are still the same processes (pid and start time),
kills them if they do not exit within a grace period, removes the watched paths and exits.
Standard library only, on purpose (psutil is a core dependency, and the tools and tests
use it for process trees): the supervisor runs as `python -I reaper.py`, outside the
package, with its output sent to /dev/null. If it failed to start (an import that breaks
in some environment) nobody would see it, and a killed peer would leave a ghost daemon
behind. What it needs from psutil is one field of /proc/<pid>/stat (`_start_time`), so it
imports nothing that can fail and adds no import time to every peer's start.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_GRACE_S = 2.0


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str) -> bool:
    return _start_time(pid) == started


def _signal_alive(pids: dict[int, str], sig: int) -> None:
    """Send sig to each watched process that is still the one we watched (not a reused pid)."""
    for pid, started in pids.items():
        if _alive(pid, started):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _reap(pids: dict[int, str], paths: set[str], patterns: set[str] = frozenset()) -> None:
    _signal_alive(pids, signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_S
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in pids.items()):
        time.sleep(0.05)
    _signal_alive(pids, signal.SIGKILL)
    for path in paths | {f for pattern in patterns for f in glob.glob(pattern)}:
        try:
            os.unlink(path)
        except OSError:
            pass


def _serve(stream) -> None:
    """The supervisor's loop: remember what to clean until the pipe closes, then clean it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the peer
    pids: dict[int, str] = {}
    paths: set[str] = set()
    patterns: set[str] = set()
    for line in stream:
        kind, _, arg = line.strip().partition(" ")
        if kind == "pid":
            started = _start_time(int(arg))
            if started is not None:
                pids[int(arg)] = started
        elif kind == "path":
            paths.add(arg)
        elif kind == "glob":
            patterns.add(arg)
        elif kind == "done":  # the peer shut down cleanly and removed everything itself
            pids.clear()
            paths.clear()
            patterns.clear()
    _reap(pids, paths, patterns)


class Reaper:
    """The peer's end of the supervisor's pipe."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc

    @classmethod
    def start(cls) -> Reaper:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve())], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            close_fds=True, text=True)
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def watch_pid(self, pid: int) -> None:
        self._send(f"pid {pid}")

    def watch_path(self, path: str) -> None:
        self._send(f"path {path}")

    def watch_glob(self, pattern: str) -> None:
        self._send(f"glob {pattern}")

    def close(self, clean: bool = True) -> None:
        """Stop supervising; with clean=False the supervisor reaps what it watches first."""
        if self._proc.stdin is None or self._proc.stdin.closed:
            return
        try:
            if clean:
                self._send("done")
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self._proc.wait(timeout=_GRACE_S + 3)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    _serve(sys.stdin)
