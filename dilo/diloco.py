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

The variants of DESIGN §1 (docs/streaming.md has the full statement) are keyword
options; with their defaults the algorithm above runs exactly (same bytes):

* `fragments` P: the parameters form P fragments (dilo/fragments.py); fragment p is
  applied at the inner steps s with s ≡ p·H/P (mod H), each with its own θ_p and SGD.
* `delay` τ: fragment p's pseudo-gradient is taken τ inner steps before it is applied,
  and its exchange runs in the background meanwhile (dilo/overlap.py).
* `alpha` α: when a fragment is applied, live ← α·live + (1 − α)·θ_p.
* `overlap`: `none` (above), `delayed` (the exchange taken for round k is applied at
  round k + 1: it has a whole round to complete), `eager` (as delayed for θ; the live
  model restarts from a worker-local copy stepped with the fresh own Δ in place of
  the stale own share: Δ̃ = Δ^(k−1) + (Δ_m^(k) − Δ_m^(k−1)) / M).
* `error_feedback`: send Δ_m + e and keep e ← (Δ_m + e) − decode(encode(Δ_m + e)).

Whatever the variant, θ_p and its momentum change only by averages that are the same
bytes on every worker, in the same order: they stay bit-identical (hash-checked).

Elastic groups (the hivemind swarm, `Group.elastic`) have no fixed ranks: the starting
state comes from `Group.bind` (a running swarm's, or ours), a member that fell behind
adopts the group's newer state (`ExchangeResult.adopted`), and `Group.confirm` may hand
back the majority's state after a mismatch. A swarm matches exchanges by a `RoundId`
(the exchange's number and the digest of the state it was taken from), not by call
order, so its confirm runs on the training thread even when exchanges run in the
background. Exchanges are numbered in the order they start: exchange t is applied as
outer step t + 1, so a member at outer step s has started s + len(in flight) of them.
With overlap delayed/eager P of them are in flight at every apply step: a member that
adopts state s (joining, or after a fault) is handed rounds s .. s + P − 1 as results
fetched from the members that ran them (`Group.round_result`), applied on schedule, and
takes part from round s + P on. An adopted state supersedes the exchanges started from
the old one: they are skipped (or their results discarded) and never applied.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch
import torch.nn as nn

from dilo.codecs import Codec, get_codec
from dilo.comm.protocol import DivergenceError, GlobalState, Group, RoundId, SoloGroup, state_digest
from dilo.fragments import Fragment, assign_fragments
from dilo.overlap import ExchangeRunner, Handle, Round, round_from_state, round_state, run_inline
from dilo.stats import SyncStats

log = logging.getLogger("dilo")

OVERLAPS = ("none", "delayed", "eager")
_FP32 = get_codec("fp32")


def default_group() -> Group:
    """The default torch.distributed process group if one is initialised, else a lone worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from dilo.comm.torch_dist import TorchGroup

        return TorchGroup()
    return SoloGroup()


class DiLoCo:
    """Wraps a model and its inner optimizer; call `step()` after every inner step.

    With the defaults it synchronises every `inner_steps` calls: afterwards the model's
    trainable parameters equal the new global parameters, bit-identical on every
    worker. Call `flush()` at the end of training (see there); `close()` when done.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        inner_steps: int,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        codec: str | Codec = "int8",
        group: Group | None = None,
        block_size: int = 256,
        check_hashes: bool = True,
        fragments: int = 1,
        delay: int = 0,
        alpha: float = 0.0,
        overlap: str = "none",
        error_feedback: bool = False,
    ):
        self.codec = get_codec(codec, block_size) if isinstance(codec, str) else codec
        _check_options(inner_steps, fragments, delay, alpha, overlap, error_feedback, self.codec)
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.num_fragments, self.delay, self.alpha, self.overlap = fragments, delay, alpha, overlap
        self.error_feedback = error_feedback
        self.group = group if group is not None else default_group()
        self.check_hashes = check_hashes
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("DiLoCo needs at least one parameter with requires_grad=True")
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        if self.group.elastic:
            if self.buffers:
                raise ValueError("the hivemind backend does not synchronize floating-point buffers yet; "
                                 "use a model without them or comm.backend = torch")
        self.numel = sum(p.numel() for p in self.params)
        # θ, the outer momenta and the step change only under this lock, so an elastic
        # backend can snapshot them from its own thread (to serve a joining peer).
        self._state_lock = threading.Lock()
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])
            if not self.group.elastic:
                self.group.broadcast(flat, src=0)  # every worker starts from the same θ
            self._write_model_order(flat, live=True)
        owner = assign_fragments(model, self.params, fragments)
        # Error feedback corrects what the codec loses on the wire; a lone worker sends nothing.
        ef = error_feedback and self.group.size > 1
        self.fragments = [
            Fragment(f, [p for p, o in zip(self.params, owner) if o == f], outer_lr, outer_momentum,
                     nesterov, eager=overlap == "eager", error_feedback=ef)
            for f in range(fragments)]
        self._owner = owner
        self.inner_step = 0
        self.outer_step = 0
        self._rounds: list[Round] = []  # in submission order
        self._hash_checks: list[tuple[tuple, Handle]] = []
        self._runner = ExchangeRunner() if delay > 0 or overlap != "none" else None
        # Elastic groups: an adopted state supersedes the exchanges started before it. Jobs
        # carry the generation they were started in; the exchange thread skips those of a
        # generation <= _superseded (written by either thread, read by the exchange thread).
        self._generation = 0
        self._superseded = -1
        self._known_digest: tuple[int, str] | None = None
        """(outer step, global_hash) of the current state, once computed: the base of rounds."""
        self.joined = self.group.bind(self)  # a running swarm's state, or None
        if self.joined is not None:
            self.adopt_state(self.joined)
        self._sync_buffers()

    # -- θ in model order (checkpoints, init_from, the classic attribute) ---------------
    @property
    def global_params(self) -> torch.Tensor:
        """θ of every fragment, in the model's parameter order (flat fp32, CPU)."""
        if self.num_fragments == 1:
            return self.fragments[0].theta
        return self._model_order([f.theta.detach() for f in self.fragments])

    def _fragment_order(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A model-order flat vector cut into one flat vector per fragment."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.num_fragments)]
        offset = 0
        for p, f in zip(self.params, self._owner):
            parts[f].append(flat[offset:offset + p.numel()])
            offset += p.numel()
        return [torch.cat(x) if x else torch.zeros(0) for x in parts]

    def _model_order(self, per_fragment: list[torch.Tensor]) -> torch.Tensor:
        offsets = [0] * self.num_fragments
        parts = []
        for p, f in zip(self.params, self._owner):
            parts.append(per_fragment[f][offsets[f]:offsets[f] + p.numel()])
            offsets[f] += p.numel()
        return torch.cat(parts)

    @torch.no_grad()
    def _write_model_order(self, flat: torch.Tensor, live: bool) -> None:
        """Copy a model-order flat vector into the live model (live) or into every θ_p."""
        if live:
            offset = 0
            for p in self.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            return
        offsets = [0] * self.num_fragments
        src = 0
        for p, f in zip(self.params, self._owner):
            n = p.numel()
            self.fragments[f].theta[offsets[f]:offsets[f] + n].copy_(flat[src:src + n])
            offsets[f] += n
            src += n

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        if self.buffers and self.group.size > 1:
            self._write_buffers(self.group.average(self._buffers_flat(), _FP32).average)

    def _buffers_flat(self) -> torch.Tensor:
        return torch.cat([b.reshape(-1).to("cpu", torch.float32) for b in self.buffers])

    @torch.no_grad()
    def _write_buffers(self, mean: torch.Tensor) -> None:
        offset = 0
        for b in self.buffers:
            b.copy_(mean[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    @property
    def round_lag(self) -> int:
        """Exchanges started but not yet applied at an outer step (see the module docstring)."""
        return self.num_fragments if self.overlap != "none" else 0

    # -- the public loop ---------------------------------------------------------------
    def step(self) -> SyncStats | None:
        """Count one inner step; start and apply exchanges when the schedule says so."""
        self.inner_step += 1
        self._collect_hash_checks(block=False)
        if self.group.elastic and self.group.processes == 1:
            adopted = self._adopt_early()
            if adopted is not None:
                return adopted
        starting = self._fragment_applied_at(self.inner_step + self.delay)
        if starting is not None:
            self._start_round(starting)
        ending = self._fragment_applied_at(self.inner_step)
        return self._end_round(ending) if ending is not None else None

    def _fragment_applied_at(self, step: int) -> int | None:
        """The fragment p with step ≡ p·H/P (mod H), if any."""
        stride = self.inner_steps // self.num_fragments
        phase = step % self.inner_steps
        return phase // stride if phase % stride == 0 else None

    @torch.no_grad()
    def _start_round(self, f: int) -> None:
        """Snapshot fragment f's pseudo-gradient and put it on the wire."""
        frag = self.fragments[f]
        pseudo_grad = frag.start_point - frag.read_live()
        sent = frag.compensate(pseudo_grad, self.codec)
        buffers = self._buffers_flat() if self.buffers and self.group.size > 1 else None
        named = {}
        if self.group.elastic:  # exchange number = outer step + exchanges in flight
            named["round"] = RoundId(self.outer_step + len(self._rounds), self._digest())

        def exchange():  # runs on the exchange thread (or inline): touches only its inputs
            result = self.group.average(sent, self.codec, **named)
            mean_buffers = self.group.average(buffers, _FP32).average if buffers is not None else None
            return result, mean_buffers

        job = self._job(exchange)
        handle = self._runner.submit(job) if self._runner else run_inline(job)
        frag.last_snapshot_step = self.inner_step
        self._rounds.append(Round(f, self.inner_step, handle, sent, pseudo_grad.norm().item()))

    @torch.no_grad()
    def _end_round(self, f: int) -> SyncStats | None:
        """Fragment f's apply step: outer step(s), then merge the live fragment."""
        frag = self.fragments[f]
        mine = [r for r in self._rounds if r.fragment == f]
        # This round's exchange, snapshotted τ steps ago (absent only if flush() drained it).
        fresh = next((r for r in mine if r.started == self.inner_step - self.delay), None)
        stats = None
        if self.overlap == "none":
            if fresh is not None:
                stats, _ = self._apply(fresh)
        else:
            previous = next((r for r in mine if r is not fresh), None)  # last round's, due now
            average = None
            if previous is not None:
                stats, average = self._apply(previous)
                if stats.adopted:  # the live model restarted from the adopted state
                    return stats
            if frag.eager_theta is not None and fresh is not None:
                # Δ̃ = Δ^(k−1) + (Δ_m^(k) − Δ_m^(k−1)) / M: the fresh own share replaces the stale one.
                # (A round fetched after a join had no own share: the average stands for it.)
                stale_own = previous.sent if previous is not None else None
                if stale_own is None:
                    stale_own = average if previous is not None and torch.isfinite(average).all() \
                        else torch.zeros_like(fresh.sent)
                proxy = (fresh.sent - stale_own) / self.group.size
                if average is not None and torch.isfinite(average).all():
                    proxy += average
                frag.eager_step(proxy)
        frag.merge(self.alpha)
        frag.last_merge_step = self.inner_step
        return stats

    def settle(self) -> SyncStats | None:
        """Elastic groups: wait for the exchanges in flight and adopt the newer state one of
        them handed back, if any (the caller continues at `inner_step`). Checkpoints call it
        first, on every process of the member: the same rounds, so the same outcome."""
        last = None
        while True:  # (the rounds fetched after an adoption may hand back a state again)
            for rnd in list(self._rounds):
                rnd.handle.result()
            stats = self._adopt_early()
            if stats is None:
                return last
            last = stats

    def _adopt_early(self) -> SyncStats | None:
        """Elastic groups: adopt as soon as an exchange hands back a newer state (the rounds
        after it are superseded: applying on schedule would only delay the catch-up). Only
        for a member of one process: whether an exchange is done yet differs between the
        processes of an island, which must adopt at the same step (they do at its apply step,
        or in `settle`)."""
        for rnd in self._rounds:
            if rnd.handle.done():
                outcome = rnd.handle.result()
                if outcome is not None and outcome[0].adopted is not None:
                    return self._apply(rnd)[0]
        return None

    @torch.no_grad()
    def _apply(self, rnd: Round) -> tuple[SyncStats, torch.Tensor]:
        """Wait for a round's exchange and apply the average to its fragment's θ."""
        outcome = rnd.handle.result()
        if outcome is None:  # an earlier round adopted a state, which drops the rounds after it
            raise RuntimeError("internal error: a superseded exchange reached its apply step")
        result, mean_buffers, seconds = outcome
        with self._state_lock:  # (export_state reads the outer step and the rounds in flight together)
            self._rounds = [r for r in self._rounds if r is not rnd]
        frag = self.fragments[rnd.fragment]
        adopted = result.adopted is not None
        if adopted:
            # An elastic group went on without this worker (it was too late or behind):
            # its Δ is lost and it continues from the group's newer state.
            self.adopt_state(result.adopted)
        elif not torch.isfinite(result.average).all():
            # Every contributor of some chunk was non-finite; skipping keeps θ finite on
            # every worker alike (the average is identical everywhere).
            log.warning("outer step %d (fragment %d): averaged pseudo-gradient is not finite; "
                        "step skipped", self.outer_step + 1, rnd.fragment)
            with self._state_lock:
                self.outer_step += 1
        else:
            with self._state_lock:
                frag.outer_step(result.average)
                self.outer_step += 1
        if mean_buffers is not None:
            self._write_buffers(mean_buffers)
        digest = self.global_hash()
        self._known_digest = (self.outer_step, digest)
        if self._check_hash(digest):
            adopted = True
            digest = self._digest()
        exposed = min(rnd.handle.exposed_seconds, seconds)
        stats = SyncStats(
            outer_step=self.outer_step, seconds=seconds, bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received, num_peers=result.num_peers, global_hash=digest,
            dropped=result.dropped, codec_error=result.codec_error,
            pseudo_grad_norm=rnd.pseudo_grad_norm, fragment=rnd.fragment,
            seconds_exposed=exposed, seconds_hidden=seconds - exposed,
            intra_bytes=result.intra_bytes, adopted=adopted)
        return stats, result.average

    def flush(self) -> list[SyncStats]:
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
                self._start_round(frag.index)
        if self._drain(stats):
            return stats
        for frag in self.fragments:
            frag.write_live(frag.theta.detach())
            frag.reset_eager()
            frag.last_merge_step = frag.last_snapshot_step = self.inner_step
        self._collect_hash_checks(block=True)
        return stats

    def _drain(self, stats: list[SyncStats]) -> bool:
        """Apply every round in flight, in order; True if one adopted a state (behind the
        swarm: the caller trains on from there)."""
        while self._rounds:
            stats.append(self._apply(self._rounds[0])[0])
            if stats[-1].adopted:
                return True
        return False

    def sync(self) -> SyncStats | None:
        """`flush()`, returning the last outer step's stats (None if there was nothing to send)."""
        stats = self.flush()
        return stats[-1] if stats else None

    # -- replicas must agree -----------------------------------------------------------
    def _check_hash(self, digest: str) -> bool:
        """`Group.confirm` this outer step's digest; True if the majority's state was adopted.

        A fixed group raises DivergenceError on a mismatch. With exchanges in the background
        the check is a collective too: it queues behind them on the exchange thread (see
        dilo/overlap.py) and its outcome is collected at a later step.
        """
        if not self.check_hashes:  # (a one-worker island still compares its ranks: no size shortcut)
            return False
        step = self.outer_step
        if self._runner is not None and not self.group.elastic:
            self._hash_checks.append(((step, digest), self._runner.submit(lambda: self.group.confirm(step, digest))))
            return False
        repaired = self.group.confirm(step, digest)
        if repaired is None:
            return False
        log.warning("outer step %d: this worker's global state differs from the group's majority; "
                    "adopting the majority's state", step)
        self.adopt_state(repaired)
        return True

    def _collect_hash_checks(self, block: bool) -> None:
        while self._hash_checks and (block or self._hash_checks[0][1].done()):
            (step, digest), handle = self._hash_checks.pop(0)
            if handle.result() is not None:  # only elastic groups repair, and they confirm inline
                raise DivergenceError(f"global state diverged at outer step {step} ({digest[:12]})")

    # -- identity and persistence ------------------------------------------------------
    def momentum(self) -> torch.Tensor | None:
        """Outer momentum in model order (zeros for fragments not stepped yet), or None."""
        momenta = [f.momentum() for f in self.fragments]
        if all(m is None for m in momenta):
            return None
        return self._model_order([m if m is not None else torch.zeros(f.numel)
                                  for m, f in zip(momenta, self.fragments)])

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """θ and the outer momentum (once one exists) in model order."""
        tensors = {"params": self.global_params.detach()}
        momentum = self.momentum()
        if momentum is not None:
            tensors["momentum"] = momentum
        return tensors

    def global_hash(self) -> str:
        """Hex digest over θ, the outer momentum (both in model order) and the outer step."""
        return state_digest(list(self._state_tensors().values()), self.outer_step)

    def _digest(self) -> str:
        """`global_hash()` of the current state, computed once per state."""
        if self._known_digest is None or self._known_digest[0] != self.outer_step:
            self._known_digest = (self.outer_step, self.global_hash())
        return self._known_digest[1]

    def export_state(self) -> GlobalState:
        """A consistent copy of θ, the outer momentum and the outer step (any thread)."""
        with self._state_lock:
            return GlobalState(self.outer_step, {k: v.clone() for k, v in self._state_tensors().items()},
                               in_flight=len(self._rounds))

    @torch.no_grad()
    def adopt_state(self, state: GlobalState) -> None:
        """Continue from another member's global state (a join, or a repair).

        Worker-local extras restart from it: the live model ← θ, error-feedback residuals
        zero, eager copies ← θ. No own exchange is in flight: those started from the old
        state are superseded; with overlap the n = min(P, state.in_flight) rounds in flight
        at state s (P, except at the start and the end of the run) are fetched from the
        members that run them, and this worker's own rounds start at s + n.
        """
        params = state.tensors["params"]
        if params.shape != (self.numel,) or params.dtype != torch.float32:
            raise ValueError(f"received global state holds {params.numel()} {params.dtype} parameters, "
                             f"this model has {self.numel} fp32: model settings differ")
        momenta = self._fragment_order(state.tensors["momentum"]) if "momentum" in state.tensors else None
        stride = self.inner_steps // self.num_fragments
        with self._state_lock:
            self._write_model_order(params, live=False)
            self.outer_step = state.outer_step
            missed = min(self.round_lag, state.in_flight)
            self.inner_step = (state.outer_step + missed) * stride
            for i, frag in enumerate(self.fragments):
                frag.outer.state.clear()
                if momenta is not None:
                    frag.outer.state[frag.theta]["momentum_buffer"] = momenta[i].clone()
                frag.restart_local(self.inner_step)
            self._superseded = max(self._superseded, self._generation)
            self._generation += 1
            self._rounds = [self._fetch_round(n) for n in range(state.outer_step, state.outer_step + missed)]
            self._known_digest = None
        self._write_model_order(params, live=True)

    def _fetch_round(self, number: int) -> Round:
        """A round this worker missed (it was in flight when the worker adopted a state):
        its result comes from the members that ran it, on the exchange thread, in order."""
        stride = self.inner_steps // self.num_fragments
        apply_step = (number + 1 + self.round_lag) * stride  # exchange t is applied as outer step t + 1
        job = self._job(lambda: (self.group.round_result(number), None))
        return Round(self._fragment_applied_at(apply_step), apply_step - self.round_lag * stride - self.delay,
                     self._runner.submit(job), None, 0.0)

    def _job(self, call: Callable[[], tuple]) -> Callable[[], tuple | None]:
        """`call` (an exchange: (result, mean buffers)) as a job of the current generation,
        timed: skipped (None) once a state adopted since supersedes it; if it hands back a
        state itself, the later jobs of its generation are superseded."""
        generation = self._generation

        def job():
            if self._superseded >= generation:
                return None
            start = time.perf_counter()
            result, mean_buffers = call()
            if result.adopted is not None:
                self._superseded = max(self._superseded, generation)
            return result, mean_buffers, time.perf_counter() - start

        return job

    def _settings(self) -> dict:
        return {"fragments": self.num_fragments, "delay": self.delay, "alpha": self.alpha,
                "overlap": self.overlap, "error_feedback": self.error_feedback}

    def state_dict(self) -> dict:
        """Everything to continue exactly. Waits for exchanges in flight (their results are
        saved, to be applied at their scheduled step), so a checkpoint never holds a guess."""
        for rnd in self._rounds:
            rnd.handle.result()
        self._collect_hash_checks(block=True)
        state = {
            "global_params": self.global_params.detach().clone(),
            "fragments": [f.state_dict() for f in self.fragments],
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "inner_step": self.inner_step,
            "outer_step": self.outer_step,
            "settings": self._settings(),
            "rounds": [round_state(r) for r in self._rounds],
        }
        live = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])
        if not torch.equal(live, state["global_params"]):
            state["live_params"] = live
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        flat = state["global_params"]
        if flat.shape != (self.numel,):
            raise ValueError(f"checkpoint holds {flat.numel()} synchronized parameters, "
                             f"this model has {self.numel}: model settings differ")
        if state["settings"] != self._settings():
            raise ValueError(f"checkpoint was written with outer/comm settings {state['settings']}, "
                             f"this run has {self._settings()}; resume with the run's original config")
        own = state.get("inner_optimizer") is not None  # None: a new slot or another world's file
        with self._state_lock:
            self._write_model_order(flat, live=False)
            for frag, frag_state in zip(self.fragments, state["fragments"]):
                frag.load_state_dict(frag_state)
            self.inner_step = int(state["inner_step"])
            self.outer_step = int(state["outer_step"])
            self._rounds = [round_from_state(r) for r in state["rounds"]]
        if own:
            self.inner_optimizer.load_state_dict(state["inner_optimizer"])
            self._write_model_order(state.get("live_params", flat), live=True)
        else:
            # The global part came from another worker: its worker-local extras are not ours.
            # Start fresh from θ (rounds in flight stay: their averages are everyone's).
            for frag in self.fragments:
                frag.restart_local()
            self._write_model_order(flat, live=True)

    @torch.no_grad()
    def load_global_params(self, flat: torch.Tensor) -> None:
        """Start from another run's global weights (no optimizer state, counters at 0)."""
        if flat.shape != (self.numel,):
            raise ValueError(f"checkpoint holds {flat.numel()} synchronized parameters, "
                             f"this model has {self.numel}: model settings differ")
        self._write_model_order(flat, live=False)
        self._write_model_order(flat, live=True)
        for frag in self.fragments:
            frag.reset_eager()

    def close(self) -> None:
        """Stop the exchange thread (after `flush()`; a hung collective is not waited for)."""
        if self._runner is not None:
            self._runner.close()


def _check_options(inner_steps: int, fragments: int, delay: int, alpha: float, overlap: str,
                   error_feedback: bool, codec: Codec) -> None:
    if inner_steps < 1:
        raise ValueError(f"inner_steps (H) must be >= 1, got {inner_steps}")
    if fragments < 1 or inner_steps % fragments:
        raise ValueError(f"fragments (P) must be >= 1 and divide inner_steps (H = {inner_steps}), "
                         f"got {fragments}")
    if not 0 <= delay < inner_steps // fragments:
        raise ValueError(f"delay (τ) must be in [0, inner_steps / fragments) = "
                         f"[0, {inner_steps // fragments}), got {delay}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}")
    if error_feedback and codec.lossless:
        raise ValueError(f"error_feedback needs a lossy codec; {codec.name} is exact")
