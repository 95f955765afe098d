"""A worker's checkpointable state: counters, data position, model, optimizers, totals, RNG.

`state_dict()` is everything needed to continue exactly; `resume.WORKER_KEYS` and the
inner optimizer are this worker's own, the rest is the same on every worker of the world
(docs/design.md, invariants). The trainer owns one `WorkerState` and advances
`inner_step`; DiLoCo owns θ, the outer momentum and `outer_step`.
"""

from __future__ import annotations

import hashlib
import logging
import random

import torch
import torch.nn as nn

from dilo import checkpoint
from dilo.config import Config, shared_settings_diff, shared_settings_of
from dilo.data import ShardedBatches
from dilo.diloco import DiLoCo
from dilo.global_layout import flatten_fp32
from dilo.lora import with_base
from dilo.model_build import frozen_tensors
from dilo.stats import RunTotals

log = logging.getLogger("dilo")

_SHAPE_KEYS = ("vocab_size", "seq_len", "d_model", "n_layers")
"""The model.* keys that set parameter shapes (for files that lack `param_shapes`)."""


def params_hash(model: nn.Module, step: int) -> str:
    """Global hash for data-parallel mode: the (replicated) parameters and the step."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to("cpu", torch.float32).numpy().tobytes())
    h.update(step.to_bytes(8, "little"))
    return h.hexdigest()


class WorkerState:
    def __init__(self, cfg: Config, worker: int | str, num_workers: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer, batches: ShardedBatches, diloco: DiLoCo | None):
        self.cfg, self.worker, self.num_workers = cfg, worker, num_workers
        self.model, self.optimizer, self.batches, self.diloco = model, optimizer, batches, diloco
        self.inner_step = 0
        self.totals = RunTotals()
        self.record_boundary()

    @property
    def outer_step(self) -> int:
        return self.diloco.outer_step if self.diloco else self.inner_step // self.cfg.outer.inner_steps

    def global_hash(self) -> str:
        if not self.diloco:
            return params_hash(self.model, self.inner_step)
        if self.cfg.model.lora_rank:  # the frozen base is global state too (docs/adapters.md)
            return with_base(self.diloco.global_hash(), self.model_rest())
        return self.diloco.global_hash()

    def model_rest(self) -> dict:
        """The model's tensors outside θ (buffers; an adapter run's frozen base)."""
        return frozen_tensors(self.model, self.diloco.params)

    def record_boundary(self) -> None:
        """Remember the counters of the last completed outer step (for a failure's save)."""
        self.boundary = {"step": self.inner_step, "data": self.batches.state_dict(),
                         "outer_step": self.outer_step,
                         "inner_step": self.diloco.inner_step if self.diloco else self.inner_step}

    def failure_boundary(self) -> dict:
        """The boundary whose state this worker holds after a failed exchange: the last one,
        or the current one if the failure came after the outer step (resume.save_after_failure)."""
        if self.outer_step == self.boundary["outer_step"]:
            return self.boundary
        return {"step": self.inner_step, "data": self.batches.state_dict(),
                "inner_step": self.diloco.inner_step}

    def state_dict(self) -> dict:
        state = {
            "fingerprint": self.cfg.fingerprint(),
            "config": self.cfg.to_dict(),
            "num_workers": self.num_workers,
            "worker_size": self.cfg.run.worker_size,
            "worker": self.worker,
            "exact": True,
            "step": self.inner_step,
            "outer_step": self.outer_step,
            "data": self.batches.state_dict(),
            "global_hash": self.global_hash(),
            "totals": self.totals.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        if self.diloco:
            state["param_shapes"] = self.synced_shapes()
            state["diloco"] = self.diloco.state_dict()
            state["model_rest"] = self.model_rest()
        else:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict, source: str, exact: bool = True) -> None:
        """Load a checkpoint; `exact=False` takes one merged by resume.merge (a changed world)."""
        if state["fingerprint"] != self.cfg.fingerprint():
            differ = shared_settings_diff(shared_settings_of(state["config"]), self.cfg.shared_settings())
            raise ValueError(f"{source} was written with other settings: {'; '.join(differ)}; "
                             "resume with the run's original config, or choose another run.dir")
        if exact and state["num_workers"] != self.num_workers:
            raise ValueError(f"{source} was written by {state['num_workers']} workers, this run has "
                             f"{self.num_workers}; an exact resume needs the same number of workers")
        worker_size = self.cfg.run.worker_size
        if state.get("worker_size", 1) != worker_size:
            raise ValueError(f"{source} was written with run.worker_size = {state.get('worker_size', 1)}, "
                             f"this run has {worker_size}; an exact resume needs the same worker size")
        self.inner_step = int(state["step"])
        self.batches.load_state_dict(state["data"])
        if state.get("totals"):
            self.totals.load(state["totals"])
        if state.get("rng"):
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
        else:  # a worker slot new to this run: its own streams, reproducible
            torch.manual_seed(hash((self.cfg.run.seed, self.worker, self.inner_step)) & 0xFFFFFFFF)
            random.seed(hash((self.cfg.run.seed, self.worker, self.inner_step)))
        if self.diloco:
            self.model.load_state_dict({k: v for k, v in state["model_rest"].items()}, strict=False)
            self.diloco.load_state_dict(state["diloco"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.global_hash() != state["global_hash"]:
            raise checkpoint.CheckpointError(f"{source}: the loaded global state does not hash to "
                                             "the value recorded when it was saved")
        self.record_boundary()

    def synced_shapes(self) -> list[tuple[str, list[int]]]:
        """(name, shape) of the parameters DiLoCo synchronises, in θ's order."""
        return [(n, list(p.shape)) for n, p in self.model.named_parameters() if p.requires_grad]

    def init_from(self, where: str) -> None:
        """`checkpoint.init_from`: a new run from a checkpoint's global weights only.

        The checkpoint's parameter names and shapes must be this model's (a ValueError
        lists the missing, unexpected and reshaped ones), checked before anything is loaded.
        """
        path = checkpoint.resolve_init_from(where)
        state = checkpoint.read_verified(path)
        if "diloco" in state:
            if not self.diloco:
                raise ValueError("checkpoint.init_from from a DiLoCo run needs run.mode = diloco")
            _refuse_other_params(path, self._stored_shapes(path, state), self.synced_shapes())
            self.diloco.load_global_params(state["diloco"]["global_params"])
        else:
            here = [(n, list(t.shape)) for n, t in self.model.state_dict().items()]
            _refuse_other_params(path, [(n, list(t.shape)) for n, t in state["model"].items()], here)
            self.model.load_state_dict(state["model"])
            if self.diloco:  # a data-parallel run's weights become θ too
                self.diloco.load_global_params(flatten_fp32(self.diloco.params))
        log.info("initialised weights from %s (new run: fresh optimizers, schedule, data)", path)

    def _stored_shapes(self, path, state: dict) -> list[tuple[str, list[int]]]:
        """The checkpoint's (name, shape) list; a file written before dilo recorded them gives
        this model's list if its shape settings are this run's, else it names those that differ."""
        if "param_shapes" in state:
            return [(n, list(shape)) for n, shape in state["param_shapes"]]
        stored, here = state["config"].get("model", {}), self.cfg.to_dict()["model"]
        differ = [f"model.{k} = {stored.get(k)!r} (now {here[k]!r})" for k in _SHAPE_KEYS if stored.get(k) != here[k]]
        if differ:
            raise ValueError(f"checkpoint.init_from={path} does not fit this model: it was written with "
                             f"{'; '.join(differ)}; use the same model.* settings")
        return self.synced_shapes()


def _refuse_other_params(path, stored: list[tuple[str, list[int]]], here: list[tuple[str, list[int]]]) -> None:
    """ValueError naming every parameter missing from the checkpoint, unexpected in it, or of
    another shape (`stored` is the checkpoint's (name, shape) list, `here` this model's)."""
    old, new = dict(stored), dict(here)
    missing = [n for n in new if n not in old]
    unexpected = [n for n in old if n not in new]
    reshaped = [f"{n} {tuple(old[n])} vs {tuple(new[n])}" for n in new if n in old and old[n] != new[n]]
    if [n for n, _ in stored] != [n for n, _ in here] and not (missing or unexpected or reshaped):
        reshaped.append("the same parameters in another order")
    problems = [f"{label} ({len(items)}): {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
                for label, items in (("missing from the checkpoint", missing),
                                     ("unexpected in the checkpoint", unexpected),
                                     ("shape in the checkpoint vs this model", reshaped)) if items]
    if problems:
        raise ValueError(f"checkpoint.init_from={path} does not fit this model: {'; '.join(problems)}; "
                         "set the model.* keys of the run that wrote it")
