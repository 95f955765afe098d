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
     worker loads its own file and continues bit-identically (docs/design.md, invariants).
   - elastic: otherwise the newest step with any valid file. The lowest rank holding a
     file of that step reads it and broadcasts the global state: θ, outer momentum, outer
     and inner step counters, data position, the model's non-synchronised tensors. Every
     rank then takes its inner optimizer state and RNG from its own newest file up to
     that step if it has one, else starts them fresh.
   - fresh: no valid file anywhere.
3. check: the loaded global hash must equal the one recorded in the file and be the same
   on every rank (if files of one step disagree, worker 0's global state is taken).

`resume(context)` runs the three and returns the state to load; `save_after_failure(...)`
writes the state a member still holds when an exchange fails, so the next world can start
from it. Neither sees the trainer: their inputs are explicit.

Why any file of a step will do for the global state: the outer step is a collective, so
every member that completes outer step t holds bit-identical θ, v and counters
(docs/design.md, invariants). Files written after a failed exchange ("on failure" files,
`exact` = False) hold the last outer step the member completed, which is equally
consistent; their inner optimizer state is the member's latest, so they are only used
elastically.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dilo import checkpoint
from dilo.comm.protocol import Group

log = logging.getLogger("dilo")

_WORKER_FILE = re.compile(r"^worker-(\d+)\.pt$")
# Top-level keys of a trainer checkpoint that belong to one worker, not to the world.
WORKER_KEYS = ("worker", "exact", "totals", "rng")
# Tensors at least this large travel by `Group.broadcast`, not inside the pickled metadata.
_BROADCAST_MIN_NUMEL = 4096


def survey(step_dirs: list[Path], rank: int, world_size: int, rejected: list[str] | None = None) -> list[dict]:
    """The checkpoint files this rank answers for that pass verification.

    Returns one small dict per valid file: step (outer step, from its content), worker,
    num_workers (the world that wrote it), exact (False for on-failure files), dir.
    Damaged files are skipped with a warning, and their reasons appended to `rejected`.
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
                if rejected is not None:
                    rejected.append(str(e))
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


# -- the worker's side ----------------------------------------------------------------------


@dataclass
class ResumeContext:
    """What resuming needs to know about this process (explicit: never the trainer)."""

    run_dir: str
    setting: str
    """`checkpoint.resume`: `auto` or a step folder."""
    worker: int
    num_workers: int
    rank: int
    """This process's rank in `group` (several per worker with run.worker_size > 1)."""
    group: Group
    """Every process of this world: the surveys are gathered and the state broadcast here."""


@dataclass
class Resumed:
    """A state to load (`load_state_dict(state, source, exact)`) and where it came from."""

    state: dict
    source: str
    exact: bool
    plan: ResumePlan
    inner_from: int | None
    """The outer step of the file the inner optimizer state comes from; None = fresh."""


def resume(ctx: ResumeContext) -> Resumed | None:
    """Survey, plan, read: the state this worker continues from, None to start fresh.

    A collective: every process of `ctx.group` calls it.
    """
    explicit = ctx.setting != "auto"  # ("fresh" never comes here: Checkpoints.restore)
    dirs = [Path(ctx.setting)] if explicit else [
        checkpoint.step_dir(ctx.run_dir, s) for s in checkpoint.list_steps(ctx.run_dir)]
    rejected: list[str] = []
    mine = survey(dirs, ctx.worker, ctx.num_workers, rejected)
    everyone = ctx.group.all_gather_object((mine, rejected))
    plan = plan_resume([found for found, _ in everyone], ctx.num_workers)
    if plan.kind == "fresh":
        damaged = sorted({reason for _, reasons in everyone for reason in reasons})
        listed = "".join(f"\n  - {reason}" for reason in damaged)
        if explicit:
            raise checkpoint.CheckpointError(f"checkpoint.resume={ctx.setting}: no valid "
                                             f"checkpoint file there{listed or ' (no worker-*.pt file)'}")
        if damaged:  # never start over them: step 1's save would overwrite them
            raise checkpoint.CheckpointError(
                f"checkpoint.resume = auto: {checkpoint.checkpoint_root(ctx.run_dir)} holds checkpoint "
                f"files but none is valid; nothing was started and nothing changed:{listed}\n"
                "Restore or repair them, or pass --checkpoint.resume fresh to set them aside "
                "(renamed to checkpoints.old-<time>) and start from step 0")
        log.info("checkpoint.resume = auto: no checkpoint in %s, starting fresh", ctx.run_dir)
        return None
    if plan.kind == "exact":
        path = checkpoint.worker_file(Path(plan.dir), ctx.worker)
        found = Resumed(checkpoint.read_verified(path), str(path), True, plan, plan.step)
    else:
        found = _elastic_state(ctx, plan, mine)
    # Loading checks that the state hashes to the value recorded in it, so comparing the
    # recorded hashes is comparing the loaded states.
    if len(set(ctx.group.all_gather_object(found.state["global_hash"]))) > 1:
        # Files of one step written by two attempts that were not bit-identical (e.g.
        # non-deterministic GPU kernels): take worker 0's global state everywhere.
        log.warning("checkpoint files of outer step %d disagree; taking worker 0's global "
                    "state on every worker", plan.step)
        plan = ResumePlan("elastic", plan.step, plan.dir, 0, 0, plan.written_by)
        found = _elastic_state(ctx, plan, mine)
    return found


def _elastic_state(ctx: ResumeContext, plan: ResumePlan, mine: list[dict]) -> Resumed:
    """The plan's global state, broadcast from its source; the inner state from this worker's
    own newest file up to that step, or fresh."""
    source = None
    if ctx.rank == plan.source_rank:  # gather index = global rank (several per island)
        source = checkpoint.read_verified(checkpoint.worker_file(Path(plan.dir), plan.source_worker))
    shared = broadcast_global_state(ctx.group, source, plan.source_rank)
    own_file = own_newest(mine, ctx.worker, plan.step)
    own = None
    if own_file is not None:
        own = checkpoint.read_verified(checkpoint.worker_file(Path(own_file["dir"]), ctx.worker))
    return Resumed(merge(shared, own), f"{plan.dir} (elastic)", False, plan,
                   own_file["step"] if own_file else None)


def save_after_failure(run_dir: str, worker: int, num_workers: int, keep: int, outer_step: int,
                       state: Callable[[], dict], boundary: dict) -> Path | None:
    """An exchange failed (a peer died or timed out): save the state this member still holds.

    A failed average leaves θ, v and the outer step untouched (outer step t, the last
    boundary); a failure after the update (hash check, buffers) leaves them at t + 1, the
    current boundary. Either is the state every member that got that far holds, bit for
    bit. `boundary` holds that boundary's step, data position and DiLoCo inner step (the
    caller picks which); the inner optimizer is this worker's latest, so the file is
    marked `exact = False` and serves elastic resumes only. Skipped (None) if this worker
    already has a file for `outer_step`. torchrun's agent SIGKILLs the worker `shutdown
    timeout` seconds after the failure: a write cut short leaves only a temporary file.
    """
    path = checkpoint.worker_file(checkpoint.step_dir(run_dir, outer_step), worker)
    if path.exists():
        return None
    try:
        saved = state()
    except Exception as e:  # noqa: BLE001 - e.g. the failed exchange was still in flight
        log.error("could not save the state after the failure: %s", str(e)[:300])
        return None
    saved.update(step=boundary["step"], data=boundary["data"], exact=False)
    saved["diloco"]["inner_step"] = boundary["inner_step"]
    try:
        checkpoint.save(run_dir, worker, outer_step, saved, keep, num_workers)
    except OSError as e:  # the exchange's error is the one to report; this one is a footnote
        log.error("could not save the state after the failure: %s", e)
        return None
    log.warning("saved the last consistent global state (outer step %d) to %s", outer_step, path)
    return path
