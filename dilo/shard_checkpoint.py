"""Checkpoints of sharded workers (run.shard = fsdp, dilo/sharded_state.py): one file per rank.

Layout, in the usual step folder (dilo/checkpoint.py's format: atomic, checksummed):

    checkpoints/step-XXXXXX/worker-<w>.shard-<r>-of-<S>.pt   every rank r of worker w
    checkpoints/step-XXXXXX/worker-<w>.shards.pt             the manifest, by local rank 0

A shard file holds rank r's chunk of θ and of the outer momentum (and its EF residual), its
inner AdamW state (local tensors), the worker's counters, data position, totals and RNG, the
parameter names with their full and local shapes, and the global hash. The manifest (layout
S, the number of workers, the shard file names, the global hash) is written after every rank
of the worker has written its file (a gather over the worker's ranks), so a step folder with
the manifest has every shard. The files of other layouts are not `worker-<w>.pt` files:
resume.py's one-file-per-worker survey never reads them.

`resume auto` (every rank of the world reads the same folders: a filesystem every process
sees) takes the newest step whose manifests of every worker and every listed shard verify
and agree on the outer step and the global hash; a step with a missing or corrupt shard is
passed over whole (never half-loaded), and if step folders exist but none is complete,
nothing starts. With the same layout (workers and S) each rank loads its own file: exact.
With another layout the full θ and momentum are assembled from worker 0's shard files and
cut for the new S (exact bytes of θ and momentum); the inner optimizer and EF residuals
restart (fresh), the counters and data position are worker 0's.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.distributed as dist

from dilo import checkpoint
from dilo.comm.protocol import Group
from dilo.config import shared_settings_diff, shared_settings_of
from dilo.sharded_state import local_chunk

log = logging.getLogger("dilo")


def shard_file(directory: Path, worker: int, rank: int, size: int) -> Path:
    return directory / f"worker-{worker}.shard-{rank}-of-{size}.pt"


def manifest_file(directory: Path, worker: int) -> Path:
    return directory / f"worker-{worker}.shards.pt"


def _optimizer_local(state: dict) -> dict:
    """An inner optimizer state_dict with its DTensors as their local tensors."""
    out = {k: v for k, v in state.items() if k != "state"}
    out["state"] = {i: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in s.items()}
                    for i, s in state["state"].items()}
    return out


def _optimizer_dtensor(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of `_optimizer_local` for this optimizer's (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {k: v for k, v in state.items() if k != "state"}
    out["state"] = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out["state"][i] = {k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                 shape=p.shape, stride=p.stride())
                           if isinstance(p, DTensor) and k != "step" else v for k, v in s.items()}
    return out


def shard_state(state, world) -> dict:
    """This rank's checkpoint (a collective over the worker's ranks: the global hash)."""
    d, cfg = state.diloco, state.cfg
    outer = d.state_dict()
    outer["inner_optimizer"] = _optimizer_local(outer["inner_optimizer"])
    shards = list(d.model.shards)
    full = dict(d.full_model.named_parameters())
    return {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "num_workers": state.num_workers,
            "worker_size": world.worker_size, "rank_in_worker": world.rank_in_worker, "worker": state.worker,
            "step": state.inner_step, "outer_step": state.outer_step, "data": state.batches.state_dict(),
            "global_hash": state.global_hash(), "totals": state.totals.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "names": list(d.model.names), "local_shapes": [list(s.shape) for s in shards],
            "full_shapes": [list(full[n].shape) for n in d.model.names], "diloco": outer}


def save(state, world, keep: int) -> Path:
    """Every rank writes its shard file; then local rank 0 the manifest; then prune (all ranks)."""
    directory = checkpoint.step_dir(state.cfg.run.dir, state.outer_step)
    w, r, size = state.worker, world.rank_in_worker, world.worker_size
    content = shard_state(state, world)
    path = shard_file(directory, w, r, size)
    checkpoint.write_atomic(path, content)
    names: list = [None] * size
    dist.all_gather_object(names, path.name, group=world.island.intra_pg)  # every shard is on disk
    if r == 0:
        checkpoint.write_atomic(manifest_file(directory, w), {
            "worker_size": size, "num_workers": state.num_workers, "outer_step": state.outer_step,
            "global_hash": content["global_hash"], "shards": names})
    _prune(state.cfg.run.dir, w, r, size, keep)
    return path


def _prune(run_dir: str, worker: int, rank: int, size: int, keep: int) -> None:
    steps = [s for s in checkpoint.list_steps(run_dir)
             if shard_file(checkpoint.step_dir(run_dir, s), worker, rank, size).exists()]
    for old in steps[:-keep]:
        directory = checkpoint.step_dir(run_dir, old)
        if rank == 0:
            manifest_file(directory, worker).unlink(missing_ok=True)  # the step stops counting first
        shard_file(directory, worker, rank, size).unlink(missing_ok=True)
        try:
            directory.rmdir()  # the last file out removes the folder
        except OSError:
            pass


def refuse_unsharded_resume(run_dir: str) -> None:
    """run.shard = ddp over a run.dir whose checkpoints are only sharded ones: refuse (the
    one-file-per-worker survey would not see them and start over them)."""
    root = checkpoint.checkpoint_root(run_dir)
    if not root.is_dir() or any(p.name.removeprefix("worker-").removesuffix(".pt").isdigit()
                                for p in root.glob("step-*/worker-*.pt")):
        return
    if any(root.glob("step-*/worker-*.shards.pt")):
        raise ValueError(f"{root} holds sharded checkpoints (run.shard = fsdp): resume them with "
                         "--run.shard fsdp (any run.worker_size >= 2 re-shards), or pass "
                         "--checkpoint.resume fresh to set them aside")


def complete_step(directory: Path) -> tuple[dict, dict[tuple[int, int], dict]] | str:
    """(worker 0's manifest, {(worker, rank): shard state}) of a step folder whose every shard
    verifies and agrees, or the reason it cannot be used."""
    try:
        first = checkpoint.read_verified(manifest_file(directory, 0))
        files = {}
        for w in range(first["num_workers"]):
            manifest = checkpoint.read_verified(manifest_file(directory, w))
            if (manifest["worker_size"], manifest["num_workers"]) != (first["worker_size"], first["num_workers"]):
                return f"{directory}: worker {w}'s manifest has another layout"
            for r, name in enumerate(manifest["shards"]):
                files[w, r] = checkpoint.read_verified(directory / name)
    except checkpoint.CheckpointError as e:
        return str(e)
    if len({(s["outer_step"], s["global_hash"]) for s in files.values()}) != 1:
        return f"{directory}: its shard files disagree on the outer step or the global hash"
    return first, files


def restore(state, world, world_group: Group, setting: str) -> str | None:
    """`checkpoint.resume` for run.shard = fsdp: loads the newest complete step (see the module
    doc); returns how ("exact" or "resharded"), None when there is none. A collective."""
    run_dir = state.cfg.run.dir
    dirs = [Path(setting)] if setting != "auto" else [
        checkpoint.step_dir(run_dir, s) for s in reversed(checkpoint.list_steps(run_dir))]
    found, reasons = None, []
    for directory in dirs:
        found = complete_step(directory)
        if not isinstance(found, str):
            break
        reasons.append(found)
        found = None
    chosen = world_group.all_gather_object(None if found is None else found[0]["outer_step"])
    if len(set(chosen)) != 1:
        raise checkpoint.CheckpointError(f"the processes see different complete checkpoints {chosen}: "
                                         "run.shard = fsdp resumes from a filesystem every process sees")
    if found is None:
        if dirs:
            raise checkpoint.CheckpointError(
                f"checkpoint.resume = {setting}: no complete sharded checkpoint in {run_dir}; nothing was "
                "started:\n  - " + "\n  - ".join(reasons[:8]) + "\nRestore the files, or pass "
                "--checkpoint.resume fresh to set them aside and start from step 0")
        return None
    manifest, files = found
    mine = files[0, 0]
    differ = shared_settings_diff(shared_settings_of(mine["config"]), state.cfg.shared_settings())
    if differ:
        raise ValueError(f"the checkpoint was written with other settings: {'; '.join(differ)}; resume "
                         "with the run's original config, or choose another run.dir")
    layout = (manifest["num_workers"], manifest["worker_size"])
    if layout == (state.num_workers, world.worker_size):
        _load_exact(state, files[state.worker, world.rank_in_worker])
        return "exact"
    _load_resharded(state, world, [files[0, r] for r in range(manifest["worker_size"])])
    (log.warning if world.rank == 0 else log.info)("re-sharded the checkpoint of outer step %d written by %d workers x %d ranks for %d workers "
                "x %d ranks: θ and the outer momentum exact, inner optimizer and EF residuals restart",
                manifest["outer_step"], *layout, state.num_workers, world.worker_size)
    return "resharded"


def _load_common(state, saved: dict) -> None:
    state.inner_step = int(saved["step"])
    state.batches.load_state_dict(saved["data"])


def _load_exact(state, saved: dict) -> None:
    _load_common(state, saved)
    state.totals.load(saved["totals"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    outer = dict(saved["diloco"])
    outer["inner_optimizer"] = _optimizer_dtensor(outer["inner_optimizer"], state.diloco.inner_optimizer)
    state.diloco.load_state_dict(outer)
    if state.global_hash() != saved["global_hash"]:
        raise checkpoint.CheckpointError("the loaded sharded state does not hash to the value recorded "
                                         "when it was saved")
    state.record_boundary()


def reshard(pieces: list[list[torch.Tensor]], full_shapes: list[list[int]], parts: int,
            index: int) -> torch.Tensor:
    """Chunk `index` of `parts` of every parameter, flat: `pieces[r]` is old rank r's flat
    vector; each parameter's old chunks are joined along dim 0, then cut again."""
    out = []
    for i, shape in enumerate(full_shapes):
        full = torch.cat([p[i] for p in pieces]).reshape(shape)
        out.append(local_chunk(full, parts, index).reshape(-1))
    return torch.cat(out)


def split_flat(flat: torch.Tensor, shapes: list[list[int]]) -> list[torch.Tensor]:
    """A flat vector cut into one piece per shape (each reshaped to its shape)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes)]


def _load_resharded(state, world, old: list[dict]) -> None:
    d = state.diloco
    _load_common(state, old[0])
    full_shapes = old[0]["full_shapes"]
    if old[0]["names"] != list(d.model.names):
        raise ValueError("the sharded checkpoint holds other parameters than this model")

    def cut(get) -> torch.Tensor:
        return reshard([split_flat(get(s), s["local_shapes"]) for s in old], full_shapes,
                       world.worker_size, world.rank_in_worker)

    theta = cut(lambda s: s["diloco"]["global_params"])
    outer = dict(old[0]["diloco"], global_params=theta, inner_optimizer=None)
    frag = dict(outer["fragments"][0])
    momentum = frag["outer"]["state"].get(0, {}).get("momentum_buffer")
    if momentum is not None:
        sgd_state = {0: {"momentum_buffer": cut(lambda s: s["diloco"]["fragments"][0]["outer"]["state"][0]
                                                ["momentum_buffer"])}}
        frag["outer"] = dict(frag["outer"], state=sgd_state)
    if "residual" in frag:
        frag["residual"] = torch.zeros_like(theta)
    outer["fragments"] = [frag]
    d.load_state_dict(outer)
    state.record_boundary()
