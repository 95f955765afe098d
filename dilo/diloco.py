"""DiLoCo: the outer loop around any model and inner optimizer.

Per worker, outer step t (θ is the global copy, identical on every worker):

1. the live model starts from θ (the inner optimizer's state is kept, not reset);
2. H inner steps of the user's optimizer on the worker's own data → θ_m';
3. pseudo-gradient Δ_m = θ − θ_m';
4. Δ = mean over the workers of Δ_m, exchanged through a `Group` with a codec;
5. outer step on θ with Δ as its gradient: `torch.optim.SGD(nesterov=True)`.

θ and the outer momentum live on the CPU in fp32, whatever the model's device and
dtype, so DiLoCo costs no accelerator memory. Only parameters with `requires_grad`
are synchronized; floating-point buffers are averaged exactly (fp32) with every exchange.

The variants (docs/design.md, the algorithm; docs/streaming.md has the full statement)
are keyword options, checked by dilo/options.py; with their defaults the algorithm above
runs exactly (same bytes):

* `fragments` P: the parameters form P fragments (dilo/fragments.py); fragment p is
  applied at the inner steps s with s ≡ p·H/P (mod H), each with its own θ_p and SGD.
* `delay` τ: fragment p's pseudo-gradient is taken τ inner steps before it is applied,
  and its exchange runs in the background meanwhile (dilo/overlap.py).
* `alpha` α: when a fragment is applied, live ← α·live + (1 − α)·θ_p.
* `overlap`: `none` (above), `delayed` (the exchange taken for round k is applied at
  round k + 1: it has a whole round to complete), `eager` (as delayed for θ; the live
  model restarts from a worker-local copy stepped with the fresh own Δ in place of
  the stale own share: Δ̃ = Δ^(k−1) + (Δ_m^(k) − Δ_m^(k−1)) / M).
* `error_feedback`: send Δ_m + e and keep e ← (Δ_m + e) − decode(encode(Δ_m + e)); always
  on with a codec that needs it (sparse, dilo/codec_lowbit.py). `ef_decay` β < 1 sends
  Δ_m + β·e instead (SparseLoCo's decayed accumulator, docs/codecs.md). `owner_feedback`:
  the owner of each chunk also adds M × what its re-encode of the mean lost to its residual.
* `aggregate` (`trim`, `clip_ratio`): how each chunk's owner combines the workers' Δ_m
  (mean, trimmed_mean, median, clip; dilo/aggregate.py, docs/robust.md). Whatever the
  rule, a worker whose Δ_m + e is not finite or beyond the codec's range sends "no
  contribution" (and resets e), and a step with nothing valid for part of Δ is skipped.
* `weighting` = tokens: each Δ_m counts in proportion to the tokens of its round, reported
  with it (`step(report=)`; default: its inner steps); `inner_steps` = 0: the caller ends
  each round (`step(end_round=True)`: rounds by time or tokens, dilo/rounds.py,
  docs/uneven.md).

Whatever the variant, θ_p and its momentum change only by averages that are the same
bytes on every worker, in the same order: they stay bit-identical (hash-checked).

`DiLoCo` is the loop; what it holds between calls, and its snapshots, adoption and
checkpoints, are `OuterState` (dilo/outer_state.py). The exchanges in flight, and with
groups of open membership (the hivemind swarm) the rounds an adopted state supersedes or
fetches, are dilo/in_flight.py; θ's layout (model order ⇄ fragment order) is
dilo/global_layout.py.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn

from dilo import codec_error_sums, outer_sgd
from dilo.aggregate import MEAN, Aggregate, why_unsendable
from dilo.codecs import Codec, get_codec
from dilo.comm.protocol import Group, RoundId, RoundReport, SoloGroup, checked_owner_error
from dilo.fragments import Fragment, Schedule, assign_fragments
from dilo.global_hash import digest_thread
from dilo.global_layout import flatten_fp32, write_flat
from dilo.in_flight import Round, RoundsInFlight
from dilo.options import (check_aggregate, check_outer_options, check_owner_feedback, default_aggregate,
                          overlap_warning)
from dilo.outer_state import OuterState
from dilo.stats import SyncStats, round_fields

log = logging.getLogger("dilo")

_FP32 = get_codec("fp32")


def default_group() -> Group:
    """The default torch.distributed process group if one is initialised, else a lone worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from dilo.comm.torch_dist import TorchGroup

        return TorchGroup()
    return SoloGroup()


def error_feedback_runs(codec: Codec, group: Group, error_feedback: bool, ef_decay: float,
                        owner_feedback: bool) -> bool:
    """Whether the workers keep error-feedback residuals; refuses codec/exchange combinations that
    cannot run. Error feedback corrects what the codec loses on the wire (a lone worker sends
    nothing); a codec that drops most of Δ (sparse) always runs with it (docs/codecs.md)."""
    if codec.exchange == "gather" and group.open_membership:
        raise ValueError(f"comm.codec = {codec.name} is exchanged by all-gather (dilo/comm/gather.py), which a "
                         "group of open membership (the hivemind swarm) does not run yet; use a fixed group "
                         "(comm.backend = torch), comm.sparse_exchange = two_phase or a dense codec (codec)")
    ef = (error_feedback or codec.needs_error_feedback) and group.size > 1
    if ef and not error_feedback:
        log.info("comm.codec = %s runs with error feedback (what it drops is kept and sent later)", codec.name)
    # Allowed without effect (a warning), so that one set of flags serves several codecs.
    if ef_decay != 1.0 and not ef:
        log.warning("comm.ef_decay = %g has no effect: this run has no error feedback (comm.error_feedback "
                    "false with %s, or a lone worker)", ef_decay, codec.name)
    check_owner_feedback(owner_feedback, error_feedback=error_feedback, codec=codec.name, exchange=codec.exchange,
                         codec_lossless=codec.lossless, codec_needs_error_feedback=codec.needs_error_feedback)
    if owner_feedback and not ef:
        log.warning("comm.owner_feedback has no effect: a lone worker exchanges nothing")
    return ef


def owners_rule(group: Group, aggregate: str, trim: int, clip_ratio: float, weighting: str,
                inner_steps: int) -> Aggregate:
    """The owners' rule (`outer.aggregate`, dilo/aggregate.py) for this group, checked."""
    open_group = group.open_membership
    check_aggregate(aggregate, trim, clip_ratio, None if open_group else group.size, open_group, weighting)
    if open_group and inner_steps == 0:
        raise ValueError("rounds ended by the caller (inner_steps = 0) need a fixed group (torch backend)")
    return Aggregate(default_aggregate(open_group) if aggregate == "auto" else aggregate,
                     trim, float(clip_ratio), weighting)


def synced_tensors(model: nn.Module, group: Group) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The model's trainable parameters (θ) and floating-point buffers (averaged exactly)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("DiLoCo needs at least one parameter with requires_grad=True")
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if group.open_membership and buffers:
        raise ValueError("the hivemind backend does not synchronize floating-point buffers yet; "
                         "use a model without them or comm.backend = torch")
    return params, buffers


class DiLoCo(OuterState):
    """Wraps a model and its inner optimizer; call `step()` after every inner step.

    Its state (θ, counters, rounds in flight), hash, `adopt_state` and checkpoints are
    `OuterState`'s; this class is the schedule of exchanges and outer steps.

    With the defaults it synchronises every `inner_steps` calls: afterwards the model's
    trainable parameters equal the new global parameters, bit-identical on every
    worker. Call `flush()` at the end of training (see there); `close()` when done.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        inner_steps: int,
        outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
        codec: str | Codec = "int8", group: Group | None = None, block_size: int = 256,
        check_hashes: bool = True,
        fragments: int = 1, delay: int = 0, alpha: float = 0.0, overlap: str = "none",
        error_feedback: bool = False, ef_decay: float = 1.0, owner_feedback: bool = False,
        aggregate: str = "auto", trim: int = 1, clip_ratio: float = 2.0, weighting: str = "equal",
        digest: str = "step",
    ):
        self.codec = get_codec(codec, block_size) if isinstance(codec, str) else codec
        self.codec.warm_up()  # kernels load now, not inside the first exchange (rounds by time count it)
        outer_sgd.warm_up()
        codec_error_sums.warm_up()
        check_outer_options(inner_steps=inner_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                            nesterov=nesterov, fragments=fragments, delay=delay, alpha=alpha, overlap=overlap,
                            error_feedback=error_feedback, codec=self.codec.name,
                            codec_lossless=self.codec.lossless, ef_decay=ef_decay)
        self.model, self.inner_steps = model, inner_steps
        self.num_fragments, self.delay, self.alpha, self.overlap = fragments, delay, alpha, overlap
        self.error_feedback = error_feedback
        self.owner_feedback = owner_feedback
        self.group = group if group is not None else default_group()
        if caution := overlap_warning(overlap, self.group.size, outer_lr, outer_momentum, nesterov, inner_steps):
            log.warning(caution)
        self.aggregate = owners_rule(self.group, aggregate, trim, clip_ratio, weighting, inner_steps)
        self.group.aggregate = self.aggregate  # the owners' rule (dilo/aggregate.py)
        self.check_hashes = check_hashes
        params, self.buffers = synced_tensors(model, self.group)
        flat = flatten_fp32(params)
        if not self.group.open_membership:
            self.group.broadcast(flat, src=0)  # every worker starts from the same θ
        write_flat(params, flat)
        owner = assign_fragments(model, params, fragments)
        ef = error_feedback_runs(self.codec, self.group, error_feedback, ef_decay, owner_feedback)
        frags = [Fragment(f, [p for p, o in zip(params, owner) if o == f], outer_lr, outer_momentum,
                          nesterov, eager=overlap == "eager", error_feedback=ef, ef_decay=ef_decay)
                 for f in range(fragments)]
        overlapped = overlap != "none"
        super().__init__(params, frags, owner, inner_optimizer,
                         Schedule(inner_steps, fragments, delay, overlapped),
                         RoundsInFlight(self.group, background=delay > 0 or overlapped),
                         {"fragments": fragments, "delay": delay, "alpha": alpha, "overlap": overlap,
                          "error_feedback": error_feedback, **({"ef_decay": ef_decay} if ef_decay != 1.0 else {}),
                          **({"owner_feedback": True} if owner_feedback else {})})
        self.background_digest = digest_thread(digest, self.group.open_membership, self._state_lock)
        self.after_outer_step = None
        """Optional hook(θ before, θ after) → (bytes sent, bytes received), called on every
        member after each outer step while the live model still holds its own trained values
        (fragments = 1, no delay or overlap; dilo/lora.py's exact aggregation). A step skipped
        for a non-finite average calls it on no member (the average is everyone's)."""
        self.joined = self.group.bind(self)  # a running swarm's state, or None
        if self.joined is not None:
            self.adopt_state(self.joined)
        if self.buffers and self.group.size > 1:  # every worker starts from the same buffers
            write_flat(self.buffers, self.group.average(flatten_fp32(self.buffers), _FP32, aggregate=MEAN).average)

    # -- the public loop ---------------------------------------------------------------
    def step(self, end_round: bool | None = None, report: RoundReport | None = None) -> SyncStats | None:
        """Count one inner step; start and apply exchanges when the schedule says so (inner_steps
        = 0: when `end_round`); `report`: this worker's round, sent with a round that starts."""
        self.inner_step += 1
        self.in_flight.collect_hash_checks(block=False)
        if self.group.open_membership and self.group.processes == 1:
            adopted = self._adopt_early()
            if adopted is not None:
                return adopted
        starting = self.schedule.fragment_applied_at(self.inner_step + self.delay, end_round)
        if starting is not None:  # (without delay or overlap it is applied just below)
            self._start_round(starting, report, self.delay == 0 and self.overlap == "none")
        ending = self.schedule.fragment_applied_at(self.inner_step, end_round)
        return self._end_round(ending) if ending is not None else None

    @torch.no_grad()
    def _start_round(self, f: int, report: RoundReport | None = None, applied_now: bool = False) -> None:
        """Put fragment f's pseudo-gradient on the wire (`applied_now`: the group may `keep_encoded`)."""
        frag = self.fragments[f]
        if report is None and self.aggregate.weighting == "tokens":  # weight by the round's inner steps
            report = RoundReport(*(float(self.inner_step - frag.last_snapshot_step),) * 2)
        # Without overlap Δ is formed in one reused buffer the group may write the average over.
        reuse = self.overlap == "none" and self.group.average_out
        pseudo_grad = frag.pseudo_gradient(reuse)
        wire = sent = frag.compensate(pseudo_grad, self.codec)
        why = why_unsendable(sent, self.codec, frag.delta_max_abs if sent is pseudo_grad else None) \
            if self.group.size > 1 or self.group.open_membership else None
        if why is not None:  # never encode it: send the no-contribution marker (dilo/aggregate.py)
            wire, sent = self._withhold(f, sent, why)
        buffers = flatten_fp32(self.buffers) if self.buffers and self.group.size > 1 else None
        named = {"round": RoundId(self.outer_step + len(self.in_flight), self._digest())} \
            if self.group.open_membership else {}  # exchange number = outer step + exchanges in flight
        if report is not None:  # only rounds that report (time/token rounds, token weighting)
            named["report"] = report
        if reuse:
            named["out"] = wire
        named["owner_error"] = self.owner_feedback and frag.residual is not None  # the owners' re-encode loss
        if applied_now and self.group.encoded_average and self.after_outer_step is None:
            named["keep_encoded"] = True  # (applied before the next exchange: the step reads the bytes)
        def exchange():  # runs on the exchange thread (or inline): touches only its inputs
            result = self.group.average(wire, self.codec, **named)
            mean_buffers = self.group.average(buffers, _FP32, aggregate=MEAN).average if buffers is not None else None
            return (checked_owner_error(self.group, result) if named["owner_error"] else result), mean_buffers

        self.in_flight.start(f, self.inner_step, exchange, sent, frag.delta_norm)
        frag.last_snapshot_step = self.inner_step

    @torch.no_grad()
    def _end_round(self, f: int) -> SyncStats | None:
        """Fragment f's apply step: outer step(s), then merge the live fragment."""
        frag = self.fragments[f]
        mine = [r for r in self.in_flight if r.fragment == f]
        # This round's exchange, snapshotted τ steps ago (absent only if flush() drained it).
        fresh = next((r for r in mine if r.started == self.inner_step - self.delay), None)
        stats = None
        if self.overlap == "none":
            if fresh is not None:  # (with a delay, flush applies rounds with the live model untouched)
                stats, _ = self._apply(fresh, write_live=self.delay == 0 and self.alpha == 0.0)
                if self._live_written:  # the outer step wrote θ_p into the live model: merged
                    frag.last_merge_step = self.inner_step
                    return stats
        else:
            previous = next((r for r in mine if r is not fresh), None)  # last round's, due now
            average = None
            if previous is not None:
                stats, average = self._apply(previous)
                if stats.adopted:  # the live model restarted from the adopted state
                    return stats
            if frag.eager_theta is not None and fresh is not None:
                frag.eager_step(fresh.sent, previous.sent if previous is not None else None, average,
                                self.group.size)
        frag.merge(self.alpha)
        frag.last_merge_step = self.inner_step
        return stats

    def settle(self) -> SyncStats | None:
        """Open membership: wait for the exchanges in flight and adopt the newer state one of
        them handed back, if any (the caller continues at `inner_step`). Checkpoints call it
        first, on every process of the member: the same rounds, so the same outcome."""
        last = None
        while True:  # (the rounds fetched after an adoption may hand back a state again)
            self.in_flight.wait()
            stats = self._adopt_early()
            if stats is None:
                return last
            last = stats

    def _adopt_early(self) -> SyncStats | None:
        """Open membership: adopt as soon as an exchange hands back a newer state (the rounds
        after it are superseded: applying on schedule would only delay the catch-up). Only
        for a member of one process: whether an exchange is done yet differs between the
        processes of an island, which must adopt at the same step (they do at its apply step,
        or in `settle`)."""
        rnd = self.in_flight.adopting_round()
        return self._apply(rnd)[0] if rnd is not None else None

    @torch.no_grad()
    def _apply(self, rnd: Round, write_live: bool = False) -> tuple[SyncStats, torch.Tensor | None]:
        """Wait for a round's exchange and apply the average to its fragment's θ (`write_live`: and θ_p
        into the live model in the same pass, when it can); also the average (None if kept encoded)."""
        outcome = rnd.handle.result()
        if outcome is None:  # an earlier round adopted a state, which drops the rounds after it
            raise RuntimeError("internal error: a superseded exchange reached its apply step")
        result, mean_buffers, seconds = outcome
        t_apply = time.perf_counter()
        with self._state_lock:  # (export_state reads the outer step and the rounds in flight together)
            self.in_flight.remove(rnd)
        adopted = result.adopted is not None
        skipped, hook_bytes, self._live_written = 0, (0, 0), False
        if adopted:
            # A group of open membership went on without this worker (it was too late or
            # behind): its Δ is lost and it continues from the group's newer state.
            self.adopt_state(result.adopted)
        else:
            skipped, hook_bytes, self._live_written = self._outer_step(
                rnd.fragment, result, write_live and self.after_outer_step is None, self.owner_feedback,
                self.after_outer_step)
        if mean_buffers is not None:
            write_flat(self.buffers, mean_buffers)
        t_digest = time.perf_counter()
        digest, hash_step, repaired = self._confirmed_digest(self.check_hashes)
        adopted = adopted or repaired
        stats = self._sync_stats(rnd, result, seconds, (digest, hash_step), adopted, skipped, hook_bytes,
                                 (t_digest - t_apply, time.perf_counter() - t_digest),
                                 round_fields(result.reports, self.group.rank, self.aggregate.weighting))
        return stats, result.average if result.encoded is None else None

    def flush(self, report: RoundReport | None = None) -> list[SyncStats]:
        """Drain the pipeline and put the live model on θ, identical on every worker.

        Every fragment whose progress since it was last merged is not on the wire yet
        sends it now; then every exchange in flight is waited for and applied to θ in
        the order it started; then every live fragment ← θ_p. Progress made after a
        fragment's last snapshot (its τ in-flight steps) is dropped, as a merge with
        α = 0 would drop it. With the defaults this is one classic outer step over a
        shorter last round, or nothing if the last step was an outer step. All workers
        call it together (the training loop does, after the last inner step).
        """
        stats: list[SyncStats] = []
        # Without overlap the rounds in flight are applied first (the same maths: an apply
        # changes θ only, not the live fragments the new rounds send), so every exchange
        # starts from a confirmed state, as during training.
        if self.overlap == "none" and self._drain(stats):
            return stats
        for frag in self.fragments:
            if frag.last_snapshot_step <= frag.last_merge_step < self.inner_step:
                self._start_round(frag.index, report)
        # (then the rounds a state adopted at the end had in flight: fetched, never run here)
        if self._drain(stats) or (self.in_flight.fetch_owed(self.outer_step, self.schedule) and self._drain(stats)):
            return stats
        for frag in self.fragments:
            frag.write_live(frag.theta.detach())
            frag.reset_eager()
            frag.last_merge_step = frag.last_snapshot_step = self.inner_step
        self.settle_digest(self.check_hashes)  # (outer.digest = background: the last state's digest)
        self.in_flight.collect_hash_checks(block=True)
        return stats

    def _drain(self, stats: list[SyncStats]) -> bool:
        """Apply every round in flight, in order; True if one adopted a state (behind the
        swarm: the caller trains on from there)."""
        while self.in_flight.rounds:
            stats.append(self._apply(self.in_flight.rounds[0])[0])
            if stats[-1].adopted:
                return True
        return False

    def close(self) -> None:
        """Stop the exchange and digest threads (after `flush()`; a hung collective is not waited for)."""
        self.in_flight.close()
        if self.background_digest is not None:
            self.background_digest.close()
