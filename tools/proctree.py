"""The process tree: who started whom, through psutil.

torchrun starts its workers in sessions of their own, and a killed agent's workers are
re-parented, so neither process groups nor `Popen` handles find every process a run
started. The tools and the tests walk the parent links instead; this is that walk, once.
(dilo/comm/reaper.py does its own, stdlib-only: it runs with `python -I`, outside any venv.)
"""

from __future__ import annotations

import signal

import psutil


def parents() -> dict[int, int]:
    """pid -> parent pid for every live process (one consistent snapshot)."""
    table = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info["ppid"]
        if ppid is not None:  # it exited while we looked
            table[proc.pid] = ppid
    return table


def children(pid: int, table: dict[int, int] | None = None) -> list[int]:
    """Direct children of pid (none when pid is gone)."""
    if table is not None:
        return [p for p, pp in table.items() if pp == pid]
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def descendants(root: int, table: dict[int, int] | None = None) -> list[int]:
    """Every process below root, parents before their children (none when root is gone)."""
    if table is None:
        try:
            return [c.pid for c in psutil.Process(root).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    kids: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in kids.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(root: int, sig: int = signal.SIGKILL, include_root: bool = True) -> list[int]:
    """Send `sig` to root's descendants (found first, so none is re-parented before it is
    seen) and to root; returns the pids signalled. Processes already gone are skipped."""
    victims = descendants(root)
    if include_root:
        victims = [root, *victims]
    signalled = []
    for pid in victims:
        try:
            psutil.Process(pid).send_signal(sig)
            signalled.append(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return signalled


def alive(pid: int) -> bool:
    """True while pid runs (a zombie, dead but not yet reaped by its parent, is not alive)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(pid: int) -> str:
    """pid's command line joined by spaces; "" when it is gone or not readable."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def environ(pid: int) -> dict[str, str]:
    """pid's environment as it started; {} when it is gone or not readable."""
    try:
        return psutil.Process(pid).environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}
