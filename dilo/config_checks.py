"""The checks a configuration passes before anything starts (`validate`), and the one
that needs the world size (`validate_world_size`, at start-up, before any rendezvous).

Each refusal is a ValueError that names the key, the value and what is allowed. The
outer loop's own options are checked by dilo/options.py, the same code `dilo.DiLoCo`
runs, so the CLI and the library refuse alike. `cfg` is a `dilo.config.Config`; this
module reads it by attribute and does not import dilo.config (which imports it).
"""

from __future__ import annotations

import dataclasses
import math

from dilo.options import (
    CODEC_NAMES,
    check_aggregate,
    check_digest,
    check_outer_options,
    check_owner_feedback,
    check_pieces,
    check_sparse_options,
)

LORA_TARGETS = ("qkv", "proj", "fc", "fc_out")
"""The linear layers of a dilo GPT block that `model.lora_targets` may name."""
LORA_AGGREGATES = ("naive", "frozen_a", "exact")
MODES = ("diloco", "ddp")
SHARDS = ("ddp", "fsdp")
BACKENDS = ("torch", "hivemind")
DEVICES = ("auto", "cpu", "cuda")
LAYOUTS = ("iid", "contiguous")
"""`data.layout`: how the train stream's windows are ordered (dilo/data.py, ShardedBatches)."""
FAILOVERS = ("restart", "heal")
INNER_LR_MAX = 1.0
"""inner.lr above this is refused: AdamW moves every weight by up to lr per step, so lr > 1
is a typo (published language-model values are 1e-5 .. 1e-2)."""
OUTER_LR_MAX = 10.0
"""outer.lr above this is refused: it multiplies the averaged pseudo-gradient (DiLoCo uses
0.7; published sweeps stay at or below ~2), so > 10 amplifies every step tenfold."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg) -> None:
    """Refuse impossible settings before anything starts."""
    r, m, d, i, c, k = cfg.run, cfg.model, cfg.data, cfg.inner, cfg.comm, cfg.checkpoint
    _validate_finite(cfg)
    _require(r.mode in MODES, f"run.mode must be one of {', '.join(MODES)}, got {r.mode!r}")
    _require(r.device in DEVICES, f"run.device must be one of {', '.join(DEVICES)}, got {r.device!r}")
    _require(r.steps >= 0, f"run.steps must be >= 1, or 0 to train until stopped; got {r.steps}")
    _require(r.threads >= 0, f"run.threads must be >= 0, got {r.threads}")
    _require(r.worker_size >= 1, f"run.worker_size must be >= 1, got {r.worker_size}")
    _require(r.mode == "diloco" or r.worker_size == 1,
             f"run.worker_size = {r.worker_size} needs run.mode = diloco; with run.mode = ddp every "
             "process is one data-parallel replica of one worker (leave run.worker_size at 1)")
    _require(m.vocab_size >= 2, f"model.vocab_size must be >= 2, got {m.vocab_size}")
    for key in ("seq_len", "d_model", "n_layers", "n_heads"):
        _require(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    _require(m.d_model % m.n_heads == 0,
             f"model.n_heads ({m.n_heads}) must divide model.d_model ({m.d_model})")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(d.max_bytes >= 0, f"data.max_bytes must be >= 0 (0 = no limit), got {d.max_bytes}")
    _require(0.0 <= d.val_fraction <= 0.5, f"data.val_fraction must be in [0, 0.5], got {d.val_fraction}")
    _require(d.layout in LAYOUTS, f"data.layout must be one of {', '.join(LAYOUTS)}, got {d.layout!r}")
    _require(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _require(d.eval_batches >= 1, f"data.eval_batches must be >= 1, got {d.eval_batches}")
    _require(d.eval_every >= 0, f"data.eval_every must be >= 0, got {d.eval_every}")
    _require(i.lr > 0, f"inner.lr must be > 0, got {i.lr}")
    _require(i.lr <= INNER_LR_MAX, f"inner.lr = {i.lr} is absurd for AdamW (it moves every weight by up to "
             f"lr per step); allowed: 0 < inner.lr <= {INNER_LR_MAX:g}, typical 1e-4 .. 1e-3")
    _require(i.weight_decay >= 0, f"inner.weight_decay must be >= 0, got {i.weight_decay}")
    _require(i.lr * i.weight_decay < 1, f"inner.lr x inner.weight_decay = {i.lr * i.weight_decay:g} must be "
             "< 1: AdamW's decoupled decay multiplies every weight by (1 - lr x weight_decay) per step, "
             "so the weights would be zeroed or flipped; lower inner.weight_decay (typical 0.01 .. 0.1)")
    for key in ("beta1", "beta2"):
        _require(0.0 <= getattr(i, key) < 1.0, f"inner.{key} must be in [0, 1), got {getattr(i, key)}")
    _require(i.warmup_steps >= 0, f"inner.warmup_steps must be >= 0, got {i.warmup_steps}")
    _require(0.0 <= i.min_lr_ratio <= 1.0, f"inner.min_lr_ratio must be in [0, 1], got {i.min_lr_ratio}")
    _require(i.grad_clip >= 0, f"inner.grad_clip must be >= 0 (0 = off), got {i.grad_clip}")
    _validate_rounds(cfg)
    _validate_streaming(cfg)
    _validate_adapters(cfg)
    _require(c.backend in BACKENDS, f"comm.backend must be one of {', '.join(BACKENDS)}, got {c.backend!r}")
    _require(c.codec in CODEC_NAMES, f"comm.codec must be one of {', '.join(CODEC_NAMES)}, got {c.codec!r}")
    _require(c.block_size >= 1, f"comm.block_size must be >= 1, got {c.block_size}")
    check_sparse_options(c.density, c.value_bits, c.sparse_block, c.sparse_exchange)
    check_pieces(c.pieces)
    _require(not (c.codec == "sparse" and c.sparse_exchange == "gather" and c.backend == "hivemind"),
             "comm.codec = sparse needs comm.backend = torch: its exchange is an all-gather of every "
             "worker's sparse bytes (dilo/comm/gather.py), which the swarm's rounds (per-chunk owners "
             "and their missing-peer handling) do not run yet; use comm.sparse_exchange = two_phase, or int2 "
             "or fp4 with error feedback")
    _require(c.timeout > 0, f"comm.timeout must be > 0 seconds, got {c.timeout}")
    _validate_peers(cfg)
    _validate_failover(cfg)
    _validate_digest(cfg)
    _require(k.every >= 0, f"checkpoint.every must be >= 0 (0 = never), got {k.every}")
    _require(k.keep >= 1, f"checkpoint.keep must be >= 1, got {k.keep}")
    _require(not (k.resume not in ("", "fresh") and k.init_from),
             "checkpoint.resume and checkpoint.init_from exclude each other (except checkpoint.resume "
             "fresh): resume continues a run, init_from starts a new one from its weights")
    _validate_metrics(cfg)
    _validate_continual(cfg)
    _validate_shard(cfg)


def _validate_shard(cfg) -> None:
    """run.shard = fsdp: FSDP2 inside a worker, θ sharded with it (docs/islands.md, "Sharded workers")."""
    r, o = cfg.run, cfg.outer
    _require(r.shard in SHARDS, f"run.shard must be one of {', '.join(SHARDS)}, got {r.shard!r}")
    if r.shard != "fsdp":
        return
    _require(r.mode == "diloco" and r.worker_size >= 2,
             f"run.shard = fsdp shards a worker's model over its ranks: it needs run.mode = diloco and "
             f"run.worker_size >= 2 (got {r.mode}, {r.worker_size}); or leave run.shard = ddp")
    refused = {"comm.backend = hivemind (a swarm peer is one process)": cfg.comm.backend != "torch",
               "model.lora_rank > 0": cfg.model.lora_rank > 0, "model.hf_config": bool(cfg.model.hf_config),
               "outer.fragments > 1": o.fragments > 1, "outer.delay > 0": o.delay > 0,
               "outer.overlap != none": o.overlap != "none", "publish.every > 0": cfg.publish.every > 0,
               "checkpoint.init_from": bool(cfg.checkpoint.init_from),
               "checkpoint.async (shard files are written at the boundary)": cfg.checkpoint.async_}
    found = [k for k, v in refused.items() if v]
    _require(not found, f"run.shard = fsdp does not support {'; '.join(found)} yet; change those settings "
             "or use run.shard = ddp")


def _validate_digest(cfg) -> None:
    """outer.digest (dilo/global_hash.py): background only where the members are fixed."""
    check_digest(cfg.outer.digest)
    if cfg.outer.digest == "background":
        _require(cfg.comm.backend == "torch" and cfg.run.failover == "restart",
                 "outer.digest = background needs comm.backend = torch and run.failover = restart: it confirms "
                 "each state's hash one outer step later, while a swarm repairs a differing peer at the step "
                 "itself and a healing group changes members between steps; use outer.digest = step")


def _validate_failover(cfg) -> None:
    """run.failover = heal: live failover on the torch backend (docs/elastic.md)."""
    r, c, o = cfg.run, cfg.comm, cfg.outer
    _require(r.failover in FAILOVERS, f"run.failover must be one of {', '.join(FAILOVERS)}, got {r.failover!r}")
    _require(r.min_workers >= 1, f"run.min_workers must be >= 1, got {r.min_workers}")
    if r.failover != "heal":
        return
    _require(c.backend == "torch", "run.failover = heal is for comm.backend = torch (a swarm heals by itself)")
    _require(r.mode == "diloco" and r.worker_size == 1,
             "run.failover = heal needs run.mode = diloco and run.worker_size = 1 (one process per worker)")
    _require(o.overlap == "none" and o.delay == 0 and o.fragments == 1,
             "run.failover = heal redoes a failed exchange in the re-formed group, which needs every "
             "exchange to finish inside its round: leave outer.overlap = none, outer.delay = 0, outer.fragments = 1")
    _require(o.sync_every_seconds == 0 and o.target_tokens == 0,
             "run.failover = heal runs rounds of outer.inner_steps steps: a round by time or tokens is not "
             "re-agreed when the group changes yet; leave outer.sync_every_seconds and outer.target_tokens at 0")
    host, _, port = c.store.rpartition(":")
    _require(bool(host) and port.isdigit(), f"run.failover = heal needs comm.store = host:port of "
             f"`python -m dilo.rendezvous_store`, got {c.store!r}")
    _require(r.workers >= 1, f"run.failover = heal needs run.workers >= 1 (the run's worker slots), got {r.workers}")
    _require(0 <= r.slot < r.workers, f"run.slot must be in 0 .. run.workers - 1 = {r.workers - 1}, got {r.slot}")
    _require(r.min_workers <= r.workers,
             f"run.min_workers ({r.min_workers}) must be <= run.workers ({r.workers})")
    _require(c.heartbeat > 0, f"comm.heartbeat must be > 0 seconds, got {c.heartbeat}")


def _validate_continual(cfg) -> None:
    """Endless runs, watched data folders, replay, eval sets and publishing (docs/continual.md)."""
    d, p = cfg.data, cfg.publish
    _require(d.when_idle in ("wait", "repeat"), f"data.when_idle must be wait or repeat, got {d.when_idle!r}")
    _require(0.0 <= d.replay < 1.0, f"data.replay must be in [0, 1), got {d.replay}")
    _require(d.watch or d.replay == 0.0, "data.replay draws from older shards of a watched folder; "
             "set data.watch = true (and data.path to a folder), or leave data.replay at 0")
    _require(not d.watch or bool(d.path), "data.watch = true needs data.path set to a folder to watch")
    if d.watch and cfg.comm.backend == "hivemind":  # shards are agreed through the rounds
        o = cfg.outer
        _require(d.when_idle == "repeat", "data.watch with comm.backend = hivemind needs data.when_idle = "
                 "repeat: a swarm peer agrees on new shards only in a round, so it cannot wait for "
                 "data between rounds (docs/continual.md)")
        _require(o.delay == 0 and o.overlap == "none" and cfg.run.worker_size == 1,
                 "data.watch with comm.backend = hivemind needs outer.delay = 0, outer.overlap = none and "
                 "run.worker_size = 1 (new shards are taken at the round that agreed on them)")
    names = [s.split("=", 1)[0].strip() for s in cfg.eval.sets]
    for s, name in zip(cfg.eval.sets, names):
        _require("=" in s and name and s.split("=", 1)[1].strip(),
                 f"eval.sets: {s!r} must look like name=path (e.g. code=data/held_out_code)")
    _require(len(set(names)) == len(names), f"eval.sets: names must be distinct, got {names}")
    _require(p.every >= 0, f"publish.every must be >= 0 (0 = never), got {p.every}")
    _require(p.keep >= 1, f"publish.keep must be >= 1, got {p.keep}")


def _validate_finite(cfg) -> None:
    """Every number a run reads must be finite: `inf` or `nan` anywhere (e.g. `--inner.lr inf`)
    is refused by name, before the range checks (which nan would pass or confuse)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                key = f"{section.name}.{f.name.rstrip('_')}"
                raise ValueError(f"{key} must be a finite number, got {value}; set a real value "
                                 "(a very long comm.timeout or peers.linger is a large number, e.g. 1e9)")


def validate_world_size(cfg, world_size: int) -> None:
    """Refuse a run.worker_size that does not divide the number of processes (at start-up,
    before any rendezvous, so every process refuses alike)."""
    size = cfg.run.worker_size
    if cfg.run.failover == "heal" and world_size > 1:
        raise ValueError(f"run.failover = heal: every worker is a process of its own (launch/heal_worker.sh), "
                         f"not one of a torchrun world of {world_size}; start one process per run.slot")
    if cfg.comm.backend == "hivemind" and world_size > 1 and size != world_size:
        raise ValueError(
            f"comm.backend = hivemind under torchrun: the {world_size} processes form one swarm peer "
            f"(one DiLoCo worker, data-parallel inside); pass --run.worker_size {world_size}")
    if world_size % size:
        allowed = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"run.worker_size = {size} does not divide the world size {world_size} (torchrun's "
            f"nnodes x nproc-per-node); allowed values: {', '.join(map(str, allowed))}")


def _validate_peers(cfg) -> None:
    p = cfg.peers
    for key in ("initial", "listen", "announce"):
        for addr in getattr(p, key):
            _require(addr.startswith("/") and len(addr) > 1,
                     f"peers.{key}: {addr!r} is not a multiaddr (like /ip4/1.2.3.4/tcp/31337)")
    for addr in p.initial:
        _require("/p2p/" in addr, f"peers.initial: {addr!r} lacks the peer id; use the full address a "
                 "peer prints and writes to <run.dir>/address.txt (/ip4/.../tcp/.../p2p/12D3Koo...)")
    for addr in p.announce:
        _require("/tcp/0/" not in addr + "/", f"peers.announce: {addr!r} needs an explicit port, not 0")
    _require(p.min_peers >= 1, f"peers.min_peers must be >= 1, got {p.min_peers}")
    _require(p.heartbeat > 0, f"peers.heartbeat must be > 0 seconds, got {p.heartbeat}")
    _require(p.linger >= 0, f"peers.linger must be >= 0 seconds, got {p.linger}")
    _require(p.num_shards >= 1, f"peers.num_shards must be >= 1, got {p.num_shards}")
    _require(p.shard == -1 or 0 <= p.shard < p.num_shards,
             f"peers.shard must be -1 (auto) or in [0, peers.num_shards={p.num_shards}), got {p.shard}")
    if cfg.comm.backend == "hivemind":
        _require(cfg.run.mode == "diloco", "comm.backend = hivemind needs run.mode = diloco "
                 "(a swarm exchanges pseudo-gradients, not every step's gradients)")
        _require(cfg.run.steps % cfg.outer.inner_steps == 0,
                 f"comm.backend = hivemind needs run.steps ({cfg.run.steps}) to be a multiple of "
                 f"outer.inner_steps ({cfg.outer.inner_steps}): every peer ends at the same outer step")
        _require(not cfg.checkpoint.resume, "checkpoint.resume is not available with comm.backend = "
                 "hivemind: a peer rejoins from the live swarm's state; to restart a whole swarm "
                 "from saved weights use checkpoint.init_from")


def parse_slowdown(text: str) -> dict[int, float]:
    """`run.slowdown` ("worker:factor[,worker:factor]") as {worker: factor}; ValueError if malformed."""
    out: dict[int, float] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        worker, _, factor = item.partition(":")
        try:
            w, f = int(worker), float(factor)
        except ValueError:
            raise ValueError(f"run.slowdown: {item!r} must look like worker:factor, e.g. 1:2 (worker 1 at "
                             "half speed)") from None
        _require(w >= 0 and math.isfinite(f) and f >= 1.0, f"run.slowdown: {item!r} needs a worker index >= 0 "
                 "and a factor >= 1 (1 = full speed, 2 = half speed)")
        out[w] = f
    return out


def _validate_rounds(cfg) -> None:
    """How rounds end (exactly one of H, T, target_tokens) and what time or token rounds need
    (docs/uneven.md)."""
    o, r = cfg.outer, cfg.run
    parse_slowdown(r.slowdown)
    _require(o.sync_every_seconds >= 0, f"outer.sync_every_seconds must be >= 0 (0 = off), got {o.sync_every_seconds}")
    _require(o.target_tokens >= 0, f"outer.target_tokens must be >= 0 (0 = off), got {o.target_tokens}")
    chosen = [k for k, on in (("outer.inner_steps", o.inner_steps != 0), ("outer.sync_every_seconds",
                              o.sync_every_seconds > 0), ("outer.target_tokens", o.target_tokens > 0)) if on]
    _require(bool(chosen), f"outer.inner_steps (H) must be >= 1 (got {o.inner_steps}), or 0 with "
             "outer.sync_every_seconds (T) or outer.target_tokens set: one of the three ends the rounds")
    _require(len(chosen) == 1, "exactly one of outer.inner_steps (H), outer.sync_every_seconds (T) and "
             f"outer.target_tokens ends the rounds; {' and '.join(chosen)} set"
             + ("; with T or target_tokens set outer.inner_steps = 0" if "outer.inner_steps" in chosen else ""))
    if o.inner_steps != 0:
        return
    key = chosen[0]
    _require(r.mode == "diloco", f"{key} needs run.mode = diloco (data-parallel all-reduces every step)")
    _require(cfg.comm.backend == "torch", f"{key} is not available with comm.backend = hivemind yet: a swarm's "
             "peers meet by outer step and must end at the same one; use outer.inner_steps there")
    _require(r.worker_size == 1, f"{key} needs run.worker_size = 1: the ranks of an island take their inner "
             "steps together and would have to agree on every step whether the round is over")
    _require(o.fragments == 1 and o.delay == 0 and o.overlap == "none",
             f"{key} needs outer.fragments = 1, outer.delay = 0 and outer.overlap = none: streaming and "
             "overlap place their exchanges at fixed inner steps of a round of H steps")


def _validate_streaming(cfg) -> None:
    """The outer loop's options, with streaming, overlap and error feedback (docs/streaming.md):
    the rules DiLoCo itself applies (dilo/options.py), then those that need the rest of the config."""
    o, c = cfg.outer, cfg.comm
    check_outer_options(inner_steps=o.inner_steps, outer_lr=o.lr, outer_momentum=o.momentum, nesterov=o.nesterov,
                        fragments=o.fragments, delay=o.delay, alpha=o.alpha, overlap=o.overlap,
                        error_feedback=c.error_feedback, codec=c.codec, ef_decay=c.ef_decay)
    _require(o.lr <= OUTER_LR_MAX, f"outer.lr = {o.lr} is absurd: it scales the averaged pseudo-gradient "
             f"(DiLoCo uses 0.7, published sweeps <= ~2); allowed: 0 < outer.lr <= {OUTER_LR_MAX:g}")
    check_aggregate(o.aggregate, o.trim, o.clip_ratio, open_membership=c.backend == "hivemind", weighting=o.weighting)
    check_owner_feedback(c.owner_feedback, error_feedback=c.error_feedback, codec=c.codec,
                         exchange=c.sparse_exchange if c.codec == "sparse" else "two_phase")
    _require(not (c.owner_feedback and cfg.run.worker_size > 1),
             "comm.owner_feedback does not reach islands yet (run.worker_size > 1): their exchanging ranks "
             "do not hand the owner's error to the worker's processes")
    _require(not (o.weighting == "tokens" and c.codec == "sparse" and c.sparse_exchange == "gather"),
             "outer.weighting = tokens does not reach the sparse codec's all-gather exchange (it carries no round "
             "reports); use comm.sparse_exchange = two_phase or outer.weighting = equal")
    _require(o.fragments <= cfg.model.n_layers,
             f"outer.fragments ({o.fragments}) must be <= model.n_layers ({cfg.model.n_layers}): "
             "fragments are strided over the transformer blocks")
    if cfg.run.mode != "diloco":
        changed = [key for key, on in (("outer.fragments", o.fragments != 1), ("outer.delay", o.delay != 0),
                                       ("outer.alpha", o.alpha != 0.0), ("outer.overlap", o.overlap != "none"),
                                       ("comm.error_feedback", c.error_feedback),
                                       ("comm.owner_feedback", c.owner_feedback),
                                       ("outer.weighting", o.weighting != "equal")) if on]
        _require(not changed, f"{', '.join(changed)} only apply to run.mode = diloco, not {cfg.run.mode!r}")


def lora_targets(model) -> list[str]:
    """`model.lora_targets` as a list (its default filled in for the model kind)."""
    text = model.lora_targets or ("q_proj,v_proj" if model.hf_config else "qkv,proj")
    return [t.strip() for t in text.split(",") if t.strip()]


def _validate_adapters(cfg) -> None:
    """model.lora_*, model.hf_config and outer.lora_aggregate (docs/adapters.md)."""
    m, o = cfg.model, cfg.outer
    _require(m.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = no adapters), got {m.lora_rank}")
    _require(m.lora_alpha > 0, f"model.lora_alpha must be > 0, got {m.lora_alpha}")
    _require(o.lora_aggregate in LORA_AGGREGATES, f"outer.lora_aggregate must be one of "
             f"{', '.join(LORA_AGGREGATES)}, got {o.lora_aggregate!r}")
    targets = lora_targets(m)
    _require(bool(targets), f"model.lora_targets names no layer: {m.lora_targets!r}")
    if not m.hf_config:
        bad = [t for t in targets if t not in LORA_TARGETS]
        _require(not bad, f"model.lora_targets must be a comma-separated subset of {', '.join(LORA_TARGETS)} "
                 f"for dilo's GPT; {', '.join(bad)} is not")
    if m.lora_rank == 0:
        _require(o.lora_aggregate == "naive" and not m.lora_targets,
                 "outer.lora_aggregate and model.lora_targets only apply with model.lora_rank > 0")
    if m.hf_config:
        _require(m.hf_config.endswith(".json"), f"model.hf_config must be a transformers config.json file, "
                 f"got {m.hf_config!r}")
    if o.lora_aggregate != "exact":
        return
    _require(cfg.run.mode == "diloco" and cfg.comm.backend == "torch",
             "outer.lora_aggregate = exact needs run.mode = diloco and comm.backend = torch (a fixed group: "
             "every worker folds every worker's adapters into its base)")
    _require(o.fragments == 1 and o.delay == 0 and o.overlap == "none" and o.alpha == 0.0,
             "outer.lora_aggregate = exact needs outer.fragments = 1, delay = 0, overlap = none, alpha = 0")
    _require(cfg.run.worker_size == 1, "outer.lora_aggregate = exact needs run.worker_size = 1")


def _validate_metrics(cfg) -> None:
    x = cfg.metrics
    _require(0 <= x.port <= 65535, f"metrics.port must be a TCP port in 1..65535, or 0 for no "
             f"Prometheus endpoint; got {x.port}")
    _require(bool(x.host.strip()), "metrics.host must be an address to listen on, e.g. 127.0.0.1 "
             "(this machine only) or 0.0.0.0 (every interface)")
    _require(x.log_every >= 1, f"metrics.log_every must be >= 1, got {x.log_every}")
    _require(x.progress in ("auto", "on", "off"), f"metrics.progress must be auto, on or off, got {x.progress!r}")
