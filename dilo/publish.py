"""Published versions of the global model: `publish.dir/step-XXXXXX/` plus a `latest` pointer.

A version is a folder holding `model.safetensors` (the global weights θ by parameter name,
float32, tied weights stored once per name) and `manifest.json` (outer step, global hash,
tokens seen, the consumed-data manifest of a watched stream, the run's config, the sha256
of the weights file). It is written atomically: both files go into a hidden temporary
folder beside the versions, are fsynced, the folder is renamed to `step-XXXXXX` (one
rename: a reader sees no folder or a complete one), and the parent is fsynced. Only then
is `latest` replaced (dilo/atomic_write.py: a small text file naming the folder, written
by rename), so a consumer that reads `latest` and opens the folder it names never sees a
half-written version. The newest `publish.keep` versions are kept; the one `latest`
names is never removed. `dilo export CHECKPOINT OUT` writes the same from a checkpoint.
See docs/continual.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from dilo import atomic_write
from dilo.lora import with_base

log = logging.getLogger("dilo")

LATEST = "latest"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
_VERSION = re.compile(r"^step-(\d{6,})$")


def version_name(outer_step: int) -> str:
    return f"step-{outer_step:06d}"


def global_tensors(model: nn.Module, flat: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The model's state by name with the synchronized parameters taken from θ (`flat`,
    the trainable parameters in `model.parameters()` order, as DiLoCo holds it); the rest
    (buffers, frozen parameters) as the model has them. `flat=None`: the model as it is."""
    slices: dict[int, torch.Tensor] = {}
    if flat is not None:
        offset = 0
        for p in (p for p in model.parameters() if p.requires_grad):
            slices[id(p)] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        if offset != flat.numel():
            raise ValueError(f"θ holds {flat.numel()} values, the model's trainable parameters "
                             f"{offset}; the checkpoint was written for another model")
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        src = slices.get(id(t), t)
        out[name] = src.detach().to("cpu").contiguous().clone()
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def publish(out_dir: str | Path, outer_step: int, tensors: dict[str, torch.Tensor],
            manifest: dict, keep: int) -> Path:
    """Write version `step-XXXXXX` atomically, point `latest` at it, keep the newest `keep`.

    A version that already exists (a resumed run publishing the same step again) is left
    as it is: the same outer step of one run holds the same θ on every replica.
    """
    from safetensors.torch import save_file  # the `safetensors` dependency

    if keep < 1:
        raise ValueError(f"publish.keep must be >= 1, got {keep}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = version_name(outer_step)
    final = out / name
    if not final.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}.", suffix=".tmp"))
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"outer_step": str(outer_step)})
            _fsync_file(tmp / WEIGHTS)
            digest = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()
            doc = {**manifest, "outer_step": outer_step, "weights": WEIGHTS, "weights_sha256": digest}
            atomic_write.write_json(tmp / MANIFEST, doc, default=str)
            atomic_write.fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write.fsync_dir(out)
    atomic_write.write_text(out / LATEST, name + "\n")
    _prune(out, keep, current=name)
    return final


def _prune(out: Path, keep: int, current: str) -> None:
    versions = sorted(p.name for p in out.iterdir() if _VERSION.match(p.name) and p.is_dir())
    for old in versions[:-keep]:
        if old != current:
            shutil.rmtree(out / old, ignore_errors=True)


def read_latest(out_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """What a consumer does: read `latest`, load the version it names (manifest, weights),
    check the weights' sha256. None while nothing is published."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    try:
        name = (out / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    folder = out / name
    manifest = json.loads((folder / MANIFEST).read_text())
    raw = (folder / WEIGHTS).read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest["weights_sha256"]:
        raise ValueError(f"{folder}: {WEIGHTS} does not match the sha256 in its manifest")
    return manifest, load_file(str(folder / WEIGHTS))


def version_manifest(cfg_dict: dict, global_hash: str, tokens_seen: int, data: dict) -> dict:
    """The manifest fields besides those `publish` adds (outer step, weights and their hash)."""
    return {"format": "dilo-published-1", "global_hash": global_hash, "tokens_seen": tokens_seen,
            "data": data, "config": cfg_dict}


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, keep: int = 1_000_000) -> Path:
    """`dilo export CHECKPOINT OUT`: a checkpoint file or step folder as a published version."""
    from dilo import checkpoint
    from dilo.config import ModelConfig
    from dilo.model import GPT

    path = checkpoint.resolve_init_from(checkpoint_path)
    state = checkpoint.read_verified(path)
    model = GPT(ModelConfig(**state["config"]["model"]))
    if "diloco" in state:
        model.load_state_dict(state["model_rest"], strict=False)
        tensors = global_tensors(model, state["diloco"]["global_params"])
    else:
        model.load_state_dict(state["model"])
        tensors = global_tensors(model, None)
    data = state.get("data", {})
    tokens = int(data.get("tokens_seen", data.get("position", 0) * data.get("seq_len", 0)))
    manifest = version_manifest(state["config"], state["global_hash"], tokens, data)
    manifest["source"] = str(path)
    return publish(out_dir, int(state["outer_step"]), tensors, manifest, keep)


class Publisher:
    """publish.every: the leader writes the global model at outer-step boundaries."""

    def __init__(self, cfg, state, model: nn.Module):
        self.cfg, self.state, self.model = cfg, state, model
        self.dir = Path(cfg.publish.dir or Path(cfg.run.dir) / "published")

    def publish(self) -> Path:
        s = self.state
        if s.diloco is not None:
            g = s.diloco.export_state()
            flat, digest, step = g.tensors["params"], g.digest(), g.outer_step
            if self.cfg.model.lora_rank:  # the hash checkpoints and summaries report (base included)
                digest = with_base(digest, s.model_rest())
        else:
            flat, digest, step = None, s.global_hash(), s.outer_step
        manifest = version_manifest(self.cfg.to_dict(), digest, s.batches.global_tokens_consumed,
                                    s.batches.state_dict())
        folder = publish(self.dir, step, global_tensors(self.model, flat), manifest,
                         self.cfg.publish.keep)
        log.info("published outer step %d to %s", step, folder)
        return folder
