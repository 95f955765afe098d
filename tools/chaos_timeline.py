"""When the next fault may fire: what the workers' metrics lines say about the run.

tools/chaos.py fires fault i once training has reached its scheduled outer step and the
current group has completed an outer step since the previous disruption, so that every
fault hits a running group (never one still recovering from the last fault). What a
disruption looks like in the metrics JSONL depends on the failover mode:

- restart (torchrun, `run.failover restart`): every fault restarts the world. A new world
  is a new `world` id in the `start` / `resume` events and sync lines; the group runs again
  once a world that started after the disruption logged a sync line.
- heal (`run.failover heal`, docs/elastic.md "Live failover"): the survivors never restart
  and the `world` id stays the same. A fault shows as a `heal` event (members lost), the
  replacement as an `admit` event (members joined) with its `resume` (`how = live`); a
  world that could not heal falls back to restart-the-world: a new world id, whose members
  log a `resume` from the checkpoints. The group runs again once a sync line follows the
  latest of those events, and that event came after the fault. A fault that changes no membership (`liar`) needs only a sync
  line after it.

`Timeline` is fed the parsed lines (in any order between files, as `MetricsTail` reads
them) and answers those questions; it starts no process, so tests/test_chaos.py drives it
with synthetic records.
"""

from __future__ import annotations

CHANGES = ("heal", "admit", "resume")
"""Heal mode: events that mean the group's members changed (`resume`: a joiner's download, or
a world formed anew from the checkpoints). A replacement's `start` is not one: the group has
not changed until it is admitted (a fault fired between the two could kill every member that
holds the state while the replacements wait, which restart mode never allowed)."""


class Timeline:
    """The run's progress and its latest group change, from metrics records."""

    def __init__(self, heal: bool = False):
        self.heal = heal
        self.progress = 0
        """The highest outer step any member logged a sync line for."""
        self.last_sync = 0.0
        self.world = ""
        self.round_seconds = 0.0
        """Duration of the latest round (between consecutive sync lines of one world)."""
        self.started: dict[str, float] = {}
        """world -> when its first member logged `start`."""
        self.last_change = 0.0
        """Heal mode: time of the latest heal/admit/resume event."""
        self.changes: list[dict] = []
        """Heal mode: every heal and admit event seen (each member logs its own copy)."""

    def feed(self, record: dict) -> None:
        kind, event = record.get("kind"), record.get("event")
        if kind == "event" and event == "start" and "world" in record:
            self.started.setdefault(record["world"], record["time"])
        if kind == "event" and event in CHANGES:
            self.last_change = max(self.last_change, record["time"])
            if event in ("heal", "admit"):
                self.changes.append(record)
        if kind == "sync" and record["time"] >= self.last_sync:
            if record.get("world") == self.world and record["outer_step"] == self.progress + 1:
                self.round_seconds = record["time"] - self.last_sync
            self.progress, self.last_sync, self.world = record["outer_step"], record["time"], record.get("world")

    def running(self, since: float, expect_change: bool = True) -> bool:
        """The current group has completed an outer step since the disruption at `since`
        (a fault or a rejoin); with `expect_change` (heal mode) the disruption must also
        have shown as a membership change first."""
        if not self.heal:  # a world formed after the disruption has completed an outer step
            return self.last_sync > since and self.started.get(self.world, 0.0) > since
        if not expect_change:
            return self.last_sync > max(since, self.last_change)
        return self.last_change > since and self.last_sync > self.last_change

    def moved_on(self, left: str, since: float) -> bool:
        """After a node's kill at `since`: the survivors trained an outer step without it
        (restart mode: in a world other than `left`, the one it left)."""
        if not self.heal:
            return self.world != left and self.running(since)
        return self.running(since)
