"""The checks a configuration passes before anything starts (`validate`), and the one
that needs the world size (`validate_world_size`, at start-up, before any rendezvous).

Each refusal is a ValueError that names the key, the value and what is allowed. The
outer loop's own options are checked by dilo/options.py, the same code `dilo.DiLoCo`
runs, so the CLI and the library refuse alike. `cfg` is a `dilo.config.Config`; this
module reads it by attribute and does not import dilo.config (which imports it).
"""

from __future__ import annotations

from dilo.options import CODEC_NAMES, check_aggregate, check_outer_options

MODES = ("diloco", "ddp")
BACKENDS = ("torch", "hivemind")
DEVICES = ("auto", "cpu", "cuda")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg) -> None:
    """Refuse impossible settings before anything starts."""
    r, m, d, i, o, c, k, x = (cfg.run, cfg.model, cfg.data, cfg.inner, cfg.outer, cfg.comm,
                              cfg.checkpoint, cfg.metrics)
    _require(r.mode in MODES, f"run.mode must be one of {', '.join(MODES)}, got {r.mode!r}")
    _require(r.device in DEVICES, f"run.device must be one of {', '.join(DEVICES)}, got {r.device!r}")
    _require(r.steps >= 1, f"run.steps must be >= 1, got {r.steps}")
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
    _require(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _require(d.eval_batches >= 1, f"data.eval_batches must be >= 1, got {d.eval_batches}")
    _require(d.eval_every >= 0, f"data.eval_every must be >= 0, got {d.eval_every}")
    _require(i.lr > 0, f"inner.lr must be > 0, got {i.lr}")
    _require(i.weight_decay >= 0, f"inner.weight_decay must be >= 0, got {i.weight_decay}")
    for key in ("beta1", "beta2"):
        _require(0.0 <= getattr(i, key) < 1.0, f"inner.{key} must be in [0, 1), got {getattr(i, key)}")
    _require(i.warmup_steps >= 0, f"inner.warmup_steps must be >= 0, got {i.warmup_steps}")
    _require(0.0 <= i.min_lr_ratio <= 1.0, f"inner.min_lr_ratio must be in [0, 1], got {i.min_lr_ratio}")
    _require(i.grad_clip >= 0, f"inner.grad_clip must be >= 0 (0 = off), got {i.grad_clip}")
    _validate_streaming(cfg)
    _require(c.backend in BACKENDS, f"comm.backend must be one of {', '.join(BACKENDS)}, got {c.backend!r}")
    _require(c.codec in CODEC_NAMES, f"comm.codec must be one of {', '.join(CODEC_NAMES)}, got {c.codec!r}")
    _require(c.block_size >= 1, f"comm.block_size must be >= 1, got {c.block_size}")
    _require(c.timeout > 0, f"comm.timeout must be > 0 seconds, got {c.timeout}")
    _validate_peers(cfg)
    _require(k.every >= 0, f"checkpoint.every must be >= 0 (0 = never), got {k.every}")
    _require(k.keep >= 1, f"checkpoint.keep must be >= 1, got {k.keep}")
    _require(not (k.resume and k.init_from),
             "checkpoint.resume and checkpoint.init_from exclude each other: resume continues a run, "
             "init_from starts a new one from its weights")
    _validate_metrics(cfg)


def validate_world_size(cfg, world_size: int) -> None:
    """Refuse a run.worker_size that does not divide the number of processes (at start-up,
    before any rendezvous, so every process refuses alike)."""
    size = cfg.run.worker_size
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


def _validate_streaming(cfg) -> None:
    """The outer loop's options, with streaming, overlap and error feedback (docs/streaming.md):
    the rules DiLoCo itself applies (dilo/options.py), then those that need the rest of the config."""
    o, c = cfg.outer, cfg.comm
    check_outer_options(inner_steps=o.inner_steps, outer_lr=o.lr, outer_momentum=o.momentum, nesterov=o.nesterov,
                        fragments=o.fragments, delay=o.delay, alpha=o.alpha, overlap=o.overlap,
                        error_feedback=c.error_feedback, codec=c.codec)
    check_aggregate(o.aggregate, o.trim, o.clip_ratio, open_membership=c.backend == "hivemind")
    _require(o.fragments <= cfg.model.n_layers,
             f"outer.fragments ({o.fragments}) must be <= model.n_layers ({cfg.model.n_layers}): "
             "fragments are strided over the transformer blocks")
    if cfg.run.mode != "diloco":
        changed = [key for key, on in (("outer.fragments", o.fragments != 1), ("outer.delay", o.delay != 0),
                                       ("outer.alpha", o.alpha != 0.0), ("outer.overlap", o.overlap != "none"),
                                       ("comm.error_feedback", c.error_feedback)) if on]
        _require(not changed, f"{', '.join(changed)} only apply to run.mode = diloco, not {cfg.run.mode!r}")


def _validate_metrics(cfg) -> None:
    x = cfg.metrics
    _require(0 <= x.port <= 65535, f"metrics.port must be a TCP port in 1..65535, or 0 for no "
             f"Prometheus endpoint; got {x.port}")
    _require(bool(x.host.strip()), "metrics.host must be an address to listen on, e.g. 127.0.0.1 "
             "(this machine only) or 0.0.0.0 (every interface)")
    _require(x.log_every >= 1, f"metrics.log_every must be >= 1, got {x.log_every}")
    _require(x.progress in ("auto", "on", "off"), f"metrics.progress must be auto, on or off, got {x.progress!r}")
