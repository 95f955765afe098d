"""Islands: a DiLoCo worker made of several processes (a node or rack of GPUs).

Inside a worker the ranks train together with data-parallel over fast links (NVLink,
the node's network); between workers only the outer exchange runs, over slow links.
The DiLoCo algorithm is not told: it receives a `HierarchicalGroup`, which behaves as
one member of the group of workers, and composes two things:

* `inter`: any `Group` (torch.distributed, swarm, in-process) that averages a vector
  with the *other workers*, and
* `intra_pg`: a torch.distributed process group of the ranks of *this* worker.

Two ways to compose them, chosen with `sliced`:

sliced (default; what `--run.worker_size` uses)
    The vector is cut into `worker_size` equal slices (zero-padded at the end). Local
    rank r averages slice r through its own `inter` group, made of local rank r of
    every worker, so all the worker's ranks use the slow links at once and each sends
    ~1/worker_size of the bytes a one-process worker would. Then the averaged slices
    are all-gathered inside the worker. Every local rank needs an `inter` group.

leader (`sliced=False`)
    Only local rank 0 has an `inter` group (e.g. the one process that joins a swarm);
    it averages the whole vector and broadcasts the result inside the worker. The
    other ranks pass `inter=None` and never touch the outside network. If `inter` has
    open membership (a swarm), the group has too: the global state that local rank 0 receives
    from the swarm (when joining, when it fell behind, or as a repair) is broadcast to
    every rank of the worker, so all of them adopt the same bytes.

Bit-identical global state holds in both: each slice (or the whole vector) comes out
of `inter` as identical bytes on every worker, and the intra-worker step only copies
those fp32 bytes, never re-encodes or re-reduces them.

Who is "a member": `rank` and `size` are those of the *workers* (taken from local rank
0's `inter`), so `broadcast(src=0)` means worker 0. `all_gather_object` returns one
entry per *process* of every worker (worker-major), so DiLoCo's hash comparison covers
every process that holds θ.

Building the torch.distributed groups for torchrun (`join_islands`): global rank g
belongs to worker g // worker_size as local rank g % worker_size. torchrun numbers ranks
node by node, so with `--nproc-per-node 8 --run.worker_size 8` a worker is a node.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dilo.aggregate import MEAN, Aggregate
from dilo.codecs import Codec
from dilo.comm.protocol import DivergenceError, ExchangeResult, GlobalState, Group, RoundId, RoundReport, SharedState
from dilo.comm.torch_dist import all_gather_single


@dataclass
class Island:
    """This process's place among `num_workers` workers of `worker_size` ranks each."""

    rank: int
    """Global rank (0 .. world_size - 1)."""
    world_size: int
    worker_size: int
    intra_pg: dist.ProcessGroup
    """The ranks of this worker: inner data-parallel and the intra-worker gather."""
    slice_pg: dist.ProcessGroup
    """Local rank `rank_in_worker` of every worker: the outer exchange of one slice."""

    @property
    def worker(self) -> int:
        return self.rank // self.worker_size

    @property
    def rank_in_worker(self) -> int:
        return self.rank % self.worker_size

    @property
    def num_workers(self) -> int:
        return self.world_size // self.worker_size


def worker_ranks(worker: int, worker_size: int) -> list[int]:
    """Global ranks of one worker."""
    return list(range(worker * worker_size, (worker + 1) * worker_size))


def slice_ranks(rank_in_worker: int, worker_size: int, num_workers: int) -> list[int]:
    """Global ranks that exchange slice `rank_in_worker`: that local rank of every worker."""
    return [w * worker_size + rank_in_worker for w in range(num_workers)]


def join_islands(worker_size: int) -> Island:
    """Create the intra-worker and per-slice process groups; call on every rank.

    DEADLOCK HAZARD: `dist.new_group` is a collective over the whole default group:
    every rank must call it for *every* group, members or not, with the same ranks and
    in the same order. A rank that only created "its" groups would wait in a
    different `new_group` call than its peers until the timeout (and with some
    backends pair up the wrong groups). So every rank creates all `num_workers`
    intra-worker groups, then all `worker_size` slice groups, in index order, and
    keeps the two it belongs to. Nothing else may run collectives in between.
    """
    if not dist.is_initialized():
        raise RuntimeError("join_islands needs an initialised torch.distributed default group")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if worker_size < 1 or world_size % worker_size:
        raise ValueError(f"run.worker_size = {worker_size} must divide the world size {world_size}")
    num_workers = world_size // worker_size
    intra = [dist.new_group(worker_ranks(w, worker_size)) for w in range(num_workers)]
    slices = [dist.new_group(slice_ranks(r, worker_size, num_workers)) for r in range(worker_size)]
    return Island(rank, world_size, worker_size,
                  intra_pg=intra[rank // worker_size], slice_pg=slices[rank % worker_size])


class HierarchicalGroup(Group):
    """One worker of several processes, seen by DiLoCo as one member (see module doc)."""

    def __init__(self, inter: Group | None, intra_pg: dist.ProcessGroup, sliced: bool = True,
                 confirm_pg: dist.ProcessGroup | None = None):
        """`confirm_pg`: another group of the worker's ranks for `confirm` when it runs on the
        training thread while exchanges use `intra_pg` on the exchange thread (an open-membership
        inter group with overlapped exchanges): two threads must never interleave
        collectives on one group (dilo/overlap.py)."""
        if not dist.is_initialized():
            raise RuntimeError("HierarchicalGroup needs an initialised torch.distributed process group")
        self.inter = inter
        self.intra_pg = intra_pg
        self.confirm_pg = confirm_pg if confirm_pg is not None else intra_pg
        self.sliced = sliced
        self.local_rank = dist.get_rank(intra_pg)
        self.local_size = dist.get_world_size(intra_pg)
        self._leader = dist.get_global_rank(intra_pg, 0)
        # Every rank learns who the worker is among the workers, and checks that the
        # composition is consistent on all its ranks. The check runs after this one
        # collective, so a mistake raises on every rank alike instead of leaving some
        # ranks blocked in the next collective while others have raised.
        ident = (inter.rank, inter.size) if inter is not None else None
        idents = self._intra_objects(ident)
        talkers = [r for r, i in enumerate(idents) if i is not None]
        expected = list(range(self.local_size)) if sliced else [0]
        if talkers != expected:
            mode = "sliced: every rank of the worker" if sliced else "leader: only local rank 0"
            raise ValueError(f"HierarchicalGroup({mode} must have an inter group); local ranks "
                             f"{talkers} of {self.local_size} have one")
        if len(set(i for i in idents if i is not None)) != 1:
            raise ValueError(f"the slice groups of one worker disagree on (worker, number of "
                             f"workers): {idents}; build them with join_islands")
        self.rank, self.size = idents[0]
        self.processes = self.local_size
        self.open_membership = bool(self._intra_objects(inter.open_membership if inter is not None else None)[0])
        if self.open_membership and sliced:
            raise ValueError("an inter group of open membership (a swarm) needs the leader composition "
                             "(sliced=False)")

    # -- collectives inside the worker (fast links) -------------------------------------
    def _intra_objects(self, obj: object, group: dist.ProcessGroup | None = None) -> list:
        out: list = [None] * self.local_size
        dist.all_gather_object(out, obj, group=group if group is not None else self.intra_pg)
        return out

    def _intra_gather(self, part: torch.Tensor) -> torch.Tensor:
        out = torch.empty(part.numel() * self.local_size, dtype=part.dtype)
        all_gather_single(out, part.contiguous(), group=self.intra_pg)
        return out

    def _intra_broadcast(self, flat: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        # (every group of this worker has the same ranks, so the same leader)
        dist.broadcast(flat, src=self._leader, group=group if group is not None else self.intra_pg)

    def _slice(self, flat: torch.Tensor, align: int = 1) -> tuple[torch.Tensor, int]:
        """This rank's slice of `flat` (zero-padded to equal slices) and the slice length, a
        multiple of `align` (the sparse codec's blocks: its top-k then sees the blocks the
        worker's error feedback saw in the whole vector)."""
        length = math.ceil(math.ceil(flat.numel() / self.local_size) / align) * align
        padded = torch.zeros(length * self.local_size, dtype=flat.dtype)
        padded[:flat.numel()] = flat
        return padded[self.local_rank * length:(self.local_rank + 1) * length].clone(), length

    # -- the Group interface ------------------------------------------------------------
    @property
    def aggregate(self) -> Aggregate:
        return self.inter.aggregate if self.inter is not None else MEAN

    @aggregate.setter
    def aggregate(self, rule: Aggregate) -> None:
        """The owners are the exchanging ranks (`inter`): with sliced islands, clip's norms
        are those of each rank's slice."""
        if self.inter is not None:
            self.inter.aggregate = rule

    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                owner_error: bool = False) -> ExchangeResult:
        if owner_error:  # (before any collective: every rank of every worker refuses alike)
            raise ValueError("HierarchicalGroup cannot fill ExchangeResult.owner_error: comm.owner_feedback does "
                             "not reach islands yet (their exchanging ranks do not hand the owner's error to the "
                             "worker's other processes); set comm.owner_feedback = false or run.worker_size = 1")
        start = time.perf_counter()
        numel = flat.numel()
        if self.sliced:
            part, length = self._slice(flat, codec.block_size if codec.exchange == "gather" else 1)
            res = self.inter.average(part, codec, round, aggregate, report)
            average = self._intra_gather(res.average)[:numel]
            intra_bytes = (self.local_size - 1) * length * average.element_size()
            return ExchangeResult(average, res.bytes_sent, res.bytes_received, res.num_peers,
                                  time.perf_counter() - start, dropped=res.dropped,
                                  codec_error=res.codec_error, intra_bytes=intra_bytes,
                                  rejected=res.rejected, clipped=res.clipped, reports=res.reports)
        # leader: local rank 0 exchanges the whole vector, then hands it to its worker.
        return self._share_result(self.inter.average(flat, codec, round, aggregate, report)
                                  if self.local_rank == 0 else None,
                                  start)

    def round_result(self, number: int) -> ExchangeResult:
        if not self.open_membership:
            return super().round_result(number)
        start = time.perf_counter()
        return self._share_result(self.inter.round_result(number) if self.local_rank == 0 else None, start)

    def _share_result(self, res: ExchangeResult | None, start: float) -> ExchangeResult:
        """Local rank 0's result of an exchange, the same bytes on every rank of the worker."""
        sent = received = dropped = 0
        meta = torch.zeros(4, dtype=torch.float64)  # num_peers, codec_error, adopted, numel
        if res is not None:
            sent, received, dropped = res.bytes_sent, res.bytes_received, res.dropped
            meta = torch.tensor([res.num_peers, res.codec_error, res.adopted is not None, res.average.numel()],
                                dtype=torch.float64)
        self._intra_broadcast(meta)
        if meta[2]:  # the swarm went on without this worker: every rank adopts its newer state
            adopted = self._share_state(res.adopted if res is not None else None)
            return ExchangeResult(torch.empty(0), sent, received, int(meta[0]), time.perf_counter() - start,
                                  adopted=adopted)
        average = res.average.contiguous() if res is not None else torch.empty(int(meta[3]), dtype=torch.float32)
        self._intra_broadcast(average)
        intra_bytes = 0 if self.local_rank == 0 else average.numel() * average.element_size()
        return ExchangeResult(average, sent, received, int(meta[0]), time.perf_counter() - start,
                              dropped=dropped, codec_error=float(meta[1]), intra_bytes=intra_bytes,
                              rejected=res.rejected if res is not None else [],
                              clipped=res.clipped if res is not None else [])

    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        """Overwrite `flat` with worker `src`'s copy, on every rank of every worker."""
        if self.sliced:
            part, _ = self._slice(flat)
            self.inter.broadcast(part, src=src)
            flat.copy_(self._intra_gather(part)[:flat.numel()])
            return
        if self.local_rank == 0:
            self.inter.broadcast(flat, src=src)
        self._intra_broadcast(flat)

    def all_gather_object(self, obj: object) -> list:
        """Every process's `obj`, worker-major: [w0.r0, w0.r1, ..., w1.r0, ...]."""
        if self.sliced:
            per_worker = self.inter.all_gather_object(obj)     # local rank r of every worker
            grid = self._intra_objects(per_worker)             # grid[r][w]
            return [grid[r][w] for w in range(len(grid[0])) for r in range(self.local_size)]
        mine = self._intra_objects(obj)                        # this worker's ranks
        everyone = self.inter.all_gather_object(mine) if self.local_rank == 0 else None
        everyone = self._intra_objects(everyone)[0]            # local rank 0's answer
        return [o for worker in everyone for o in worker]

    # -- inter groups of open membership (leader composition) ---------------------------------------
    def _share_state(self, state: GlobalState | None, group: dist.ProcessGroup | None = None) -> GlobalState | None:
        """Local rank 0's optional global state, the same bytes on every rank of the worker."""
        layout = None if state is None else (state.outer_step, [(k, v.numel()) for k, v in state.tensors.items()],
                                             state.in_flight)
        layout = self._intra_objects(layout, group)[0]
        if layout is None:
            return None
        step, tensors, in_flight = layout
        out = {}
        for name, numel in tensors:
            t = state.tensors[name].contiguous() if state is not None else torch.empty(numel, dtype=torch.float32)
            self._intra_broadcast(t, group)
            out[name] = t
        return GlobalState(step, out, in_flight)

    def bind(self, state: SharedState) -> GlobalState | None:
        if not self.open_membership:
            return None
        return self._share_state(self.inter.bind(state) if self.local_rank == 0 else None)

    def confirm(self, outer_step: int, digest: str) -> GlobalState | None:
        if not self.open_membership:
            return super().confirm(outer_step, digest)
        found = self._intra_objects((outer_step, digest), self.confirm_pg)  # the worker's ranks first: a bug if they differ
        if len(set(found)) != 1:
            raise DivergenceError(f"the ranks of one worker hold different global states at outer step "
                                  f"{outer_step}: {found}")
        return self._share_state(self.inter.confirm(outer_step, digest) if self.local_rank == 0 else None,
                                 self.confirm_pg)

    def close(self) -> None:
        # The intra-worker group dies with the default group (destroy_process_group).
        if self.inter is not None:
            self.inter.close()
