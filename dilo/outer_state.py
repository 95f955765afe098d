"""What DiLoCo's outer loop holds between calls, and what other parts do with it.

`OuterState` holds the fragments (θ_p, outer momenta, worker-local extras), the counters
`inner_step` / `outer_step` and the rounds in flight (dilo/in_flight.py). Its methods
serve everything but the loop itself: a consistent snapshot for a swarm serving a
joining peer (`export_state`, from the backend's thread), continuing from another
member's state (`adopt_state`), the global hash, checkpoints and `init_from`. `DiLoCo`
(dilo/diloco.py) is an `OuterState` plus the loop that changes it.

Threading: θ, the outer momenta, `outer_step` and the rounds in flight change only under
`_state_lock` (on the training thread), so `export_state` — called from a backend's own
thread — never sees an outer step without its θ, or a round count of another step.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn as nn

from dilo import codec_kernels
from dilo.aggregate import NO_CONTRIBUTION
from dilo.comm.protocol import ExchangeResult, GlobalState
from dilo.fragments import Fragment, Schedule
from dilo.global_hash import BackgroundDigest, GlobalHash
from dilo.global_layout import FragmentLayout, GlobalCopy, flatten_fp32, write_flat
from dilo.in_flight import Round, RoundsInFlight
from dilo.stats import SyncStats

log = logging.getLogger("dilo")


class OuterState(GlobalHash):
    """θ, the outer momenta, the counters and the rounds in flight (see the module docstring)."""

    def __init__(self, params: list[nn.Parameter], fragments: list[Fragment], owner: list[int],
                 inner_optimizer: torch.optim.Optimizer, schedule: Schedule, in_flight: RoundsInFlight,
                 settings: dict):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.fragments = fragments
        self.global_copy = GlobalCopy(fragments, FragmentLayout(params, owner, len(fragments)))
        self.inner_optimizer = inner_optimizer
        self.schedule = schedule
        self.in_flight = in_flight
        self.settings = settings
        """The options a checkpoint must have been written with (`load_state_dict` checks)."""
        self.inner_step = 0
        self.outer_step = 0
        # θ, the outer momenta and the step change only under this lock, so a backend of open
        # membership can snapshot them from its own thread (to serve a joining peer).
        self._state_lock = threading.Lock()
        self._known_digest: tuple[int, str] | None = None
        """(outer step, global_hash) of the current state, once computed: the base of rounds."""
        self.background_digest: BackgroundDigest | None = None
        """Set with outer.digest = background: states are hashed on a thread (dilo/global_hash.py)."""
        self._withheld = self._resets = 0  # since the last SyncStats (issue 13)

    @property
    def global_params(self) -> torch.Tensor:
        """θ of every fragment, in the model's parameter order (flat fp32, CPU)."""
        return self.global_copy.params

    @property
    def round_lag(self) -> int:
        """Exchanges started but not yet applied at an outer step (dilo/in_flight.py)."""
        return self.schedule.round_lag

    def momentum(self) -> torch.Tensor | None:
        """Outer momentum in model order (zeros for fragments not stepped yet), or None."""
        return self.global_copy.momentum()

    def state_bytes(self) -> int:
        """Host bytes of this process's outer state: θ, the outer momentum, error-feedback
        residuals and eager copies of every fragment (÷ S per rank with run.shard = fsdp)."""
        held = [t for f in self.fragments for t in (f.theta, f.momentum(), f.residual, f.eager_theta)]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def _withhold(self, f: int, sent: torch.Tensor, why: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(wire, sent) for fragment f's Δ + e that cannot be sent (`why`): the no-contribution
        marker (dilo/aggregate.py) and zeros; a residual kept would poison the next Δ + e: reset."""
        frag = self.fragments[f]
        log.warning("outer step %d (fragment %d): this worker's pseudo-gradient%s is %s; sending no "
                    "contribution", self.outer_step + len(self.in_flight) + 1, f,
                    " (with its error-feedback residual)" if frag.residual is not None else "", why)
        self._withheld += 1
        if frag.residual is not None:
            log.warning("fragment %d: error-feedback residual reset to zero (%s)", f,
                        "non-finite" if not torch.isfinite(frag.residual).all() else "its Δ + e was withheld")
            frag.residual.zero_()
            self._resets += 1
        return torch.full_like(sent, NO_CONTRIBUTION), torch.zeros_like(sent)

    # -- one outer step ----------------------------------------------------------------
    @torch.no_grad()
    def _outer_step(self, f: int, result: ExchangeResult, write_live: bool, owner_feedback: bool,
                    hook=None) -> tuple[int, tuple[int, int], bool]:
        """Fragment f's outer step with a round's average: (1 if skipped, the hook's bytes,
        whether θ_p was also written into the live model; `write_live`, dilo/outer_sgd.py)."""
        if result.encoded is not None and (result.finite is None or hook is not None):
            result.decoded_average()  # (only the plain step reads the bytes themselves)
        finite = result.finite if result.finite is not None else codec_kernels.all_finite(result.average)
        if not finite:
            # Every contributor of some chunk was non-finite; skipping keeps θ finite on
            # every worker alike (the average is identical everywhere).
            # outer_step still advances (round numbers, schedules and checkpoints stay aligned).
            log.warning("outer step %d (fragment %d): no valid contribution arrived for part of the "
                        "pseudo-gradient; step skipped (θ and momentum unchanged)", self.outer_step + 1, f)
            with self._state_lock:
                self.outer_step += 1
            return 1, (0, 0), False
        frag = self.fragments[f]
        before = frag.theta.detach().clone() if hook is not None else None
        with self._state_lock:
            written = frag.apply_outer_step(result.average, write_live, result.encoded)
            self.outer_step += 1
        if owner_feedback and frag.residual is not None and result.owner_error is not None:  # two-phase
            frag.feed_back_owner_error(*result.owner_error, result.num_peers)
        return 0, hook(before, frag.theta.detach()) if hook is not None else (0, 0), written

    def _sync_stats(self, rnd: Round, result: ExchangeResult, seconds: float, digest: tuple[str, int], adopted: bool,
                    skipped: int, hook_bytes: tuple[int, int], timings: tuple[float, float],
                    rounds: dict) -> SyncStats:
        """The applied round's record (dilo/stats.py); `timings`: apply and digest seconds;
        `rounds`: `round_fields` of its reports. The withheld/reset counters restart."""
        exposed = min(rnd.handle.exposed_seconds, seconds)
        stats = SyncStats(
            outer_step=self.outer_step, seconds=seconds, bytes_sent=result.bytes_sent + hook_bytes[0],
            bytes_received=result.bytes_received + hook_bytes[1], num_peers=result.num_peers,
            global_hash=digest[0], hash_step=digest[1], dropped=result.dropped, codec_error=result.codec_error,
            pseudo_grad_norm=rnd.pseudo_grad_norm, fragment=rnd.fragment,
            seconds_exposed=exposed, seconds_hidden=seconds - exposed,
            intra_bytes=result.intra_bytes, adopted=adopted, apply_seconds=timings[0], digest_seconds=timings[1],
            skipped=skipped, clipped=len(result.clipped), reset_residuals=self._resets,
            withheld=self._withheld, rejected=result.rejected, clipped_members=result.clipped,
            outer_state_bytes=self.state_bytes(), **rounds)
        self._withheld = self._resets = 0
        return stats

    def export_state(self) -> GlobalState:
        """A consistent copy of θ, the outer momentum and the outer step (any thread)."""
        with self._state_lock:
            return GlobalState(self.outer_step, {k: v.clone() for k, v in self.global_copy.tensors().items()},
                               in_flight=len(self.in_flight))

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
        self._forget_digest()
        with self._state_lock:
            self.global_copy.write(state.tensors)
            self.outer_step = state.outer_step
            missed = self.in_flight.restart_from(state.outer_step, state.in_flight, self.schedule)
            self.inner_step = (state.outer_step + missed) * self.schedule.stride
            for frag in self.fragments:
                frag.restart_local(self.inner_step)
            self._known_digest = None
        write_flat(self.params, params)

    # -- persistence ---------------------------------------------------------------------
    def _check_numel(self, flat: torch.Tensor) -> None:
        if flat.shape != (self.numel,):
            raise ValueError(f"checkpoint holds {flat.numel()} synchronized parameters, "
                             f"this model has {self.numel}: model settings differ")

    def state_dict(self) -> dict:
        """Everything to continue exactly. Waits for exchanges in flight (their results are
        saved, to be applied at their scheduled step), so a checkpoint never holds a guess."""
        self.in_flight.wait()
        self.in_flight.collect_hash_checks(block=True)
        state = {
            "global_params": self.global_params.detach().clone(),
            "fragments": [f.state_dict() for f in self.fragments],
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "inner_step": self.inner_step,
            "outer_step": self.outer_step,
            "settings": dict(self.settings),
            "rounds": self.in_flight.state(),
        }
        live = flatten_fp32(self.params)
        if not torch.equal(live, state["global_params"]):
            state["live_params"] = live
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        flat = state["global_params"]
        self._check_numel(flat)
        if state["settings"] != self.settings:
            raise ValueError(f"checkpoint was written with outer/comm settings {state['settings']}, "
                             f"this run has {self.settings}; resume with the run's original config")
        own = state.get("inner_optimizer") is not None  # None: a new slot or another world's file
        self._forget_digest()
        with self._state_lock:
            self.global_copy.write_params(flat)
            for frag, frag_state in zip(self.fragments, state["fragments"]):
                frag.load_state_dict(frag_state)
            self.inner_step = int(state["inner_step"])
            self.outer_step = int(state["outer_step"])
            self.in_flight.load_state(state["rounds"])
        if own:
            self.inner_optimizer.load_state_dict(state["inner_optimizer"])
            write_flat(self.params, state.get("live_params", flat))
        else:
            # The global part came from another worker: its worker-local extras are not ours.
            # Start fresh from θ (rounds in flight stay: their averages are everyone's).
            for frag in self.fragments:
                frag.restart_local()
            write_flat(self.params, flat)

    @torch.no_grad()
    def load_global_params(self, flat: torch.Tensor) -> None:
        """Start from another run's global weights (no optimizer state, counters at 0)."""
        self._check_numel(flat)
        self._forget_digest()
        self.global_copy.write_params(flat)
        write_flat(self.params, flat)
        for frag in self.fragments:
            frag.reset_eager()
