"""Resuming after a restart: the same world exactly, a changed world elastically.

Under torchrun's elastic agents (`--nnodes MIN:MAX --max-restarts R`) every worker
process is restarted when one fails or when nodes join or leave, and the new processes
start with `checkpoint.resume auto`. Nothing survives in memory across that restart, so
the newest consistent state is found on the members' disks and shared over the network:

1. survey (`survey`): every rank verifies (magic, length, sha256) the files it answers
   for: its own slot `worker-<rank>.pt` in every step folder, plus the files of departed
   slots (id >= world size) whose id mod world size is its rank. On node-local disks a
   rank sees only its node's files; on a shared filesystem the work is split.
2. plan (`plan_resume`, the same answer on every rank, from everybody's survey):
   - exact: the newest step where every slot 0..W-1 has a regular file written by a
     world of W workers, provided every newer valid file is also a regular file of a
     W-world (a torn write: workers killed while writing the next checkpoint). Every
     worker loads its own file and continues bit-identically (DESIGN.md invariant 4).
   - elastic: otherwise the newest step with any valid file. The lowest rank holding a
     file of that step reads it and broadcasts the global state: θ, outer momentum, outer
     and inner step counters, data position, the model's non-synchronised tensors. Every
     rank then takes its inner optimizer state and RNG from its own newest file up to
     that step if it has one, else starts them fresh.
   - fresh: no valid file anywhere.
3. check: the loaded global hash must equal the one recorded in the file and be the same
   on every rank (if files of one step disagree, worker 0's global state is taken).

`resume(trainer)` runs the three; `save_after_failure(trainer, error)` writes the state a
member still holds when an exchange fails, so the next world can start from it.

Why any file of a step will do for the global state: the outer step is a collective, so
every member that completes outer step t holds bit-identical θ, v and counters (invariant
1). Files written after a failed exchange ("on failure" files, `exact` = False) hold the
last outer step the member completed, which is equally consistent; their inner optimizer
state is the member's latest, so they are only used elastically.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dilo import checkpoint
from dilo.comm.protocol import Group

if TYPE_CHECKING:
    from dilo.train import Trainer

log = logging.getLogger("dilo")

_WORKER_FILE = re.compile(r"^worker-(\d+)\.pt$")
# Top-level keys of a trainer checkpoint that belong to one worker, not to the world.
WORKER_KEYS = ("worker", "exact", "totals", "rng")
# Tensors at least this large travel by `Group.broadcast`, not inside the pickled metadata.
_BROADCAST_MIN_NUMEL = 4096


def survey(step_dirs: list[Path], rank: int, world_size: int) -> list[dict]:
    """The checkpoint files this rank answers for that pass verification.

    Returns one small dict per valid file: step (outer step, from its content), worker,
    num_workers (the world that wrote it), exact (False for on-failure files), dir.
    Damaged files are skipped with a warning.
    """
    found = []
    for directory in step_dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            match = _WORKER_FILE.match(path.name)
            if not match:
                continue
            slot = int(match.group(1))
            if slot != rank and not (slot >= world_size and slot % world_size == rank):
                continue
            try:
                state = checkpoint.read_verified(path)
            except checkpoint.CheckpointError as e:
                log.warning("skipping checkpoint: %s", e)
                continue
            found.append({"step": int(state["outer_step"]), "worker": slot,
                          "num_workers": int(state["num_workers"]),
                          "exact": bool(state.get("exact", True)), "dir": str(directory)})
    return found


@dataclass
class ResumePlan:
    kind: str
    """`fresh`, `exact` or `elastic`."""
    step: int = -1
    """The outer step resumed from."""
    dir: str = ""
    """Its step folder."""
    source_rank: int = -1
    """elastic: the rank that reads the global state and broadcasts it."""
    source_worker: int = -1
    """elastic: whose file that is."""
    written_by: int = 0
    """Number of workers of the world that wrote the state."""


def plan_resume(surveys: list[list[dict]], world_size: int) -> ResumePlan:
    """Decide how a world of `world_size` resumes, from every rank's `survey` (rank order)."""
    files: dict[int, dict[int, tuple[int, dict]]] = {}  # step -> worker -> (rank, file)
    for rank, found in enumerate(surveys):
        for f in found:
            files.setdefault(f["step"], {})[f["worker"]] = (rank, f)
    if not files:
        return ResumePlan("fresh")

    def regular_of_this_world(f: dict) -> bool:
        return f["exact"] and f["num_workers"] == world_size and f["worker"] < world_size

    for step in sorted(files, reverse=True):
        at_step = [f for _, f in files[step].values()]
        if set(range(world_size)) <= files[step].keys() and all(map(regular_of_this_world, at_step)):
            newer = [f for s in files if s > step for _, f in files[s].values()]
            if all(map(regular_of_this_world, newer)):
                return ResumePlan("exact", step, at_step[0]["dir"], written_by=world_size)
            break
    newest = max(files)
    worker = min(files[newest])
    rank, f = files[newest][worker]
    return ResumePlan("elastic", newest, f["dir"], rank, worker, f["num_workers"])


def own_newest(found: list[dict], rank: int, max_step: int) -> dict | None:
    """This rank's own newest valid file at or before `max_step` (its inner state)."""
    own = [f for f in found if f["worker"] == rank and f["step"] <= max_step]
    return max(own, key=lambda f: f["step"]) if own else None


def global_part(state: dict) -> dict:
    """The part of a trainer checkpoint that is the same on every worker of its world."""
    shared = {k: v for k, v in state.items() if k not in WORKER_KEYS}
    if "diloco" in shared:
        shared["diloco"] = {k: v for k, v in shared["diloco"].items() if k != "inner_optimizer"}
    return shared


def merge(shared: dict, own: dict | None) -> dict:
    """A loadable state: the world's global part plus this worker's own part (None = fresh)."""
    state = dict(shared)
    for key in ("totals", "rng"):
        state[key] = own.get(key) if own else None
    if "diloco" in state:
        inner = own["diloco"].get("inner_optimizer") if own and "diloco" in own else None
        state["diloco"] = {**state["diloco"], "inner_optimizer": inner}
    return state


def _lift_tensors(obj: object, out: list[torch.Tensor]) -> object:
    """Replace large fp32 tensors by placeholders {"__tensor__": i, "shape": ...}."""
    if isinstance(obj, torch.Tensor) and obj.dtype == torch.float32 and obj.numel() >= _BROADCAST_MIN_NUMEL:
        out.append(obj.detach().reshape(-1).contiguous())
        return {"__tensor__": len(out) - 1, "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {k: _lift_tensors(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_lift_tensors(v, out) for v in obj)
    return obj


def _place_tensors(obj: object, tensors: list[torch.Tensor]) -> object:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]].view(obj["shape"])
        return {k: _place_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_place_tensors(v, tensors) for v in obj)
    return obj


def broadcast_global_state(group: Group, state: dict | None, source_rank: int) -> dict:
    """The source's global state on every member (`state` is ignored elsewhere).

    Small values travel as one pickled object; θ, the outer momentum and other large
    fp32 tensors by `group.broadcast`, one at a time, so no member holds a pickled copy.
    A collective: every member calls it with the same `source_rank`.
    """
    tensors: list[torch.Tensor] = []
    meta = _lift_tensors(global_part(state), tensors) if group.rank == source_rank else None
    sizes = [t.numel() for t in tensors] if group.rank == source_rank else None
    meta, sizes = group.all_gather_object((meta, sizes))[source_rank]
    if group.rank != source_rank:
        tensors = [torch.empty(n, dtype=torch.float32) for n in sizes]
    for flat in tensors:
        group.broadcast(flat, src=source_rank)
    return _place_tensors(meta, tensors)


# -- the trainer's side -------------------------------------------------------------------


def resume(trainer: Trainer) -> None:
    """`checkpoint.resume` (auto or a step folder): survey, plan, load, check; a collective."""
    t, cfg = trainer, trainer.cfg
    explicit = cfg.checkpoint.resume != "auto"
    dirs = [Path(cfg.checkpoint.resume)] if explicit else [
        checkpoint.step_dir(cfg.run.dir, s) for s in checkpoint.list_steps(cfg.run.dir)]
    mine = survey(dirs, t.worker, t.num_workers)
    plan = plan_resume(t.group.all_gather_object(mine), t.num_workers)
    if plan.kind == "fresh":
        if explicit:
            raise checkpoint.CheckpointError(f"checkpoint.resume={cfg.checkpoint.resume}: no valid "
                                             "checkpoint file there (see the warnings above)")
        log.info("checkpoint.resume = auto: no checkpoint in %s, starting fresh", cfg.run.dir)
        return
    inner_from: int | None = plan.step
    if plan.kind == "exact":
        path = checkpoint.worker_file(Path(plan.dir), t.worker)
        t.load_state_dict(checkpoint.read_verified(path), str(path))
    else:
        inner_from = load_elastic(t, plan, mine)
    if len(set(t.group.all_gather_object(t.global_hash()))) > 1:
        # Files of one step written by two attempts that were not bit-identical (e.g.
        # non-deterministic GPU kernels): take worker 0's global state everywhere.
        log.warning("checkpoint files of outer step %d disagree; taking worker 0's global "
                    "state on every worker", plan.step)
        plan = ResumePlan("elastic", plan.step, plan.dir, 0, 0, plan.written_by)
        inner_from = load_elastic(t, plan, mine)
    log.info("resumed from %s (%s: written by %d workers, now %d) at inner step %d, outer step "
             "%d; inner optimizer state %s", plan.dir, plan.kind, plan.written_by, t.num_workers,
             t.step, t.outer_step, "fresh" if inner_from is None else f"from outer step {inner_from}")
    t.metrics.log("event", event="resume", path=plan.dir, how=plan.kind, step=t.step,
                  outer_step=t.outer_step, written_by=plan.written_by, workers=t.num_workers,
                  inner_from=inner_from, world=t.world_id, global_hash=t.global_hash())


def load_elastic(trainer: Trainer, plan: ResumePlan, mine: list[dict]) -> int | None:
    """The plan's global state, broadcast from its source; the inner state from this worker's
    own newest file up to that step, or fresh. Returns that file's step, or None."""
    t = trainer
    source = None
    if t.rank == plan.source_rank:  # gather index = global rank (several per island)
        source = checkpoint.read_verified(checkpoint.worker_file(Path(plan.dir), plan.source_worker))
    shared = broadcast_global_state(t.group, source, plan.source_rank)
    own_file = own_newest(mine, t.worker, plan.step)
    own = None
    if own_file is not None:
        own = checkpoint.read_verified(checkpoint.worker_file(Path(own_file["dir"]), t.worker))
    t.load_state_dict(merge(shared, own), f"{plan.dir} (elastic)", exact=False)
    return own_file["step"] if own_file else None


def save_after_failure(trainer: Trainer, error: BaseException) -> None:
    """An exchange failed (a peer died or timed out): save the state this member still holds.

    A failed average leaves θ, v and the outer step untouched (outer step t, the last
    boundary); a failure after the update (hash check, buffers) leaves them at t + 1, the
    current boundary. Either is the state every member that got that far holds, bit for
    bit. Step and data position are set to that boundary's; the inner optimizer is this
    worker's latest, so the file is marked `exact = False` and serves elastic resumes only.
    Skipped if this worker already has a file for that outer step, and in DDP mode (its
    state changes at every step). torchrun's agent SIGKILLs the worker `shutdown timeout`
    seconds after the failure: a write cut short leaves only a temporary file.
    """
    t, k = trainer, trainer.cfg.checkpoint
    log.error("exchange failed at outer step %d: %s", t.outer_step + 1, str(error)[:300])
    if not (t.diloco and k.every and k.on_failure and t.speaks_for_worker) or t.outer_step == 0:
        return
    boundary = t.boundary
    if t.outer_step != boundary["outer_step"]:  # the failure came after the outer step
        boundary = {"step": t.step, "data": t.batches.state_dict(), "inner_step": t.diloco.inner_step}
    try:
        t.writer.wait()  # a background write of this very step may still be running
    except checkpoint.CheckpointError as e:
        log.error("%s", e)
    path = checkpoint.worker_file(checkpoint.step_dir(t.cfg.run.dir, t.outer_step), t.worker)
    if path.exists():
        return
    try:
        state = t.state_dict()
    except Exception as e:  # noqa: BLE001 - e.g. the failed exchange was still in flight
        log.error("could not save the state after the failure: %s", str(e)[:300])
        return
    state.update(step=boundary["step"], data=boundary["data"], exact=False)
    state["diloco"]["inner_step"] = boundary["inner_step"]
    try:
        checkpoint.save(t.cfg.run.dir, t.worker, t.outer_step, state, k.keep, t.num_workers)
    except OSError as e:  # the exchange's error is the one to report; this one is a footnote
        log.error("could not save the state after the failure: %s", e)
        return
    log.warning("saved the last consistent global state (outer step %d) to %s", t.outer_step, path)
    t.metrics.log("event", event="checkpoint", path=str(path), outer_step=t.outer_step,
                  on_failure=True, error=str(error)[:300], world=t.world_id, global_hash=t.global_hash())
