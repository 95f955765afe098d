"""How the owner of a chunk combines the members' contributions (`outer.aggregate`).

The owner of a chunk holds every member's decoded values for it (dilo/comm/protocol.py,
phase 1), so a per-coordinate rule costs no extra bytes; the owner encodes its result
once and every member decodes those bytes, so θ stays bit-identical whatever the rule.
Threat model and costs: docs/robust.md.

First the owner screens each contribution (chunk, member) and drops it, with a reason:

* ``non-finite``: a NaN or ±inf value. A sender whose Δ is not finite or out of the
  codec's range sends an all-NaN vector on purpose: the **no-contribution marker**
  (`NO_CONTRIBUTION`), which every codec carries as non-finite (no format change);
* ``saturated``: a value at the codec's finite limit (fp16 ±65504, bf16's max): what a
  cast codec's clamp makes of an overflow, never averaged in;
* ``norm above its report`` (clip only): the chunk is longer than the whole vector's
  norm the member reported, which an honest member cannot send.

Then the valid contributions v_1..v_n (member order) are reduced, per coordinate, in fp32:

* ``mean``: (v_1 + ... + v_n) / n, summed in member order (the rule before issue 13, same bytes);
* ``trimmed_mean``: sort each coordinate's n values, drop the k smallest and the k
  largest, sum the n − 2k middle ones in ascending order and divide by n − 2k;
* ``median``: the middle value; for even n, (a + b) / 2 of the two middle values;
* ``clip``: members first exchange their Δ's norms (the norm of what they send after the
  codec's round trip; one all-gather of M fp32 values); with m the median of the finite
  norms (even count: mean of the two middle ones, in fp64), member i's contribution is
  scaled by c_i = min(1, r · m / ‖Δ_i‖) (fp64, then fp32) and the scaled ones are averaged
  as ``mean``. Every member computes the same c_i from the same gathered norms.

With ``outer.weighting = tokens`` (mean and clip only) member i's contribution counts in
proportion to the tokens w_i it trained on in the round (its `RoundReport`, carried in the
exchange; docs/uneven.md). The owner turns the reported tokens into relative weights
r_i = w_i / mean(w) (fp64 over the members that reported w > 0, then rounded to fp32; equal
tokens give r_i = 1 exactly), then sums r_i·v_i (c_i·r_i·v_i with clip) in member order and
divides by the sum of the accepted r_i (fp64). Equal tokens thus give the bytes of ``mean``;
a member that reports no tokens is dropped (``no tokens in the round``).

When no contribution of a chunk is valid, the owner sends the marker as that chunk's
result: the average is not finite and DiLoCo skips the whole outer step on every member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from dilo.options import AGGREGATES, WEIGHTINGS
from dilo.reduce_kernels import add_into, max_abs

NO_CONTRIBUTION = float("nan")
"""The value of every element a worker sends when it has no valid pseudo-gradient."""


def codec_limit(codec) -> float | None:
    """The largest magnitude a cast codec can carry (None: scaled codecs and fp32 never clamp)."""
    limit = getattr(codec, "max_finite", None)
    return None if limit is None or codec.lossless else float(limit)


def why_unsendable(x: torch.Tensor, codec, largest: float | None = None) -> str | None:
    """Why `x` must not be encoded with `codec` (None: it may). One pass over `x` (max |x|), none
    when the caller knows `largest` = `max_abs(x)` already (from the pass that formed `x`)."""
    largest = max_abs(x) if largest is None else largest
    if not largest < math.inf:
        return "not finite"
    limit = codec_limit(codec)
    if limit is not None and largest >= limit:
        return f"out of the {codec.name} codec's finite range (|x| >= {limit:g})"
    return None


@dataclass
class Screened:
    accepted: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """(member, reason) of each contribution the owner dropped."""
    factors: list[float] = field(default_factory=list)
    """clip: c_i per member (every member computes the same list)."""


@dataclass(frozen=True)
class Aggregate:
    """One owner-side rule (see the module docstring); immutable, shared by every member."""

    name: str = "mean"
    trim: int = 1
    """trimmed_mean: values dropped at each end, per coordinate (k)."""
    clip_ratio: float = 2.0
    """clip: a contribution's norm is capped at clip_ratio × the median norm (r)."""
    weighting: str = "equal"
    """`equal`, or `tokens`: each contribution weighted by its member's tokens in the round."""

    def __post_init__(self) -> None:
        if self.name not in AGGREGATES:
            raise ValueError(f"outer.aggregate must be one of {', '.join(AGGREGATES)}, got {self.name!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"outer.weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.weighting == "tokens" and self.name not in ("mean", "clip"):
            raise ValueError(f"outer.weighting = tokens needs outer.aggregate = mean or clip, not {self.name}")

    @property
    def needs_norms(self) -> bool:
        return self.name == "clip"

    def trim_for(self, valid: int) -> int:
        """k for `valid` contributions: never more than leaves one value (open groups vary in size)."""
        return max(0, min(self.trim, (valid - 1) // 2))

    def clip_factors(self, norms: list[float]) -> list[float]:
        """c_i per member (NaN for a member that reported a non-finite norm: no contribution)."""
        finite = sorted(n for n in norms if n == n and n != float("inf"))
        if not finite:
            return [float("nan")] * len(norms)
        mid = len(finite) // 2
        median = finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2
        cap = self.clip_ratio * median
        return [float("nan") if not (n == n and n != float("inf")) else
                float(torch.tensor(1.0 if n <= cap else cap / n, dtype=torch.float64).float()) for n in norms]

    def reduce(self, decode: Callable[[int], torch.Tensor], size: int, chunk: int, limit: float | None,
               norms: list[float] | None = None, weights: list[float] | None = None, *,
               total: torch.Tensor | None = None,
               fused: tuple[Callable, Callable, Callable[[int], torch.Tensor]] | None = None,
               ) -> tuple[torch.Tensor, Screened]:
        """The owner's result for one chunk; `decode(m)` is member m's decoded contribution;
        `weights`: the members' r_i (`token_weights`) with outer.weighting = tokens.

        mean and clip decode one member at a time (bounded memory, as before issue 13); the
        sorting rules hold the valid contributions of the chunk together. `total`: a reused
        fp32 chunk for mean's and clip's sum, which becomes the result (divided in place).
        `fused`: (screen, add, encoded) of `reduce_kernels.fused_contribution` and member m's
        bytes, for plain mean: each contribution screened and added from its bytes (the same
        float operations as decode, check, add)."""
        if weights is not None and self.name not in ("mean", "clip"):
            raise ValueError(f"weighted contributions need outer.aggregate = mean or clip, not {self.name}")
        screened = Screened(factors=self.clip_factors(norms) if self.needs_norms else [])
        summed = self.name in ("mean", "clip")
        if summed and total is None:
            total = torch.empty(chunk, dtype=torch.float32)
        if self.name != "mean" or weights is not None:
            fused = None
        if fused is not None:  # every contribution screened from its bytes, then summed from them
            screen, add, encoded = fused
            raws = []
            for m in range(size):
                raw = encoded(m)
                if screen(raw, chunk):
                    screened.accepted.append(m)
                    raws.append(raw)
                else:
                    screened.rejected.append((m, "non-finite"))
            return _fused_mean(add, raws, total), screened
        valid, first = [], True  # first: the sum is still 0 (the next add is 0 + part)
        for m in range(size):  # member order: the same sum on every owner
            part = decode(m)
            reason = self._invalid(part, limit, norms[m] if norms is not None else None)
            if reason is None and weights is not None and not weights[m] > 0:
                reason = "no tokens in the round"
            if reason is not None:
                screened.rejected.append((m, reason))
                continue
            screened.accepted.append(m)
            scale = screened.factors[m] if self.name == "clip" and screened.factors[m] < 1.0 else 1.0
            if weights is not None:
                scale *= weights[m]
            if not summed:
                valid.append(part)
                continue
            add_into(total, part * scale if scale != 1.0 else part, first)
            first = False
        n = len(screened.accepted)
        if n == 0:
            return (torch.full((chunk,), NO_CONTRIBUTION) if total is None else total.fill_(NO_CONTRIBUTION)), screened
        if summed:
            return total.div_(n if weights is None else sum(weights[m] for m in screened.accepted)), screened
        values = torch.stack(valid).sort(dim=0).values
        if self.name == "median":
            mid = n // 2
            return (values[mid].clone() if n % 2 else (values[mid - 1] + values[mid]) / 2), screened
        k = self.trim_for(n)
        total = torch.zeros(chunk, dtype=torch.float32)
        for row in values[k:n - k]:  # ascending order, one fp32 add at a time
            total += row
        return total / (n - 2 * k), screened

    def _invalid(self, part: torch.Tensor, limit: float | None, reported: float | None) -> str | None:
        """Why the owner drops this contribution (None: it is valid)."""
        reason = _invalid_values(part, limit)
        if reason is not None:
            return reason
        if self.needs_norms:
            norm = part.norm().item()
            if not reported == reported or norm > reported * (1 + 1e-4) + 1e-30:
                return f"chunk norm {norm:.4g} above the reported norm {reported:.4g}"
        return None


MEAN = Aggregate()


def _invalid_values(part: torch.Tensor, limit: float | None) -> str | None:
    """"non-finite" or "saturated (...)" for a contribution's values, None when they are valid."""
    largest = max_abs(part)  # one pass: finiteness and the limit
    if not largest < math.inf:
        return "non-finite"
    if limit is not None and largest >= limit:
        return f"saturated (a value at the codec's limit {limit:g})"
    return None


def _strength(reason: str) -> int:
    """Which reason a whole-chunk check finds first: non-finite, then saturated, then no tokens."""
    return 0 if reason == "non-finite" else 2 if reason == "no tokens in the round" else 1


def _fused_mean(add: Callable, raws: list[torch.Tensor], total: torch.Tensor) -> torch.Tensor:
    """The mean of the contributions' bytes `raws` (member order) in `total`, with `add` of
    `reduce_kernels.fused_contribution`: 0 + the first, + each next, the last add dividing by
    their number (int8: in the same pass; the bits of adding all, then `total.div_(len(raws))`);
    NO_CONTRIBUTION everywhere when there is none."""
    if not raws:
        return total.fill_(NO_CONTRIBUTION)
    for k, raw in enumerate(raws):
        add(raw, total, k == 0, len(raws) if k == len(raws) - 1 else None)
    return total


class MeanByPieces:
    """`mean` (equal or token weights) of one owner chunk, reduced piece by piece as the pieces
    arrive (dilo/comm/two_phase.py, `comm.pieces`): per element the same fp32 operations, in the
    same member order, as `Aggregate.reduce` over the whole chunk.

    A contribution is dropped whole when any of its pieces is invalid, with the reason a check of
    the whole chunk gives (non-finite before saturated before no tokens). A piece is summed with
    the contributions valid so far; when a later piece drops a contribution an earlier piece
    counted, `redo` is set and the caller sums every piece again (`again`, then `piece` for each,
    with the same arguments) before any result leaves."""

    def __init__(self, size: int, limit: float | None, weights: list[float] | None, total: torch.Tensor,
                 fused: tuple[Callable, Callable] | None):
        self.size, self.limit, self.weights, self.total = size, limit, weights, total
        self.fused = fused if weights is None else None  # (screen, add): plain mean only, as `reduce`
        self.reasons: dict[int, str] = {}
        self.redo = False
        self._summed: set[int] = set()

    def piece(self, lo: int, n: int, decode: Callable[[int], torch.Tensor],
              encoded: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Elements [lo, lo + n) of the result, written into `total`; `decode(m)`: member m's
        decoded piece, `encoded(m)`: its bytes (for the fused kernels)."""
        out, first = self.total[lo:lo + n], True
        if self.fused is not None:  # every contribution screened from its bytes, then summed from them
            raws = [encoded(m) for m in range(self.size)]
            for m, raw in enumerate(raws):
                if not self.fused[0](raw, n):
                    self._drop(m, "non-finite")
            accepted = self.screened().accepted  # (not dropped for this piece or an earlier one)
            self._summed.update(accepted)
            return _fused_mean(self.fused[1], [raws[m] for m in accepted], out)
        for m in range(self.size):  # member order: the same sum on every owner
            part = decode(m)
            reason = _invalid_values(part, self.limit)
            if reason is None and self.weights is not None and not self.weights[m] > 0:
                reason = "no tokens in the round"
            if reason is not None:
                self._drop(m, reason)
                continue
            if m in self.reasons:  # dropped for another piece
                continue
            self._summed.add(m)
            scale = 1.0 if self.weights is None else self.weights[m]
            add_into(out, part * scale if scale != 1.0 else part, first)
            first = False
        accepted = self.screened().accepted
        if not accepted:
            return out.fill_(NO_CONTRIBUTION)
        return out.div_(len(accepted) if self.weights is None else sum(self.weights[m] for m in accepted))

    def again(self) -> None:
        """Before summing every piece again with the contributions dropped by now left out."""
        self.redo, self._summed = False, set()

    def screened(self) -> Screened:
        return Screened(accepted=[m for m in range(self.size) if m not in self.reasons],
                        rejected=[(m, self.reasons[m]) for m in sorted(self.reasons)])

    def _drop(self, m: int, reason: str) -> None:
        self.redo = self.redo or m in self._summed
        if m not in self.reasons or _strength(reason) < _strength(self.reasons[m]):
            self.reasons[m] = reason


def token_weights(tokens: list[float]) -> list[float]:
    """r_i = w_i / mean(w) per member (fp64, then rounded to fp32), the mean over the members
    that report w > 0; 0 for a member that reports none (or a non-finite count)."""
    good = [w for w in tokens if math.isfinite(w) and w > 0]
    if not good:
        return [0.0] * len(tokens)
    mean = sum(good) / len(good)
    return [float(torch.tensor(w / mean, dtype=torch.float64).float()) if math.isfinite(w) and w > 0 else 0.0
            for w in tokens]


def exchange_norms(slices: torch.Tensor, codec, chunk: int, all_gather) -> list[float]:
    """clip: every member's norm of what it sends (after the codec's round trip), member order.
    `slices`: the send buffer as one row per owner (the chunk's bytes first).

    One all-gather of one fp32 per member over the exchange's byte collective, before phase 1.
    """
    nbytes = codec.encoded_nbytes(chunk)
    square = sum(codec.decode(row[:nbytes], chunk).double().square().sum().item() for row in slices)
    mine = torch.tensor([square ** 0.5], dtype=torch.float32)
    return [float(v) for v in all_gather(mine.view(torch.uint8)).view(torch.float32)]
