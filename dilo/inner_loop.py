"""What a worker's inner steps need besides the model: its data, the LR schedule, evaluation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dilo.config import Config
from dilo.comm.protocol import Group
from dilo.data import ShardedBatches, check_vocab, eval_batches, load_tokens
from dilo.data_stream import WatchedBatches


def load_data(cfg: Config, shard: int, num_shards: int, worker_size: int, group: Group | None = None,
              stop_requested=lambda: False) -> tuple[ShardedBatches | WatchedBatches, list]:
    """The worker's training batches (shard `shard` of `num_shards`) and the evaluation set.

    With data.watch the batches come from a watched folder (dilo/data_stream.py), agreed on
    through `group` (the world group); `stop_requested` ends a wait for the first shard.
    """
    if cfg.data.watch:
        d = cfg.data
        batches = WatchedBatches(d.path, group, shard, num_shards, d.batch_size * worker_size,
                                 cfg.model.seq_len, d.val_fraction, d.replay, d.when_idle,
                                 cfg.run.seed, cfg.model.vocab_size, stop_requested, layout=d.layout)
        return batches, batches.eval_set(d.batch_size, d.eval_batches)
    train_tokens, val_tokens = load_tokens(cfg.data.path, cfg.data.max_bytes, cfg.data.val_fraction)
    check_vocab({"training": train_tokens, "validation": val_tokens}, cfg.model.vocab_size)
    # The worker reads its shard with worker_size x data.batch_size rows per step; its
    # rank r trains on rows r, r + S, r + 2S, ... (Trainer.next_batch). A worker of S
    # ranks thus sees exactly the stream of a one-process worker with S times the batch,
    # and the position (batch_index) is the same on all its ranks.
    batches = ShardedBatches(train_tokens, shard, num_shards, cfg.data.batch_size * worker_size,
                             cfg.model.seq_len, layout=cfg.data.layout, seed=cfg.run.seed)
    evaluation = eval_batches(val_tokens if len(val_tokens) else train_tokens,
                              cfg.data.batch_size, cfg.model.seq_len, cfg.data.eval_batches)
    return batches, evaluation


def load_eval_sets(cfg: Config) -> dict[str, list]:
    """eval.sets: name -> fixed batches over the whole of that set (identical on every worker)."""
    out = {}
    for item in cfg.eval.sets:
        name, path = (part.strip() for part in item.split("=", 1))
        try:
            tokens, _ = load_tokens(path, cfg.data.max_bytes, 0.0)
        except ValueError as e:
            raise ValueError(f"eval.sets {name}: {e}") from None
        if int(tokens.max()) >= cfg.model.vocab_size:
            raise ValueError(f"eval.sets {name}: {path} holds token id {int(tokens.max())} but "
                             f"model.vocab_size is {cfg.model.vocab_size}; raise model.vocab_size")
        out[name] = eval_batches(tokens, cfg.data.batch_size, cfg.model.seq_len, cfg.data.eval_batches)
    return out


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup to inner.lr, then cosine decay to inner.min_lr_ratio * inner.lr.

    An endless run (run.steps = 0) has no end to decay to: warmup, then inner.lr for
    ever (a constant schedule keeps the model as plastic for the hundredth shard as for
    the first; docs/continual.md).
    """
    peak, warmup, total = cfg.inner.lr, cfg.inner.warmup_steps, cfg.run.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if total == 0:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * cfg.inner.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: torch.device) -> float:
    model.eval()
    losses = [model(x.to(device), y.to(device)).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)
