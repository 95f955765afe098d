"""Who is in the group, epoch by epoch: the store-side protocol of `run.failover = heal`.

Workers of a healing run (docs/elastic.md, "Live failover") never restart together. They
agree on membership through a key-value store that outlives every worker (the external
`python -m dilo.rendezvous_store`, a TCPStore; the tests use an in-process HashStore).
Every worker is a *slot* 0..S-1 (`run.slot` of `run.workers`); one process of a slot is an
*incarnation*, named by a nonce, with a heartbeat counter in the store.

- An **epoch** is a fixed member list (incarnations sorted by slot; rank = position). Its
  record `ep/<e>` is written once, by `compare_set`, so every reader sees the same list.
  Kinds: `form` (a world formed from nothing: a fresh start, or the restart-the-world
  fallback), `heal` (survivors of a failed collective), `admit` (the members plus joiners).
- Every collective of an epoch ends with a **decision** (`decide`): each member writes its
  outcome (ok or failed, and the joiners it sees waiting) under `ep/<e>/op/<n>/<slot>`, and
  the first member that can conclude writes the decision with `compare_set`: *commit* when
  every member wrote ok, else *abort* with the members that wrote at all (a member that
  wrote nothing is waited for until its heartbeat stops). Everyone reads the same
  decision, so a collective is committed by all members or by none (all-or-nothing), even
  when some member's own collective completed and another's did not.
- A new process registers under `pending/<slot>` and waits until an epoch lists it
  (`wait_admission`); the members admit pending workers at a round boundary. When no epoch
  is alive (no member heartbeats), waiting processes form one (`form`).

Pure protocol: no torch collectives here (dilo/comm/heal.py builds the process groups).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("dilo")

Member = tuple  # (slot, nonce)


class HealError(RuntimeError):
    """The group cannot heal (too few survivors, this worker was excluded, store lost): the
    worker exits and its launcher restarts it (restart-the-world fallback)."""


class RunEnded(HealError):
    """The run this process waited to join ended first: nothing to do (exit 0)."""


class Superseded(HealError):
    """This worker's epoch went on without it (it was silent past the heartbeat timeout, e.g.
    stopped): it must not go on alone. The trainer rejoins in-process as a new incarnation
    (`Failover.rejoin`), exactly as a restarted worker would join."""


@dataclass
class Epoch:
    number: int
    members: list[Member]
    kind: str
    """`form`, `heal` or `admit`."""
    world: str
    """Names the run's world since its last formation (the same for heal and admit epochs)."""
    joined: list[Member] = field(default_factory=list)
    """Members that still need the global state (admit epochs, and heal epochs after them)."""

    def rank_of(self, member: Member) -> int:
        return self.members.index(member)

    def to_json(self) -> str:
        return json.dumps({"members": self.members, "kind": self.kind, "world": self.world,
                           "joined": self.joined})

    @classmethod
    def from_json(cls, number: int, raw: bytes | str) -> Epoch:
        d = json.loads(raw)
        return cls(number, [tuple(m) for m in d["members"]], d["kind"], d["world"],
                   [tuple(m) for m in d["joined"]])


@dataclass
class Decision:
    records: dict[int, dict]
    """slot -> {"nonce", "ok", "pending"} of every member that wrote before the decision."""

    def committed(self, epoch: Epoch) -> bool:
        return all(self.records.get(s, {}).get("nonce") == n and self.records[s]["ok"]
                   for s, n in epoch.members)

    def survivors(self, epoch: Epoch) -> list[Member]:
        return [(s, n) for s, n in epoch.members if self.records.get(s, {}).get("nonce") == n]

    def joiners(self, epoch: Epoch) -> list[Member]:
        """Pending workers some member saw, minus slots already in the epoch (sorted by slot)."""
        taken = {s for s, _ in epoch.members}
        found: dict[int, str] = {}
        for r in self.records.values():
            for s, n in r.get("pending", []):
                if s not in taken:
                    found[s] = n
        return sorted(found.items())


class Liveness:
    """Judges incarnations by their heartbeat counters: dead once a counter has not moved for
    `timeout` seconds of this observer's clock (a missing counter: dead)."""

    def __init__(self, store, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.store, self.timeout, self.clock = store, timeout, clock
        self._seen: dict[str, tuple[bytes, float]] = {}
        self._moved: set[str] = set()

    def beat(self, nonce: str) -> bytes | None:
        key = f"hb/{nonce}"
        return self.store.get(key) if self.store.check([key]) else None

    def dead(self, nonce: str) -> bool:
        value, now = self.beat(nonce), self.clock()
        if value is None:
            return True
        last = self._seen.get(nonce)
        if last is None or last[0] != value:
            if last is not None:
                self._moved.add(nonce)
            self._seen[nonce] = (value, now)
            return False
        return now - last[1] > self.timeout

    def seen_beating(self, nonce: str) -> bool:
        """Alive, and its counter was seen to move (a live process, not a stale record)."""
        return not self.dead(nonce) and nonce in self._moved

    def note_moved(self, nonce: str) -> None:
        """Another observer (the heartbeat thread's watch of pending workers) saw it move."""
        self._moved.add(nonce)


class Heartbeat:
    """A daemon thread adding 1 to `hb/<nonce>` every `interval` seconds. A gap of more than
    `stall` seconds between two beats (the process was stopped or starved) is noted in
    `stalled_at` (this process's monotonic clock), so the trainer can ask the store at once
    whether the group went on without it."""

    def __init__(self, store, nonce: str, interval: float, stall: float = float("inf"),
                 on_beat: Callable[[], None] | None = None):
        self.store, self.key, self.interval, self.stall = store, f"hb/{nonce}", interval, stall
        self.on_beat = on_beat
        self.stalled_at = -float("inf")
        self.store.add(self.key, 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dilo-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - last > self.stall:
                self.stalled_at = now
            last = now
            try:
                self.store.add(self.key, 1)
            except Exception as e:  # noqa: BLE001 - the store is gone: peers will see us dead
                log.error("heartbeat to the store failed: %s", str(e)[:200])
                return
            if self.on_beat is not None:
                try:
                    self.on_beat()
                except Exception as e:  # noqa: BLE001 - a watch is an optimisation: beat on regardless
                    log.debug("heartbeat watch failed: %s", str(e)[:200])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Membership:
    """One incarnation's view of the protocol (module docstring); `store` is shared by all."""

    def __init__(self, store, slot: int, slots: int, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, poll: float = 0.005):
        if not 0 <= slot < slots:
            raise ValueError(f"run.slot {slot} is not in [0, run.workers = {slots})")
        self.store, self.slot, self.slots, self.timeout = store, slot, slots, timeout
        self.me: Member = (slot, f"{slot}-{secrets.token_hex(6)}")
        self.liveness = Liveness(store, timeout, clock)
        self.clock, self.poll = clock, poll
        self.heartbeat: Heartbeat | None = None

    # -- records -------------------------------------------------------------------------
    def start_heartbeat(self, store=None) -> None:
        """Beat on `store` (a second client: the thread must not share the main one's socket).
        After each beat the thread also watches the pending workers' heartbeats on it, so a
        joiner that registered a beat or two before an exchange is already known to be alive
        there (the exchange's decision alone sees one counter value per round: it would be
        admitted a round later)."""
        store = store if store is not None else self.store
        watcher = Liveness(store, self.timeout, self.clock)

        def watch_pending() -> None:
            for slot in range(self.slots):
                key = f"pending/{slot}"
                nonce = store.get(key).decode() if store.check([key]) else "-"
                if nonce not in ("-", self.me[1]) and watcher.seen_beating(nonce):
                    self.liveness.note_moved(nonce)
        self.heartbeat = Heartbeat(store, self.me[1], self.timeout / 5, stall=self.timeout / 2, on_beat=watch_pending)

    def reincarnate(self) -> None:
        """Become a new incarnation of this slot (a new nonce with a heartbeat of its own); the old
        one's heartbeat stops, so the members count it dead (and never admit it)."""
        old = self.heartbeat
        if old is not None:
            old.stop()
        self.me = (self.slot, f"{self.slot}-{secrets.token_hex(6)}")
        if old is not None:
            self.start_heartbeat(old.store)

    def left_behind(self, epoch: Epoch, op: int) -> str | None:
        """Why the group went on without this member of `epoch`, or None: a newer epoch leaves it
        out, or the group decided collective `op` (this member's next one) without it."""
        successor = self.epoch(epoch.number + 1)
        if successor is not None and self.me not in successor.members:
            return (f"epoch {epoch.number} was superseded by epoch {successor.number} ({successor.kind}, "
                    f"slots {[s for s, _ in successor.members]}) without this worker (it was silent for too long)")
        base = f"ep/{epoch.number}/op/{op}"
        if self.store.check([f"{base}/decision"]) and not self.store.check([f"{base}/{self.slot}"]):
            return f"the group decided collective {op} of epoch {epoch.number} without this worker"
        return None

    def epoch(self, number: int) -> Epoch | None:
        key = f"ep/{number}"
        return Epoch.from_json(number, self.store.get(key)) if self.store.check([key]) else None

    def latest(self) -> Epoch | None:
        """The newest epoch record (the `latest` hint, then probing upwards)."""
        n = int(self.store.get("latest")) if self.store.check(["latest"]) else -1
        while self.store.check([f"ep/{n + 1}"]):
            n += 1
        return self.epoch(n) if n >= 0 else None

    def propose(self, number: int, proposal: Epoch) -> Epoch:
        """Write epoch `number` unless someone did first; the record that stands."""
        raw = self.store.compare_set(f"ep/{number}", "", proposal.to_json())
        self.store.set("latest", str(number))
        return Epoch.from_json(number, raw)

    def register(self) -> None:
        self.store.set(f"pending/{self.slot}", self.me[1])

    def registered_as_member(self) -> None:
        """Withdraw this incarnation's pending registration (it is a member now)."""
        self.store.compare_set(f"pending/{self.slot}", self.me[1], "-")

    def waiting(self, epoch: Epoch, seen_beating: bool = False) -> list[Member]:
        """Registered incarnations, not members of `epoch`, whose heartbeat is alive (with
        `seen_beating`: also seen to move, so a just-killed incarnation is never admitted)."""
        mine = set(epoch.members)
        out = []
        for slot in range(self.slots):
            key = f"pending/{slot}"
            if not self.store.check([key]):
                continue
            member = (slot, self.store.get(key).decode())
            if member[1] == "-" or member in mine:
                continue
            if self.liveness.seen_beating(member[1]) if seen_beating else not self.liveness.dead(member[1]):
                out.append(member)
        return out

    def alive(self, members: list[Member]) -> list[Member]:
        """Members whose heartbeat moves, watched for up to `timeout` seconds (stale records of a
        run whose workers all died count as dead only after that)."""
        deadline = self.clock() + self.timeout * 1.2
        while True:
            beating = [m for m in members if m == self.me or self.liveness.seen_beating(m[1])]
            if beating or self.clock() > deadline:
                return beating
            time.sleep(self.timeout / 10)

    def finished(self, world: str) -> bool:
        """Whether the world formed as `world` finished the run (a graceful stop does not count:
        a later launch forms a new world and resumes)."""
        return bool(world) and self.store.check([f"finished/{world}"])

    def mark_finished(self, world: str) -> None:
        self.store.set(f"finished/{world}", "1")

    # -- decisions -----------------------------------------------------------------------
    def decide(self, epoch: Epoch, op: int, ok: bool, look_for_joiners: bool = False) -> Decision:
        """This member's outcome of collective `op` of `epoch`, and the one decision on it."""
        why = self.left_behind(epoch, op)
        if why is not None:
            # (a member stopped for longer than the heartbeat timeout, e.g. the last one of its
            # epoch, while the others formed a group without it: it must not go on alone)
            raise Superseded(f"{why}; rejoining")
        base = f"ep/{epoch.number}/op/{op}"
        record = {"nonce": self.me[1], "ok": bool(ok),
                  "pending": self.waiting(epoch, seen_beating=True) if ok and look_for_joiners else []}
        self.store.set(f"{base}/{self.slot}", json.dumps(record))
        records: dict[int, dict] = {}
        while True:
            if self.store.check([f"{base}/decision"]):
                return self._decision(self.store.get(f"{base}/decision"))
            missing = False
            for slot, nonce in epoch.members:
                if slot in records:
                    continue
                key = f"{base}/{slot}"
                if self.store.check([key]):
                    records[slot] = json.loads(self.store.get(key))
                elif not self.liveness.dead(nonce):
                    missing = True
            if not missing:  # everyone wrote, or the silent ones are dead: conclude
                raw = self.store.compare_set(f"{base}/decision", "", json.dumps(records))
                return self._decision(raw)
            time.sleep(self.poll)

    def trouble(self, epoch: Epoch, op: int) -> str | None:
        """Why collective `op` of `epoch` cannot succeed any more, or None: a member reported
        its failure, or a member's heartbeat stopped."""
        base = f"ep/{epoch.number}/op/{op}"
        if self.store.check([f"{base}/decision"]):
            return "the group decided on this collective without this worker"
        for slot, nonce in epoch.members:
            key = f"{base}/{slot}"
            if (slot, nonce) != self.me and self.store.check([key]) and not json.loads(self.store.get(key))["ok"]:
                return f"slot {slot} reported a failure of this collective"
            if (slot, nonce) != self.me and self.liveness.dead(nonce):
                return f"slot {slot} stopped sending heartbeats for {self.timeout:g} s"
        return None

    @staticmethod
    def _decision(raw: bytes | str) -> Decision:
        return Decision({int(k): v for k, v in json.loads(raw).items()})

    # -- joining and forming -------------------------------------------------------------
    def join(self, expected: int, min_workers: int, grace: float, joining: str = "",
             may_form: bool = True) -> Epoch:
        """Register and wait until an epoch lists this incarnation: admitted into a live group,
        or part of a newly formed one (every slot waiting, or `min_workers` of them for `grace`
        seconds; without `may_form`, HealError instead). Raises RunEnded if the world `joining`
        (the one this process found running) ended meanwhile."""
        self.register()
        first_wait = self.clock()
        while True:
            latest = self.latest()
            if self.finished(joining) or (latest is not None and self.finished(latest.world)):
                raise RunEnded("the run finished before this worker was admitted; nothing to do")
            if latest is not None and self.me in latest.members:
                return latest
            if latest is None or not self.alive(latest.members):
                if not may_form:
                    raise HealError("no live group left to rejoin; restarting (the restarted workers form a "
                                    "new world from checkpoints)")
                formed = self._try_form(latest, expected, min_workers, first_wait, grace)
                if formed is not None:
                    return formed
            time.sleep(self.timeout / 10)

    def _try_form(self, latest: Epoch | None, expected: int, min_workers: int, first_wait: float,
                  grace: float) -> Epoch | None:
        number = latest.number + 1 if latest is not None else 0
        everyone = Epoch(number, [], "form", "")
        ready = [m for m in self.waiting(everyone) if m == self.me or self.liveness.seen_beating(m[1])]
        if len(ready) < expected and not (len(ready) >= min_workers and self.clock() - first_wait > grace):
            return None
        stands = self.propose(number, Epoch(number, sorted(ready), "form", secrets.token_hex(4)))
        return stands if self.me in stands.members else None
