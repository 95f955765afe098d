"""DiLoCo: the outer loop around any model and inner optimizer.

Per worker, outer step t (θ is the global copy, identical on every worker):

1. the live model starts from θ (the inner optimizer's state is kept, not reset);
2. H inner steps of the user's optimizer on the worker's own data → θ_m';
3. pseudo-gradient Δ_m = θ − θ_m';
4. Δ = mean over the workers of Δ_m, exchanged through a `Group` with a codec;
5. outer step on θ with Δ as its gradient: `torch.optim.SGD(nesterov=True)`.

θ and the outer momentum live on the CPU in fp32, whatever the model's device and
dtype, so DiLoCo costs no accelerator memory. Only parameters with `requires_grad`
are synchronized; floating-point buffers are averaged exactly (fp32) at outer steps.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from dilo.codecs import Codec, get_codec
from dilo.comm.protocol import GlobalState, Group, SoloGroup, state_digest

log = logging.getLogger("dilo")


@dataclass
class SyncStats:
    """What one outer step did; the training loop logs it."""

    outer_step: int
    seconds: float
    bytes_sent: int
    bytes_received: int
    num_peers: int
    global_hash: str
    dropped: int
    codec_error: float
    pseudo_grad_norm: float
    intra_bytes: int = 0
    adopted: bool = False
    """True when this worker took the group's newer state instead of applying a round."""


def default_group() -> Group:
    """The default torch.distributed process group if one is initialised, else a lone worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from dilo.comm.torch_dist import TorchGroup

        return TorchGroup()
    return SoloGroup()


class DiLoCo:
    """Wraps a model and its inner optimizer; call `step()` after every inner step.

    Every `inner_steps` calls it synchronises: afterwards the model's trainable
    parameters equal the new global parameters, bit-identical on every worker.
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
    ):
        if inner_steps < 1:
            raise ValueError(f"inner_steps (H) must be >= 1, got {inner_steps}")
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.codec = get_codec(codec, block_size) if isinstance(codec, str) else codec
        self.group = group if group is not None else default_group()
        self.check_hashes = check_hashes
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("DiLoCo needs at least one parameter with requires_grad=True")
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        if self.buffers and self.group.elastic:
            raise ValueError("the hivemind backend does not synchronize floating-point buffers yet; "
                             "use a model without them or comm.backend = torch")
        self.numel = sum(p.numel() for p in self.params)
        # θ, the outer momentum and the step change only under this lock, so an elastic
        # backend can snapshot them from its own thread (to serve a joining peer).
        self._state_lock = threading.Lock()
        with torch.no_grad():
            flat = self._model_flat()
            if not self.group.elastic:
                self.group.broadcast(flat, src=0)  # every worker starts from the same θ
            self.global_params = nn.Parameter(flat, requires_grad=False)
        self.outer_optimizer = torch.optim.SGD(
            [self.global_params], lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)
        self.inner_step = 0
        self.outer_step = 0
        self.joined = self.group.bind(self)  # a running swarm's state, or None
        if self.joined is not None:
            self.adopt_state(self.joined)
        self._copy_global_to_model()
        self._sync_buffers()

    # -- the two directions between the live model and θ ------------------------------
    def _model_flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])

    @torch.no_grad()
    def _copy_global_to_model(self) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(self.global_params[offset:offset + n].view_as(p))
            offset += n

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        if not self.buffers or self.group.size == 1:
            return
        flat = torch.cat([b.reshape(-1).to("cpu", torch.float32) for b in self.buffers])
        mean = self.group.average(flat, get_codec("fp32")).average
        offset = 0
        for b in self.buffers:
            b.copy_(mean[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    # -- the public loop ---------------------------------------------------------------
    def step(self) -> SyncStats | None:
        """Count one inner step; at every multiple of H run the outer step."""
        self.inner_step += 1
        if self.inner_step % self.inner_steps == 0:
            return self.sync()
        return None

    @torch.no_grad()
    def sync(self) -> SyncStats:
        """Exchange pseudo-gradients and apply one outer step (all workers call it together)."""
        start = time.perf_counter()
        pseudo_grad = self.global_params.detach() - self._model_flat()
        result = self.group.average(pseudo_grad, self.codec)
        adopted = result.adopted is not None
        if adopted:
            # An elastic group went on without this worker (it was too late or behind):
            # its Δ is lost and it continues from the group's newer state.
            self.adopt_state(result.adopted)
        elif not torch.isfinite(result.average).all():
            # Every contributor of some chunk was non-finite; skipping keeps θ finite on
            # every worker alike (the average is identical everywhere).
            log.warning("outer step %d: averaged pseudo-gradient is not finite; step skipped",
                        self.outer_step + 1)
            with self._state_lock:
                self.outer_step += 1
        else:
            with self._state_lock:
                self.global_params.grad = result.average
                self.outer_optimizer.step()
                self.global_params.grad = None
                self.outer_step += 1
        self._copy_global_to_model()
        self._sync_buffers()
        digest = self.global_hash()
        if self.check_hashes:
            repaired = self.group.confirm(self.outer_step, digest)
            if repaired is not None:
                log.warning("outer step %d: this worker's global state differs from the group's "
                            "majority; adopting the majority's state", self.outer_step)
                self.adopt_state(repaired)
                adopted = True
                digest = self.global_hash()
        return SyncStats(
            outer_step=self.outer_step,
            seconds=time.perf_counter() - start,
            bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received,
            num_peers=result.num_peers,
            global_hash=digest,
            dropped=result.dropped,
            codec_error=result.codec_error,
            pseudo_grad_norm=pseudo_grad.norm().item(),
            intra_bytes=result.intra_bytes,
            adopted=adopted,
        )

    # -- identity and persistence ------------------------------------------------------
    def momentum(self) -> torch.Tensor | None:
        return self.outer_optimizer.state.get(self.global_params, {}).get("momentum_buffer")

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"params": self.global_params.detach()}
        momentum = self.momentum()
        if momentum is not None:
            tensors["momentum"] = momentum
        return tensors

    def global_hash(self) -> str:
        """Hex digest over θ, the outer momentum and the outer step."""
        return state_digest(list(self._state_tensors().values()), self.outer_step)

    def export_state(self) -> GlobalState:
        """A consistent copy of θ, the outer momentum and the outer step (any thread)."""
        with self._state_lock:
            return GlobalState(self.outer_step, {k: v.clone() for k, v in self._state_tensors().items()})

    @torch.no_grad()
    def adopt_state(self, state: GlobalState) -> None:
        """Continue from another member's global state (a join, or a repair)."""
        params = state.tensors["params"]
        if params.shape != self.global_params.shape or params.dtype != torch.float32:
            raise ValueError(f"received global state holds {params.numel()} {params.dtype} parameters, "
                             f"this model has {self.numel} fp32: model settings differ")
        with self._state_lock:
            self.global_params.copy_(params)
            self.outer_optimizer.state.clear()
            if "momentum" in state.tensors:
                self.outer_optimizer.state[self.global_params]["momentum_buffer"] = \
                    state.tensors["momentum"].clone()
            self.outer_step = state.outer_step
            self.inner_step = state.outer_step * self.inner_steps
        self._copy_global_to_model()

    def state_dict(self) -> dict:
        return {
            "global_params": self.global_params.detach().clone(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "inner_step": self.inner_step,
            "outer_step": self.outer_step,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        flat = state["global_params"]
        if flat.shape != self.global_params.shape:
            raise ValueError(f"checkpoint holds {flat.numel()} synchronized parameters, "
                             f"this model has {self.numel}: model settings differ")
        with self._state_lock:
            self.global_params.copy_(flat)
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
            self.inner_step = int(state["inner_step"])
            self.outer_step = int(state["outer_step"])
        if state.get("inner_optimizer") is not None:  # None: a new slot starts with fresh moments
            self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        self._copy_global_to_model()

    @torch.no_grad()
    def load_global_params(self, flat: torch.Tensor) -> None:
        """Start from another run's global weights (no optimizer state, counters at 0)."""
        if flat.shape != self.global_params.shape:
            raise ValueError(f"checkpoint holds {flat.numel()} synchronized parameters, "
                             f"this model has {self.numel}: model settings differ")
        with self._state_lock:
            self.global_params.copy_(flat)
        self._copy_global_to_model()
