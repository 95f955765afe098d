"""Streaming DiLoCo's fragments: which parameters sync together, and each one's outer state.

With `fragments = P > 1` the synchronized parameters are split into P fragments that
are exchanged in turn, one every H/P inner steps, so only 1/P of the model is on the
wire at a time. Assignment (`assign_fragments`), as in Streaming DiLoCo:

* the model's repeated blocks are the `nn.ModuleList` holding the most trainable
  parameters (a transformer's layers); block i goes to fragment i mod P (strided:
  each fragment spans the whole depth of the network);
* parameters outside the blocks are assigned explicitly by their position: those
  before the first block (token and position embeddings; with weight tying the head
  too) go to fragment 0, those after the last block (final norm, an untied head) to
  fragment P - 1.

Each `Fragment` holds its own slice of the outer state: θ_p (flat fp32 on the CPU,
parameters in model order), its `torch.optim.SGD` outer optimizer, the worker-local
eager copy (overlap = eager) and the error-feedback residual (error_feedback).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dilo import codec_kernels
from dilo.codecs import Codec
from dilo.global_layout import flatten_fp32, read_pieces, write_flat
from dilo.outer_sgd import live_pieces, sgd_step, sgd_step_encoded


def assign_fragments(model: nn.Module, params: list[nn.Parameter], num_fragments: int) -> list[int]:
    """Fragment index of each of `params` (model order); see the module docstring."""
    if num_fragments == 1:
        return [0] * len(params)
    trainable = {id(p) for p in params}
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters() if id(p) in trainable),
                 default=None)
    if blocks is None or len(blocks) < num_fragments:
        found = 0 if blocks is None else len(blocks)
        raise ValueError(f"fragments = {num_fragments} needs a model whose layers are an nn.ModuleList "
                         f"of at least {num_fragments} blocks; found {found} blocks")
    block_of = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            block_of.setdefault(id(p), i)
    assignment, seen_block = [], False
    for p in params:
        if id(p) in block_of:
            assignment.append(block_of[id(p)] % num_fragments)
            seen_block = True
        else:
            assignment.append(num_fragments - 1 if seen_block else 0)
    for f in range(num_fragments):
        if f not in assignment:
            raise ValueError(f"fragment {f} of {num_fragments} holds no trainable parameter; "
                             "use fewer fragments")
    return assignment


class Schedule:
    """When each fragment is applied, and how many exchanges are in flight at an outer step."""

    def __init__(self, inner_steps: int, num_fragments: int, delay: int, overlapped: bool):
        self.inner_steps, self.num_fragments, self.delay = inner_steps, num_fragments, delay
        self.stride = inner_steps // num_fragments
        """Inner steps between two apply steps (H/P)."""
        self.round_lag = num_fragments if overlapped else 0
        """Exchanges started but not yet applied at an outer step: 0, or P with overlap
        delayed/eager (round t is applied as outer step t + 1 while rounds t + 1 .. t + P run)."""

    def fragment_applied_at(self, step: int, end_round: bool | None = None) -> int | None:
        """The fragment p with step ≡ p·H/P (mod H), if any; with H = 0 (rounds ended by the
        caller, one fragment) fragment 0 when `end_round`."""
        if self.inner_steps == 0:
            return 0 if end_round else None
        phase = step % self.inner_steps
        return phase // self.stride if phase % self.stride == 0 else None

    def missed_round(self, number: int) -> tuple[int, int]:
        """(fragment, inner step it was started at) of exchange `number`, for a member that
        adopted a state while it was in flight."""
        apply_step = (number + 1 + self.round_lag) * self.stride  # exchange t is applied as outer step t + 1
        return self.fragment_applied_at(apply_step), apply_step - self.round_lag * self.stride - self.delay


def codec_roundtrip(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    """What `x` becomes on the wire.

    Equal to what the two-phase exchange's phase 1 delivers for this worker's vector:
    `two_phase_average` cuts it into owner chunks that are whole codec blocks, so the
    blocks (and thus scales and codes) are the same as when the whole vector is encoded.
    """
    return codec.decode(codec.encode(x), x.numel())


class Fragment:
    """One fragment's parameters, outer state and worker-local extras."""

    def __init__(self, index: int, params: list[nn.Parameter], outer_lr: float, outer_momentum: float,
                 nesterov: bool, eager: bool, error_feedback: bool, ef_decay: float = 1.0):
        self.index = index
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self._sgd = dict(lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)
        self.theta = nn.Parameter(self.read_live(), requires_grad=False)
        self.outer = torch.optim.SGD([self.theta], **self._sgd)
        # eager: this worker's own outer trajectory, fed its fresh Δ in place of the stale own share
        self.eager_theta: nn.Parameter | None = None
        self.eager_outer: torch.optim.SGD | None = None
        if eager:
            self.eager_theta = nn.Parameter(self.theta.detach().clone(), requires_grad=False)
            self.eager_outer = torch.optim.SGD([self.eager_theta], **self._sgd)
        self.residual = torch.zeros(self.numel) if error_feedback else None
        self._delta: torch.Tensor | None = None  # pseudo_gradient(reuse=True)'s buffer
        self.delta_max_abs: float | None = None
        """max |Δ| of the last `pseudo_gradient`, from its pass (None: unknown, the torch path ran)."""
        self.delta_norm = 0.0
        """‖Δ‖ of the last `pseudo_gradient` (logged; the kernel's sum, dilo/codec_kernels.py)."""
        self.ef_decay = ef_decay
        """β: what is kept is decayed before it is sent again (1: kept whole)."""
        self.last_merge_step = 0
        """Inner step at which the live parameters were last set from the outer state."""
        self.last_snapshot_step = 0
        """Inner step at which the live parameters' progress was last put on the wire."""

    # -- the live model's slice ----------------------------------------------------------
    def read_live(self) -> torch.Tensor:
        return flatten_fp32(self.params)

    @torch.no_grad()
    def pseudo_gradient(self, reuse: bool = False) -> torch.Tensor:
        """Δ = ϑ − live (flat fp32), formed piece by piece: no concatenated copy of the live
        parameters (the same bytes as ``start_point - read_live()``). `reuse`: in the
        fragment's one buffer, kept between rounds (the caller is done with the last Δ). Sets
        `delta_max_abs` and `delta_norm`, from the same pass when the kernel runs."""
        start = self.start_point
        if reuse and self._delta is None:
            self._delta = torch.empty(self.numel, dtype=torch.float32)
        delta = self._delta if reuse else torch.empty(self.numel, dtype=torch.float32)
        largest, sumsq = 0.0, 0.0  # max |Δ| and Σ Δ², from the same pass when the kernel runs
        for offset, live in read_pieces(self.params):
            end = offset + live.numel()
            got = codec_kernels.sub_with_max_abs(start[offset:end], live, delta[offset:end])
            if got is None:
                torch.sub(start[offset:end], live, out=delta[offset:end])
                largest = sumsq = None
            elif largest is not None:
                largest = math.nan if math.isnan(got[0]) or math.isnan(largest) else max(largest, got[0])
                sumsq += got[1]
        self.delta_max_abs = largest
        self.delta_norm = math.sqrt(sumsq) if sumsq is not None else delta.norm().item()
        return delta

    def write_live(self, flat: torch.Tensor) -> None:
        write_flat(self.params, flat)

    @property
    def start_point(self) -> torch.Tensor:
        """ϑ: where the live fragment was last merged from (θ, or the eager copy)."""
        return (self.eager_theta if self.eager_theta is not None else self.theta).detach()

    @torch.no_grad()
    def merge(self, alpha: float) -> None:
        """live ← α·live + (1 − α)·ϑ; with α = 0 an exact copy of ϑ."""
        if alpha == 0.0:
            self.write_live(self.start_point)
        else:
            self.write_live(alpha * self.read_live() + (1.0 - alpha) * self.start_point)

    # -- error feedback ------------------------------------------------------------------
    def compensate(self, pseudo_grad: torch.Tensor, codec: Codec) -> torch.Tensor:
        """What to send: Δ + β·e, and e ← (Δ + β·e) − decode(encode(Δ + β·e)) (β = 1: Δ + e)."""
        if self.residual is None:
            return pseudo_grad
        sent = pseudo_grad + (self.residual if self.ef_decay == 1.0 else self.residual * self.ef_decay)
        self.residual = sent - codec_roundtrip(codec, sent)
        return sent

    @torch.no_grad()
    def feed_back_owner_error(self, offset: int, error: torch.Tensor, members: int) -> None:
        """Owner feedback: e[chunk] += M · (mean − decode(encode(mean))), so that the next round's
        mean, which holds this worker's share / M, carries again what the owner's re-encode lost."""
        if codec_kernels.all_finite(error):
            self.residual[offset:offset + error.numel()] += error * members

    # -- outer steps ---------------------------------------------------------------------
    @staticmethod
    def _sgd_step(param: nn.Parameter, opt: torch.optim.Optimizer, grad: torch.Tensor, live=()) -> None:
        """`opt.step()` with `grad` as the gradient, exactly torch's SGD bytes (dilo/outer_sgd.py)."""
        sgd_step(param, opt, grad, live)

    @torch.no_grad()
    def apply_outer_step(self, average: torch.Tensor, write_live: bool = False, encoded=None) -> bool:
        """θ_p ← one outer SGD step with the averaged pseudo-gradient as its gradient; with
        `write_live` the live parameters ← the new θ_p in the same pass when they are all
        contiguous fp32 CPU tensors (then True: the merge that follows is done). `encoded`: the
        average still in the exchange's bytes (`average` not filled yet): the step reads them
        (`outer_sgd.sgd_step_encoded`), or they are decoded into `average` first."""
        live = live_pieces(self.params) if write_live else None
        if encoded is None or not sgd_step_encoded(self.theta, self.outer, encoded, live or ()):
            self._sgd_step(self.theta, self.outer, average if encoded is None else encoded.decode_into(average),
                           live or ())
        return live is not None

    @torch.no_grad()
    def eager_step(self, fresh_own: torch.Tensor, stale_own: torch.Tensor | None,
                   average: torch.Tensor | None, members: int) -> None:
        """The eager copy's outer step with Δ̃ = Δ^(k−1) + (Δ_m^(k) − Δ_m^(k−1)) / M: the fresh
        own share `fresh_own` replaces the stale one in the round's `average` (None: no round
        was due). A round fetched after a join had no own share (`stale_own` None): the
        average stands for it."""
        usable = average is not None and codec_kernels.all_finite(average)  # (one pass, asked once)
        if stale_own is None:
            stale_own = average if usable else torch.zeros_like(fresh_own)
        proxy = (fresh_own - stale_own) / members
        if usable:
            proxy += average
        self._sgd_step(self.eager_theta, self.eager_outer, proxy)

    @torch.no_grad()
    def reset_eager(self) -> None:
        """Eager copy ← the shared outer state (after a drain, or a state transfer)."""
        if self.eager_theta is None:
            return
        self.eager_theta.copy_(self.theta)
        self.eager_outer = torch.optim.SGD([self.eager_theta], **self._sgd)
        momentum = self.momentum()
        if momentum is not None:
            self.eager_outer.state[self.eager_theta]["momentum_buffer"] = momentum.clone()

    @torch.no_grad()
    def restart_local(self, step: int | None = None) -> None:
        """Drop the worker-local extras after taking another worker's outer state: zero
        error-feedback residual, eager copy ← θ; with `step`, the schedule restarts there."""
        if self.residual is not None:
            self.residual.zero_()
        self.reset_eager()
        if step is not None:
            self.last_merge_step = self.last_snapshot_step = step

    def momentum(self) -> torch.Tensor | None:
        return self.outer.state.get(self.theta, {}).get("momentum_buffer")

    def set_momentum(self, momentum: torch.Tensor | None) -> None:
        """Outer momentum ← a copy of `momentum` (None: none yet, as before the first outer step)."""
        self.outer.state.clear()
        if momentum is not None:
            self.outer.state[self.theta]["momentum_buffer"] = momentum.clone()

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"outer": self.outer.state_dict(), "last_merge_step": self.last_merge_step,
                 "last_snapshot_step": self.last_snapshot_step}
        if self.eager_theta is not None:
            state["eager_theta"] = self.eager_theta.detach().clone()
            state["eager_outer"] = self.eager_outer.state_dict()
        if self.residual is not None:
            state["residual"] = self.residual.clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.outer.load_state_dict(state["outer"])
        self.last_merge_step = int(state["last_merge_step"])
        self.last_snapshot_step = int(state["last_snapshot_step"])
        if self.eager_theta is not None:
            self.eager_theta.copy_(state["eager_theta"])
            self.eager_outer.load_state_dict(state["eager_outer"])
        if self.residual is not None:
            self.residual = state["residual"].clone()
