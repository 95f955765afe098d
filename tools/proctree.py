"""The process tree from /proc: who started whom (Linux).

torchrun starts its workers in sessions of their own, and a killed agent's workers are
re-parented, so neither process groups nor `Popen` handles find every process a run
started. The tools and the tests walk /proc/<pid>/stat instead; this is that walk, once.
"""

from __future__ import annotations

import os
from pathlib import Path


def parents() -> dict[int, int]:
    """pid -> parent pid for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # it exited while we looked
                continue
            # the command name (2nd field) may hold spaces and ')': split after the last ')'
            table[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def children(pid: int, table: dict[int, int] | None = None) -> list[int]:
    """Direct children of pid."""
    table = parents() if table is None else table
    return [p for p, pp in table.items() if pp == pid]


def descendants(root: int, table: dict[int, int] | None = None) -> list[int]:
    """Every process below root, parents before their children."""
    table = parents() if table is None else table
    kids: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in kids.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out
