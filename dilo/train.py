"""The training loop: one process = one DiLoCo worker (or one data-parallel rank).

    torchrun --nproc-per-node 4 -m dilo.train --config configs/tiny.toml
    python -m dilo.train --config configs/tiny.toml          # a single worker

Reads top to bottom: config → process group → model, data, inner optimizer →
DiLoCo (or DDP) → resume → inner steps, outer steps, checkpoints, metrics → summary.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from dilo import checkpoint
from dilo.comm.torch_dist import TorchGroup, init_default_group, launched_by_torchrun
from dilo.comm.protocol import SoloGroup
from dilo.config import Config, parse_args
from dilo.data import ShardedBatches, eval_batches, load_tokens
from dilo.diloco import DiLoCo, SyncStats
from dilo.metrics import Metrics
from dilo.model import GPT, param_groups

log = logging.getLogger("dilo")


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup to inner.lr, then cosine decay to inner.min_lr_ratio * inner.lr."""
    peak, warmup, total = cfg.inner.lr, cfg.inner.warmup_steps, cfg.run.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * cfg.inner.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: torch.device) -> float:
    model.eval()
    losses = [model(x.to(device), y.to(device)).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def params_hash(model: nn.Module, step: int) -> str:
    """Global hash for data-parallel mode: the (replicated) parameters and the step."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to("cpu", torch.float32).numpy().tobytes())
    h.update(step.to_bytes(8, "little"))
    return h.hexdigest()


def setup_logging(is_leader: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_leader else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = cuda but no CUDA device is visible; use run.device = cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Trainer:
    """State and steps of one worker; `run()` is the whole training."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.start_time = time.time()
        distributed = launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = pick_device(cfg, self.local_rank)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // local_world))
        if distributed:
            init_default_group(cfg.comm.timeout, self.device.type == "cuda")
        self.worker = dist.get_rank() if distributed else 0
        self.num_workers = dist.get_world_size() if distributed else 1
        setup_logging(self.worker == 0)

        train_tokens, val_tokens = load_tokens(cfg.data.path, cfg.data.max_bytes, cfg.data.val_fraction)
        if int(train_tokens.max()) >= cfg.model.vocab_size:
            raise ValueError(f"data.path holds token id {int(train_tokens.max())} but model.vocab_size "
                             f"is {cfg.model.vocab_size}; raise model.vocab_size")
        self.batches = ShardedBatches(train_tokens, self.worker, self.num_workers,
                                      cfg.data.batch_size, cfg.model.seq_len)
        self.eval_set = eval_batches(val_tokens if len(val_tokens) else train_tokens,
                                     cfg.data.batch_size, cfg.model.seq_len, cfg.data.eval_batches)

        torch.manual_seed(cfg.run.seed)  # the same initial model on every worker
        random.seed(cfg.run.seed + self.worker)
        self.model = GPT(cfg.model).to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.inner.weight_decay), lr=cfg.inner.lr,
            betas=(cfg.inner.beta1, cfg.inner.beta2), fused=False, foreach=False)
        self.diloco: DiLoCo | None = None
        self.ddp: nn.Module | None = None
        if cfg.run.mode == "diloco":
            # DiLoCo gets a process group of its own (created by every rank, here, in the same
            # order): its exchanges may run on a background thread, and collectives on one
            # group must never interleave between threads (see dilo/overlap.py).
            group = SoloGroup()
            if distributed:
                timeout = datetime.timedelta(seconds=cfg.comm.timeout)
                group = TorchGroup(dist.new_group(backend="gloo", timeout=timeout))
            self.diloco = DiLoCo(self.model, self.optimizer, inner_steps=cfg.outer.inner_steps,
                                 outer_lr=cfg.outer.lr, outer_momentum=cfg.outer.momentum,
                                 nesterov=cfg.outer.nesterov, codec=cfg.comm.codec, group=group,
                                 block_size=cfg.comm.block_size, fragments=cfg.outer.fragments,
                                 delay=cfg.outer.delay, alpha=cfg.outer.alpha,
                                 overlap=cfg.outer.overlap, error_feedback=cfg.comm.error_feedback)
        elif distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.totals = {"bytes_sent": 0, "bytes_received": 0, "syncs": 0, "sync_seconds": 0.0,
                       "dropped": 0, "peak_sync_bytes": 0, "sync_seconds_hidden": 0.0,
                       "sync_seconds_exposed": 0.0}

        port = cfg.metrics.port + self.local_rank if cfg.metrics.port else 0
        show = {"on": True, "off": False, "auto": None}[cfg.metrics.progress] if self.worker == 0 else False
        self.metrics = Metrics(cfg.run.dir, self.worker, port=port, total_steps=cfg.run.steps,
                               progress=show)
        self.metrics.log("event", event="start", workers=self.num_workers, mode=cfg.run.mode,
                         config=cfg.to_dict(), fingerprint=cfg.fingerprint(),
                         synced_params=self.diloco.numel if self.diloco else self.model.num_params())

    # -- state --------------------------------------------------------------------------
    @property
    def outer_step(self) -> int:
        return self.diloco.outer_step if self.diloco else self.step // self.cfg.outer.inner_steps

    def global_hash(self) -> str:
        return self.diloco.global_hash() if self.diloco else params_hash(self.model, self.step)

    def state_dict(self) -> dict:
        state = {
            "fingerprint": self.cfg.fingerprint(),
            "config": self.cfg.to_dict(),
            "num_workers": self.num_workers,
            "step": self.step,
            "data": self.batches.state_dict(),
            "totals": dict(self.totals),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        if self.diloco:
            state["diloco"] = self.diloco.state_dict()
            synced = {id(p) for p in self.diloco.params}
            state["model_rest"] = {k: v for k, v in self.model.state_dict(keep_vars=True).items()
                                   if id(v) not in synced}
        else:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict, source: str) -> None:
        if state["fingerprint"] != self.cfg.fingerprint():
            raise ValueError(f"{source} was written with different model/outer/codec settings "
                             f"(fingerprint {state['fingerprint']} vs {self.cfg.fingerprint()}); "
                             "resume with the run's original config")
        if state["num_workers"] != self.num_workers:
            raise ValueError(f"{source} was written by {state['num_workers']} workers, this run has "
                             f"{self.num_workers}; an exact resume needs the same number of workers")
        self.step = int(state["step"])
        self.batches.load_state_dict(state["data"])
        self.totals.update(state["totals"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if self.diloco:
            self.model.load_state_dict({k: v for k, v in state["model_rest"].items()}, strict=False)
            self.diloco.load_state_dict(state["diloco"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])

    def resume(self) -> None:
        """Apply checkpoint.resume / checkpoint.init_from before the first step."""
        cfg = self.cfg.checkpoint
        if cfg.init_from:
            path = checkpoint.resolve_init_from(cfg.init_from)
            state = checkpoint.read_verified(path)
            if "diloco" in state:
                flat = state["diloco"]["global_params"]
                if self.diloco:
                    self.diloco.load_global_params(flat)
                else:
                    raise ValueError("checkpoint.init_from from a DiLoCo run needs run.mode = diloco")
            else:
                self.model.load_state_dict(state["model"])
            log.info("initialised weights from %s (new run: fresh optimizers, schedule, data)", path)
            return
        if not cfg.resume:
            existing = checkpoint.list_steps(self.cfg.run.dir)
            if existing:
                raise ValueError(f"run.dir {self.cfg.run.dir} already holds checkpoints (newest: step "
                                 f"{existing[-1]}); pass --checkpoint.resume auto to continue it, or "
                                 "choose another run.dir")
            return
        if cfg.resume == "auto":
            mine = checkpoint.valid_steps(self.cfg.run.dir, self.worker)
            everyone = [mine] if self.num_workers == 1 else self.all_gather(mine)
            step = checkpoint.newest_common_step(everyone)
            if step is None:
                log.info("checkpoint.resume = auto: no checkpoint in %s, starting fresh", self.cfg.run.dir)
                return
            path = checkpoint.worker_file(checkpoint.step_dir(self.cfg.run.dir, step), self.worker)
        else:
            path = checkpoint.worker_file(Path(cfg.resume), self.worker)
        self.load_state_dict(checkpoint.read_verified(path), str(path))
        log.info("resumed from %s at inner step %d, outer step %d", path, self.step, self.outer_step)
        self.metrics.log("event", event="resume", path=str(path), step=self.step, outer_step=self.outer_step)

    def all_gather(self, obj: object) -> list:
        out: list = [None] * self.num_workers
        dist.all_gather_object(out, obj)
        return out

    # -- steps --------------------------------------------------------------------------
    def inner_step(self) -> float:
        lr = lr_at(self.cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batches.next_batch()
        net = self.ddp or self.model
        loss = net(x.to(self.device), y.to(self.device))
        loss.backward()
        if self.cfg.inner.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.inner.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()

    def after_sync(self, stats: SyncStats, loss: float) -> None:
        t = self.totals
        t["bytes_sent"] += stats.bytes_sent
        t["bytes_received"] += stats.bytes_received
        t["syncs"] += 1
        t["sync_seconds"] += stats.seconds
        t["dropped"] += stats.dropped
        t["peak_sync_bytes"] = max(t["peak_sync_bytes"], stats.bytes_sent)
        t["sync_seconds_hidden"] += stats.seconds_hidden
        t["sync_seconds_exposed"] += stats.seconds_exposed
        self.metrics.log("sync", step=self.step, outer_step=stats.outer_step, loss=loss,
                         fragment=stats.fragment, seconds=stats.seconds,
                         seconds_hidden=stats.seconds_hidden, seconds_exposed=stats.seconds_exposed,
                         bytes_sent=stats.bytes_sent,
                         bytes_received=stats.bytes_received, peers=stats.num_peers,
                         global_hash=stats.global_hash, dropped=stats.dropped,
                         codec_error=stats.codec_error, pseudo_grad_norm=stats.pseudo_grad_norm)
        if stats.dropped:
            self.metrics.count("dropped_contributions", stats.dropped)
        log.info("outer %d | step %d | fragment %d | loss %.4f | sent %s recv %s | %.3f s "
                 "(%.3f s hidden) | peers %d | hash %s",
                 stats.outer_step, self.step, stats.fragment, loss, _mb(stats.bytes_sent),
                 _mb(stats.bytes_received), stats.seconds, stats.seconds_hidden, stats.num_peers,
                 stats.global_hash[:12])

    def ddp_round(self) -> None:
        """Data-parallel bookkeeping at the outer-step cadence: ring all-reduce traffic."""
        if self.num_workers > 1:
            numel = self.model.num_params()
            per_step = 2 * (self.num_workers - 1) * 4 * math.ceil(numel / self.num_workers)
            self.totals["bytes_sent"] += per_step * self.cfg.outer.inner_steps
            self.totals["bytes_received"] += per_step * self.cfg.outer.inner_steps

    def save_checkpoint(self) -> None:
        path = checkpoint.save(self.cfg.run.dir, self.worker, self.outer_step, self.state_dict(),
                               self.cfg.checkpoint.keep)
        self.metrics.log("event", event="checkpoint", path=str(path), outer_step=self.outer_step)

    def run(self) -> dict:
        cfg = self.cfg
        self.resume()
        tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
        window_start, window_steps = time.perf_counter(), 0
        while self.step < cfg.run.steps:
            loss = self.inner_step()
            window_steps += 1
            synced = False
            if self.diloco:
                stats = [self.diloco.step()]
                if self.step == cfg.run.steps:
                    stats += self.diloco.flush()  # every worker ends on the global θ
                for s in stats:
                    if s is not None:
                        self.after_sync(s, loss)
                        synced = True
            elif self.step % cfg.outer.inner_steps == 0:
                self.ddp_round()
                synced = True
            if self.step % cfg.metrics.log_every == 0 or synced:
                elapsed = time.perf_counter() - window_start
                tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                self.metrics.log("inner", step=self.step, outer_step=self.outer_step, loss=loss,
                                 lr=lr_at(cfg, self.step - 1), tokens=window_steps * tokens_per_step,
                                 tokens_per_s=tok_s)
                self.metrics.progress(self.step, loss=loss, tok_per_s=tok_s, outer=self.outer_step)
                window_start, window_steps = time.perf_counter(), 0
            if synced:
                if cfg.data.eval_every and self.outer_step % cfg.data.eval_every == 0:
                    self.metrics.log("eval", step=self.step, outer_step=self.outer_step,
                                     eval_loss=evaluate(self.model, self.eval_set, self.device))
                if cfg.checkpoint.every and (self.outer_step % cfg.checkpoint.every == 0
                                             or self.step == cfg.run.steps):
                    self.save_checkpoint()
        return self.finish()

    def finish(self) -> dict:
        eval_loss = evaluate(self.model, self.eval_set, self.device)
        self.metrics.log("eval", step=self.step, outer_step=self.outer_step, eval_loss=eval_loss)
        summary = {
            "worker": self.worker,
            "num_workers": self.num_workers,
            "mode": self.cfg.run.mode,
            "codec": self.cfg.comm.codec if self.diloco else "fp32",
            "outer_steps": self.outer_step,
            "inner_steps": self.step,
            "tokens": self.batches.tokens_consumed,
            "final_eval_loss": eval_loss,
            "wall_seconds": time.time() - self.start_time,
            "bytes_sent": self.totals["bytes_sent"],
            "bytes_received": self.totals["bytes_received"],
            "bytes_are_estimated": self.diloco is None,
            "sync_seconds": self.totals["sync_seconds"],
            "sync_seconds_hidden": self.totals["sync_seconds_hidden"],
            "sync_seconds_exposed": self.totals["sync_seconds_exposed"],
            "peak_sync_bytes": self.totals["peak_sync_bytes"],
            "fragments": self.cfg.outer.fragments,
            "overlap": self.cfg.outer.overlap,
            "error_feedback": self.cfg.comm.error_feedback,
            "dropped_contributions": self.totals["dropped"],
            "synced_params": self.diloco.numel if self.diloco else self.model.num_params(),
            "global_hash": self.global_hash(),
            "fingerprint": self.cfg.fingerprint(),
        }
        self.metrics.write_summary(summary)
        log.info("done: eval loss %.4f after %d inner steps (%d outer), %.1f s, sent %s, hash %s",
                 eval_loss, self.step, self.outer_step, summary["wall_seconds"],
                 _mb(summary["bytes_sent"]), summary["global_hash"][:12])
        return summary

    def close(self) -> None:
        if self.diloco:
            self.diloco.close()
        self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"dilo: config error: {e}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.run()
    except ValueError as e:  # user mistakes found after parsing (data path, checkpoint, ...)
        print(f"dilo: error: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
