"""The contract between the DiLoCo algorithm and a backend, and the exchange they share.

A `Group` is the set of workers that average one pseudo-gradient together. The
algorithm hands it a flat fp32 CPU tensor and a codec; the group returns the mean over
its members, **the same bytes on every member**. That guarantee comes from the
two-phase exchange below (as in PCCL):

1. reduce-scatter: the vector is cut into one chunk per member; every member encodes
   each chunk with the codec and sends chunk j to member j (its *owner*);
2. the owner decodes the contributions, drops invalid ones (non-finite: the "no
   contribution" marker; saturated at the codec's limit), reduces the rest with the
   group's rule (`outer.aggregate`, dilo/aggregate.py; `mean`: summed in fp32 in member
   order, divided by their number), then encodes the result **once**;
3. all-gather: every member (the owner too) decodes the owner's bytes.

A member may attach its `RoundReport` (tokens, inner steps and compute seconds of its
round; docs/uneven.md) to its phase-1 slices: every owner then holds every member's report,
weights the contributions by their tokens when the rule says so (`outer.weighting = tokens`),
and hands the reports back in the result, so every member learns the group's progress.

Because every member decodes identical bytes with the same deterministic decoder, the
global state stays bit-identical with any codec, lossy or not.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import blake3
import torch

from dilo.aggregate import MEAN, Aggregate
from dilo.codecs import Codec


def state_digest(tensors: list[torch.Tensor], outer_step: int) -> str:
    """Hex BLAKE3 (32 bytes) over the tensors' bytes in order, then the outer step (8 bytes,
    little-endian). BLAKE3 is a cryptographic hash (a swarm verifies downloaded states with
    it) and, one thread, measured 3.8× faster than sha256 here (docs/results.md). It hashes
    with as many threads as torch runs (`run.threads`): BLAKE3's tree gives the same digest
    for any number of threads (docs/results.md, the seventh pass)."""
    h = blake3.blake3(max_threads=max(1, torch.get_num_threads()))
    for t in tensors:
        h.update(memoryview(t.detach().contiguous().numpy()).cast("B"))  # the bytes, not a copy
    h.update(outer_step.to_bytes(8, "little"))
    return h.hexdigest()


@dataclass
class GlobalState:
    """What every member holds identically after an outer step, and what a joiner downloads."""

    outer_step: int
    tensors: dict[str, torch.Tensor]
    """Flat fp32 CPU tensors in a fixed order (DiLoCo: "params", then "momentum" once it exists)."""
    in_flight: int = 0
    """Exchanges the member had started but not applied (not covered by the digest: it tells
    an adopter which rounds to fetch; with overlap P at every apply step, 0 once drained)."""

    def digest(self) -> str:
        return state_digest(list(self.tensors.values()), self.outer_step)


@dataclass(frozen=True)
class RoundId:
    """Names one exchange for a group of open membership (a swarm keys its rounds by it, not by call order).

    `number` counts the exchanges of the run (0, 1, ...; the same on every member for the
    same exchange); `base` is the digest of the global state this member held when it put
    its pseudo-gradient on the wire: members average together only with the same base.
    """

    number: int
    base: str


class SharedState(Protocol):
    """What the algorithm offers a backend of open membership: its step and consistent snapshots."""

    outer_step: int
    round_lag: int
    """Exchanges started but not applied at an outer step: 0, or P with overlapped outer
    steps (round t is then applied as outer step t + 1 while rounds t + 1 .. t + P run)."""

    def export_state(self) -> GlobalState:
        """A copy of the global state, safe to call from any thread."""


@dataclass(frozen=True)
class RoundReport:
    """What a member tells the owners about its round (docs/uneven.md); 3 fp64 on the wire,
    appended to each of its phase-1 slices."""

    tokens: float
    """Tokens this member trained on in the round (its weight with `outer.weighting = tokens`)."""
    steps: float
    """Inner steps this member took in the round."""
    ready_seconds: float = 0.0
    """Seconds from the start of its round until it reached the exchange."""

    NBYTES = 24


class DivergenceError(RuntimeError):
    """Members hold different global states after an outer step (a bug, never a fault)."""


@dataclass
class EncodedAverage:
    """The average as the gathered bytes of its owners' encodings, not decoded yet
    (`Group.average(keep_encoded=True)`): each row (offset, count, n, codes) says that
    elements [offset, offset + count) of the average are the first `count` values of
    `codec.decode(codes, n)`. The codes are a view of the group's reused buffer: valid
    until the group's next exchange. dilo/outer_sgd.py's `sgd_step_encoded` applies the
    outer step straight from them."""
    codec: Codec
    rows: list[tuple[int, int, int, torch.Tensor]]

    def decode_into(self, out: torch.Tensor) -> torch.Tensor:
        """`out` (flat fp32) ← the decoded average; the same bytes the exchange would have written."""
        for offset, count, n, codes in self.rows:
            if count == n:
                self.codec.decode(codes, n, out=out[offset:offset + n])
            else:
                out[offset:offset + count].copy_(self.codec.decode(codes, n)[:count])
        return out


@dataclass
class ExchangeResult:
    average: torch.Tensor
    """Mean of the members' vectors (fp32, CPU), identical bytes on every member."""
    bytes_sent: int
    """Bytes this member put on the wire in this exchange."""
    bytes_received: int
    """Bytes this member took off the wire in this exchange."""
    num_peers: int
    """Members that took part (including this one)."""
    seconds: float
    """Wall time of the exchange."""
    dropped: int = 0
    """Contributions (chunk, member) this member rejected as owner (see `rejected`)."""
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """(member, reason) of each contribution this member dropped as owner (dilo/aggregate.py)."""
    clipped: list[tuple[int, float]] = field(default_factory=list)
    """outer.aggregate = clip: (member, factor < 1) of each scaled-down contribution (the same
    list on every member of the exchange)."""
    codec_error: float = 0.0
    """Relative L2 error of the owner's encode of its averaged chunk."""
    intra_bytes: int = 0
    """Bytes this member received from the other processes of its own worker (fast
    intra-worker links, see comm/hierarchical.py); not part of bytes_received."""
    owner_error: tuple[int, torch.Tensor] | None = None
    """When the caller asked for it (`average(owner_error=True)`, `comm.owner_feedback`): (offset,
    mean − decode(encode(mean))) of the chunk this member owned, the part of the average its
    re-encode lost; an empty tensor when it re-encoded nothing (`nothing_lost`). None when not asked."""
    reports: list = field(default_factory=list)
    """(tokens, steps, ready_seconds) of every member's `RoundReport`, member order, as this
    member received them as an owner; empty when the members sent none."""
    finite: bool | None = None
    """Whether every element of `average` is finite, when the exchange read it off the gathered
    bytes (int8/fp4 scales: `reduce_kernels.fused_contribution`); None: not known, check it."""
    encoded: EncodedAverage | None = None
    """Set when the caller asked for it (`keep_encoded`) and the exchange could: `average` is
    then NOT filled yet (only its destination): `decoded_average()` fills it, or the caller
    applies the encoded rows itself (dilo/outer_sgd.py `sgd_step_encoded`)."""
    adopted: GlobalState | None = None
    """Open-membership backends only: this member could not take part in the round (it fell behind
    the others); instead of applying `average` it must adopt this newer global state."""

    def decoded_average(self) -> torch.Tensor:
        """`average`, decoded first if the exchange kept it encoded (then `encoded` ← None)."""
        if self.encoded is not None:
            self.encoded.decode_into(self.average)
            self.encoded = None
        return self.average


class Group(ABC):
    """Members that share one global state. Implemented once per backend.

    Calls may come from a thread other than the one that made the group (DiLoCo runs
    overlapped exchanges on a background thread, dilo/overlap.py), but never two at once.
    """

    rank: int
    size: int
    open_membership: bool = False
    """True when members come and go during the run (a swarm): there are no fixed ranks,
    the starting state comes from `bind`, and `size` is the size of the last round."""
    aggregate: Aggregate = MEAN
    """The owner's rule (`outer.aggregate`); DiLoCo sets it before the first exchange."""
    processes: int = 1
    """Processes that hold this member's copy of the global state (islands: the worker's
    ranks); they must change it at the same inner step."""
    average_out: bool = False
    """True when `average` also takes `out=`: a contiguous fp32 CPU tensor of `flat`'s size
    (it may be `flat` itself) that the average is written into, so a caller done with
    `flat` holds one model-sized vector through the exchange, not two."""
    encoded_average: bool = False
    """True when `average` also takes `keep_encoded=`: with it, an int8/fp4 average (numba
    kernels) comes back as `ExchangeResult.encoded`, not decoded, for a caller that applies
    it before the group's next exchange (DiLoCo's outer step without overlap or delay)."""
    pieces: int = 1
    """Pieces per owner chunk of the two-phase exchange (`comm.pieces`, dilo/comm/two_phase.py):
    the same average for any value; groups that run `two_phase_average` pass it on."""

    @abstractmethod
    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                owner_error: bool = False) -> ExchangeResult:
        """Mean of `flat` over the members, bit-identical everywhere.

        `aggregate`: the owners' rule for this call (default `self.aggregate`; DiLoCo passes
        `MEAN` for floating-point buffers, which are averaged exactly whatever the rule).
        `report`: this member's round, carried with its contribution (the members of one
        exchange all pass one or all pass none); the weights of `outer.weighting = tokens`.

        Fixed groups match calls by their order and ignore `round`; open-membership groups need it.
        `owner_error`: when true the group MUST fill `ExchangeResult.owner_error` for the chunk
        this member owns (`nothing_lost()` when it re-encoded nothing: one member, an all-gather
        exchange, a result taken from other members; a result that hands back `adopted` carries
        none); when false it leaves it None. DiLoCo asks with `comm.owner_feedback` and raises
        on a result without it (`checked_owner_error`): owner feedback never runs silently without.
        """

    def round_result(self, number: int) -> ExchangeResult:
        """Open membership: the result of exchange `number`, which this member did not take part
        in (it adopted a state while that round was in flight), from a member that ran it;
        `adopted` is set instead when no member holds it any more."""
        raise NotImplementedError(f"{type(self).__name__} has fixed members: every member runs every round")

    @abstractmethod
    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        """Overwrite `flat` in place with member `src`'s copy (start-up and recovery)."""

    @abstractmethod
    def all_gather_object(self, obj: object) -> list:
        """Every member's `obj`, in member order (small metadata: hashes, steps)."""

    def any_true(self, flag: bool) -> bool:
        """True on every member if `flag` is true on any member (e.g. a stop request).

        Backends may override this with a cheaper collective (torch: an all-reduce MAX).
        """
        return any(self.all_gather_object(bool(flag)))

    def bind(self, state: SharedState) -> GlobalState | None:
        """Called once by the algorithm before training. Open-membership backends serve `state` to
        peers that join later and return the running swarm's global state to start from
        (None when this member starts the run). Fixed groups agree through `broadcast`."""
        return None

    def confirm(self, outer_step: int, digest: str) -> GlobalState | None:
        """After an outer step: check that every member holds the global state `digest`.

        Fixed groups compare all digests and raise on a mismatch (a bug: the exchange makes
        them identical). Open-membership backends may instead return the majority's state for a
        member that diverged, which the algorithm then adopts.
        """
        # One entry per process that holds θ: a HierarchicalGroup of one worker still has
        # several processes to compare (a lone process gets [itself]).
        found = self.all_gather_object((outer_step, digest))
        if len(set(found)) != 1:
            raise DivergenceError(f"global state diverged at outer step {outer_step}: {found}")
        return None

    def close(self) -> None:
        """Release the backend's resources."""


class SoloGroup(Group):
    """A lone worker: its pseudo-gradient is the average, exactly, with no wire (it encodes
    nothing: asked for the owner error, it hands back `nothing_lost()`)."""

    rank, size = 0, 1

    def average(self, flat: torch.Tensor, codec: Codec, round: RoundId | None = None,
                aggregate: Aggregate | None = None, report: RoundReport | None = None,
                owner_error: bool = False) -> ExchangeResult:
        return alone(flat, report, owner_error)

    def broadcast(self, flat: torch.Tensor, src: int = 0) -> None:
        pass

    def all_gather_object(self, obj: object) -> list:
        return [obj]


def alone(flat: torch.Tensor, report: RoundReport | None, owner_error: bool) -> ExchangeResult:
    """The result of a member that averages with nobody (SoloGroup; a swarm round no other peer
    joined): its own vector, exactly. It encodes nothing, so its owner error (when asked) is
    `nothing_lost()`."""
    return ExchangeResult(flat.clone(), 0, 0, 1, 0.0, reports=[] if report is None else [_as_tuple(report)],
                          owner_error=nothing_lost() if owner_error else None)


def nothing_lost() -> tuple[int, torch.Tensor]:
    """`ExchangeResult.owner_error` of a member that re-encoded nothing: an empty error (adds nothing)."""
    return 0, torch.empty(0, dtype=torch.float32)


def checked_owner_error(group: Group, result: ExchangeResult) -> ExchangeResult:
    """`result` of `group.average(owner_error=True)`; raise where the group broke the contract (no
    owner error, no adopted state). DiLoCo checks after the round's last collective: no member is
    left waiting in one."""
    if result.owner_error is None and result.adopted is None:
        raise ValueError(f"{type(group).__name__}.average(owner_error=True) returned no ExchangeResult.owner_error: "
                         "with comm.owner_feedback a Group must fill it with (offset, mean − decode(encode(mean))) of "
                         "the chunk this member owns, or nothing_lost() when it re-encoded nothing (dilo/comm/"
                         "protocol.py, docs/design.md); fill it in the group, or set comm.owner_feedback = false")
    return result


def chunk_numel(numel: int, size: int, block_size: int) -> int:
    """Elements per owner chunk: equal chunks, each a whole number of codec blocks."""
    per_member = math.ceil(numel / size)
    return max(block_size, math.ceil(per_member / block_size) * block_size)


class ExchangeBuffers:
    """Reusable scratch for `two_phase_average`, owned by one group (calls never overlap).

    Buffers are kept by name and grown only when a larger exchange comes, so a steady run
    allocates nothing model-sized per outer step except the returned average.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self._bufs[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


def _as_tuple(report: RoundReport) -> tuple[float, float, float]:
    """A report as plain numbers (results are saved in checkpoints, which hold no custom classes)."""
    return (float(report.tokens), float(report.steps), float(report.ready_seconds))
