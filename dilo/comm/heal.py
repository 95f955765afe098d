"""Live failover on the torch backend (`run.failover = heal`): groups that survive a death.

Every worker is a process of its own (launch/heal_worker.sh restarts it when it dies);
no torchrun world holds them together. Membership lives in a store that outlives them
(dilo/comm/membership.py: epochs, decisions, heartbeats). Each epoch gets its own gloo
process group, built on the store under the prefix `pg/<epoch>` (torchft's recipe: a
new store prefix per quorum), so a group never has to be repaired: it is replaced.

`HealingGroup` runs every collective of the run through `guarded(op)`: the op on the
current epoch's group, then the epoch's decision on it. Committed: every member returns
the result. Aborted (a member died, hung past its heartbeat, or any member's op failed):
nobody uses the result, the members that are still there form the next epoch (kind
`heal`) and run the same op again on its group. A DiLoCo exchange is redone with each
survivor's pseudo-gradient, which is still in memory, so no survivor ever applies an
outer step the others did not. Pending joiners are seen in the exchanges' decisions and
admitted at the next round boundary (dilo/failover.py), where they download the global
state from a member.

A worker the group went on without (declared dead while it was stopped) gets `Superseded`
(at its next collective, or at its next inner step after the stop: `check_left_behind`) and rejoins in-process as a new incarnation (dilo/failover.py).
What cannot be healed raises `HealError` (fewer than `run.min_workers` survive, a failure
during start-up, the store is gone): the worker exits and its launcher restarts it — the
restart-the-world fallback.
"""

from __future__ import annotations

import datetime
import gc
import logging
import pickle
import threading
import time
from typing import TYPE_CHECKING, Callable, TypeVar

import torch
import torch.distributed as dist

from dilo.aggregate import Aggregate
from dilo.codecs import Codec
from dilo.comm.membership import Epoch, HealError, Member, Membership, RunEnded, Superseded
from dilo.comm.gather import gather_average
from dilo.comm.protocol import (DivergenceError, ExchangeBuffers, ExchangeResult, GlobalState, Group, RoundId,
                                RoundReport, alone)
from dilo.comm.two_phase import started, two_phase_average

if TYPE_CHECKING:
    from dilo.config import Config
    from dilo.world import World

log = logging.getLogger("dilo")
T = TypeVar("T")


class EpochGroup(Group):
    """The members of one epoch over a gloo process group of their own (never registered
    with torch.distributed: its calls go to the process group object itself)."""

    def __init__(self, store, epoch: Epoch, me: Member, timeout_s: float):
        self.epoch, self.rank, self.size = epoch, epoch.rank_of(me), len(epoch.members)
        self._buffers = ExchangeBuffers()
        self.pg = None
        if self.size > 1:
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"pg/{epoch.number}", store), self.rank, self.size,
                                            datetime.timedelta(seconds=timeout_s))

    def _all_to_all(self, buf: torch.Tensor) -> torch.Tensor:
        if self.pg is None:
            return buf
        out = self._buffers.get("recv", buf.numel(), buf.dtype)
        self.pg.alltoall_base(out, buf, [], []).wait()
        return out

    def _all_gather(self, buf: torch.Tensor) -> torch.Tensor:
        if self.pg is None:
            return buf
        out = self._buffers.get("gathered", buf.numel() * self.size, buf.dtype)
        self.pg._allgather_base(out, buf).wait()
        return out

    def _posts(self):
        """(all-to-all, all-gather) that return before their bytes have moved (`two_phase.Post`)."""
        if self.pg is None:
            return None
        pg = self.pg
        return (lambda buf, out: started(pg.alltoall_base(out, buf, [], []), out),
                lambda buf, out: started(pg._allgather_base(out, buf), out))

    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                owner_error: bool = False) -> ExchangeResult:
        if codec.exchange == "gather":  # (sparse: token weighting is refused with it, config)
            return gather_average(flat, codec, self.rank, self.size, self._all_gather, buffers=self._buffers,
                                  aggregate=aggregate or self.aggregate, owner_error=owner_error)
        return two_phase_average(flat, codec, self.rank, self.size, self._all_to_all, self._all_gather,
                                 buffers=self._buffers, aggregate=aggregate or self.aggregate, report=report,
                                 owner_error=owner_error, pieces=self.pieces, posts=self._posts())

    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        if self.pg is not None:
            self.pg.broadcast(flat, src).wait()

    def all_gather_object(self, obj: object) -> list:
        if self.pg is None:
            return [obj]
        data = pickle.dumps(obj)
        size = torch.tensor([len(data)], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.pg.allreduce([size], opts).wait()
        width = 8 + int(size)
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        mine[8:8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = torch.empty(width * self.size, dtype=torch.uint8)
        self.pg._allgather_base(out, mine).wait()
        rows = [bytes(r) for r in out.view(self.size, width).numpy()]
        return [pickle.loads(r[8:8 + int.from_bytes(r[:8], "little")]) for r in rows]


class HealingGroup(Group):
    """The run's group in heal mode: every member of the current epoch (module docstring).

    While this process waits to be admitted into a running group (`admitted` False) its
    collectives are local no-ops: the trainer builds its model alone and gets the global
    state at admission (dilo/failover.py).
    """

    def __init__(self, membership: Membership, store, epoch: Epoch | None, timeout_s: float, min_workers: int):
        self.membership, self.store, self.timeout_s = membership, store, timeout_s
        self.min_workers = min_workers
        self.healable = False
        """False until start-up is over: a failure while the world forms and resumes is not healed."""
        self.changed = False
        """The members changed since the last boundary (set by a heal, cleared by dilo/failover.py)."""
        self.joiners: list[Member] = []
        """Pending workers seen in the last committed exchange, admitted at the next boundary."""
        self.events: list[dict] = []
        """Heal events since the trainer last logged them."""
        self.world_id = ""
        self.rank, self.size = 0, membership.slots  # until admitted: the run's size (DiLoCo's options)
        self.epoch: Epoch | None = None
        self._group: EpochGroup | None = None
        self._op = 0
        self._abandoned: list[tuple[threading.Thread, dict]] = []
        self._last_check = float("inf")  # (check_left_behind: no gap before its first call)
        if epoch is not None:
            self.enter(epoch)

    @property
    def admitted(self) -> bool:
        return self.epoch is not None

    @property
    def needs_state(self) -> bool:
        return self.epoch is not None and self.membership.me in self.epoch.joined

    def enter(self, epoch: Epoch) -> None:
        """Switch to `epoch` (its process group is built by the first collective)."""
        self.membership.registered_as_member()
        self.epoch, self._group, self._op = epoch, None, 0
        self.world_id = epoch.world
        self.rank, self.size = epoch.rank_of(self.membership.me), len(epoch.members)

    def group_of(self, epoch: Epoch) -> EpochGroup:
        group = EpochGroup(self.store, epoch, self.membership.me, self.timeout_s)
        group.pieces = self.pieces
        group.aggregate = self.aggregate
        return group

    # -- the guard -------------------------------------------------------------------------
    def guarded(self, op: Callable[[EpochGroup], T], joiners: bool = False) -> T:
        """`op` on the current epoch's group, committed by every member or redone by the survivors."""
        while True:
            result, error = self._watched(op)
            try:
                decision = self.membership.decide(self.epoch, self._op, error is None, look_for_joiners=joiners)
            except HealError:  # this worker's epoch was superseded without it
                raise
            except Exception as e:  # the store is gone: nothing can be agreed any more
                raise HealError(f"lost the membership store ({str(e)[:200]}); cannot heal") from e
            self._op += 1
            if decision.committed(self.epoch):
                if joiners:
                    self.joiners = decision.joiners(self.epoch)
                return result
            self._heal(decision.survivors(self.epoch), error)

    def _watched(self, op: Callable[[EpochGroup], T]) -> tuple[T | None, BaseException | None]:
        """(result, None) or (None, the failure). The op runs on a thread of its own while this one
        watches the store: when another member reports a failure of this op, or a member's
        heartbeat stops (SIGSTOP, a hang), the op is abandoned at once instead of after
        comm.timeout (its thread ends when gloo times out; its buffers belong to the dropped
        epoch group, never reused). After a failure the group is dropped, which closes its
        connections: peers still blocked on this member fail at once too."""
        box: dict = {"group": self._group}
        done = threading.Event()

        def run() -> None:
            try:  # a new epoch's group is built here too: its rendezvous waits for every member
                if box["group"] is None:
                    box["group"] = self.group_of(self.epoch)
                box["result"] = op(box["group"])
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = e
            finally:
                done.set()
        self._abandoned = [(t, a) for t, a in self._abandoned if t.is_alive()]
        thread = threading.Thread(target=run, name="dilo-heal-op", daemon=True)
        thread.start()
        while not done.wait(0.05):
            trouble = self.membership.trouble(self.epoch, self._op)
            if trouble is not None:  # (destroying a group waits for its op: keep it until the op ends)
                self._abandoned.append((thread, box))
                self._group = None
                return None, RuntimeError(trouble)
        self._group = box["group"]
        error = box.get("error")
        result = box.get("result")
        if error is not None and (isinstance(error, (DivergenceError, HealError))
                                  or not isinstance(error, RuntimeError)):
            raise error
        if error is not None:  # a peer died or timed out; gloo's errors are RuntimeErrors
            box.clear()
            self._drop_group()
        return result, error

    def _drop_group(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.pg = None
        del group
        gc.collect()

    def _heal(self, survivors: list[Member], error: BaseException | None) -> None:
        old = self.epoch
        lost = [m for m in old.members if m not in survivors]
        why = f" ({str(error)[:160]})" if error is not None else ""
        if self.membership.me not in survivors:
            raise Superseded(f"the group went on without this worker (it was silent for more than "
                             f"{self.membership.timeout:g} s){why}; rejoining")
        if not self.healable:
            raise HealError(f"a collective failed during start-up{why}; restarting the world")
        if len(survivors) < self.min_workers:
            raise HealError(f"only {len(survivors)} worker(s) left, fewer than run.min_workers = "
                            f"{self.min_workers}{why}; cannot heal, restarting the world from checkpoints")
        joined = [m for m in old.joined if m in survivors]
        stands = self.membership.propose(old.number + 1, Epoch(old.number + 1, survivors, "heal", old.world, joined))
        log.warning("heal: lost slot(s) %s%s; %d worker(s) go on as epoch %d", [s for s, _ in lost], why,
                    len(stands.members), stands.number)
        self.events.append({"event": "heal", "epoch": stands.number, "lost": [s for s, _ in lost],
                            "workers": len(stands.members)})
        self.enter(stands)
        self.changed = True

    def admit(self) -> bool:
        """At a round boundary: start the epoch with the pending joiners; False if none."""
        if not self.joiners:
            return False
        old, joiners = self.epoch, self.joiners
        self.joiners = []
        members = sorted(old.members + joiners)
        stands = self.membership.propose(old.number + 1, Epoch(old.number + 1, members, "admit", old.world,
                                                               old.joined + joiners))
        log.info("admitting slot(s) %s: %d worker(s) as epoch %d", [s for s, _ in joiners],
                 len(stands.members), stands.number)
        self.events.append({"event": "admit", "epoch": stands.number, "joined": [s for s, _ in joiners],
                            "workers": len(stands.members)})
        self.enter(stands)
        self.changed = True
        return True

    def check_left_behind(self) -> None:
        """Raise `Superseded` if the group went on without this worker (called once per inner
        step). Asks the store only after a stall (a resumed SIGSTOP): for `membership.timeout`
        seconds after the heartbeat thread saw a gap between its beats, and whenever more than
        half of it passed since the previous call (the main thread resumed first, or a long
        boundary); otherwise it reads the clock, no store round trip."""
        now, last = time.monotonic(), self._last_check
        self._last_check = now
        beat, timeout = self.membership.heartbeat, self.membership.timeout
        if beat is None or self.epoch is None or (now - beat.stalled_at > timeout and now - last <= timeout / 2):
            return
        why = self.membership.left_behind(self.epoch, self._op)
        if why is not None:
            raise Superseded(f"{why}; rejoining")

    def leave(self) -> None:
        """Drop this worker's epoch and become a new incarnation that is not admitted yet (it
        joins like a restarted worker: `Failover.restore`)."""
        latest = self.membership.latest()
        self._drop_group()
        self.membership.reincarnate()
        self.epoch, self._op, self.joiners = None, 0, []
        self.healable = self.changed = False
        self.world_id = latest.world if latest is not None else self.world_id
        self.rank, self.size = 0, self.membership.slots

    def state_received(self) -> None:
        """Every member holds the global state now (the transfer committed)."""
        self.epoch.joined = []

    # -- Group -----------------------------------------------------------------------------
    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                owner_error: bool = False) -> ExchangeResult:
        if not self.admitted or self.needs_state:  # (DiLoCo's start-up average of the buffers)
            return alone(flat, report, owner_error)
        return self.guarded(lambda g: g.average(flat, codec, aggregate=aggregate or self.aggregate, report=report,
                                                owner_error=owner_error),
                            joiners=True)

    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        if not self.admitted or self.needs_state:
            return
        original = flat.clone()

        def op(g: EpochGroup) -> None:
            flat.copy_(original)  # a redo starts from this member's own copy again
            g.broadcast(flat, src)
        self.guarded(op)

    def all_gather_object(self, obj: object) -> list:
        if not self.admitted or self.needs_state:
            return [obj]
        return self.guarded(lambda g: g.all_gather_object(obj))

    def confirm(self, outer_step: int, digest: str) -> GlobalState | None:
        found = self.all_gather_object((outer_step, digest))
        if len(set(found)) != 1:
            raise DivergenceError(f"global state diverged at outer step {outer_step}: {found}")
        return None

    def close(self) -> None:
        # An abandoned op ends when gloo times out (comm.timeout); a process must not exit
        # while one is blocked in C++ (it would abort), nor destroy its group before that.
        for thread, _ in self._abandoned:
            thread.join(self.timeout_s + 5)
        self._abandoned.clear()
        self._group = None
        gc.collect()
        if self.membership.heartbeat is not None:
            self.membership.heartbeat.stop()


def open_store(address: str, timeout_s: float):
    from torch.distributed import TCPStore

    host, _, port = address.rpartition(":")
    try:
        return TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as e:
        raise HealError(f"cannot reach the membership store comm.store = {address} ({str(e)[:200]}); "
                        "start it with `python -m dilo.rendezvous_store --port PORT`") from e


def connect(cfg: Config, world: World) -> HealingGroup:
    """This worker's HealingGroup: a member of a newly formed world, or (a running group
    exists) a process that asks to join it later, in `Failover.restore`."""
    from torch.distributed import PrefixStore

    prefix = f"dilo-heal/{cfg.run.dir}/"
    store = PrefixStore(prefix, open_store(cfg.comm.store, cfg.comm.timeout))
    membership = Membership(store, cfg.run.slot, cfg.run.workers, timeout=cfg.comm.heartbeat)
    membership.start_heartbeat(PrefixStore(prefix, open_store(cfg.comm.store, cfg.comm.timeout)))
    latest = membership.latest()
    if latest is not None and membership.finished(latest.world):
        raise RunEnded(f"the run in {cfg.run.dir} already finished (its summary is there); nothing to do")
    if latest is not None and membership.alive(latest.members):
        group = HealingGroup(membership, store, None, cfg.comm.timeout, cfg.run.min_workers)
        group.world_id = latest.world
        log.info("heal: a running group (epoch %d, %d workers) exists; slot %d joins it at a round boundary",
                 latest.number, len(latest.members), cfg.run.slot)
    else:
        log.info("heal: slot %d waiting for the run's %d workers to form a group", cfg.run.slot, cfg.run.workers)
        epoch = membership.join(cfg.run.workers, cfg.run.min_workers, grace=cfg.comm.timeout)
        log.info("heal: epoch %d formed by slots %s", epoch.number, [m[0] for m in epoch.members])
        group = HealingGroup(membership, store, epoch, cfg.comm.timeout, cfg.run.min_workers)
    group.pieces = cfg.comm.pieces  # (each epoch's group takes it at its first collective)
    follow(world, group)
    return group


def follow(world: World, group: HealingGroup) -> None:
    """The world's view of the group: this worker's data shard and the number of workers."""
    world.worker = group.membership.slot
    world.data_shard, world.num_workers = (group.rank, group.size) if group.admitted else (0, 1)
