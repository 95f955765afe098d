"""A liar for chaos and robustness runs: one worker sends poisoned pseudo-gradients.

    # one process per worker under torchrun; the process of global rank 1 lies from the start
    python -m torch.distributed.run --nproc-per-node 4 tools/poison.py --poison scaled \\
        --poison-worker 1 -- --config configs/tiny.toml --run.dir runs/liar
    # a one-process run (the liar is then rank 0)
    python tools/poison.py --poison nan -- --config configs/tiny.toml ...

Kinds (`KINDS`), applied to the worker's pseudo-gradient Δ = θ − live of every fragment
it snapshots, before error feedback adds its residual and before anything is encoded:

  scaled   Δ × 1000
  sign     Δ × −10 (sign-flipped and amplified)
  noise    Δ + Gaussian noise whose norm is 100 × ‖Δ‖ (seeded: the same run lies the same)
  inf      every element +Inf
  nan      every element NaN

This is a test harness, never production code: it monkeypatches
`dilo.fragments.Fragment.compensate` (where a worker's Δ becomes what it sends) in the
chosen process only, then runs `dilo.train.main`. Each poisoned round appends one JSON
line (time, rank, kind, fragment, round, norm of Δ before and after) to
`<run.dir>/poison-<rank>.jsonl`; tools/chaos_report.py counts them as `poisoned_rounds`.

Under tools/chaos.py the workers are started by torchrun's elastic agents as
`-m dilo.train`, so the hook comes in through `tools/poison_site/sitecustomize.py` (on
PYTHONPATH): it calls `install_from_env()`, which lies only once the chaos harness has
written the trigger file named by DILO_POISON_FILE (`{"kind": ..., "rank": ...}`), and only
in the process of that rank (ranks are re-assigned at every elastic restart: the liar is
whoever holds that rank).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

KINDS = ("scaled", "sign", "noise", "inf", "nan")
SCALE, SIGN, NOISE = 1000.0, -10.0, 100.0


def poisoned(kind: str, delta: torch.Tensor, seed: int) -> torch.Tensor:
    """The lie told instead of `delta` (a new tensor; `delta` is untouched)."""
    if kind == "scaled":
        return delta * SCALE
    if kind == "sign":
        return delta * SIGN
    if kind == "noise":
        noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed), dtype=delta.dtype)
        return delta + noise * (NOISE * delta.norm() / noise.norm().clamp_min(1e-30))
    if kind == "inf":
        return torch.full_like(delta, math.inf)
    if kind == "nan":
        return torch.full_like(delta, math.nan)
    raise ValueError(f"poison kind must be one of {', '.join(KINDS)}, got {kind!r}")


class Liar:
    """Decides, per round, whether and how this process lies, and logs each lie."""

    def __init__(self, rank: int, log_dir: Path, kind: str = "", trigger: Path | None = None):
        self.rank, self.log_dir, self.kind, self.trigger = rank, log_dir, kind, trigger
        self.rounds = 0

    def current_kind(self) -> str:
        if self.trigger is None:
            return self.kind
        try:
            order = json.loads(self.trigger.read_text())
        except (OSError, ValueError):  # not triggered yet (or being written)
            return ""
        return order["kind"] if int(order["rank"]) == self.rank else ""

    def __call__(self, delta: torch.Tensor, fragment: int) -> torch.Tensor:
        kind = self.current_kind()
        if not kind:
            return delta
        lie = poisoned(kind, delta, seed=1000 * self.rank + self.rounds)
        self.rounds += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"poison-{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "rank": self.rank, "kind": kind,
                                "fragment": fragment, "round": self.rounds - 1, "norm": float(delta.norm()),
                                "poisoned_norm": float(lie.norm())}) + "\n")
        return lie


def install(liar: Liar) -> None:
    """Route every fragment's Δ of this process through `liar` (before error feedback)."""
    from dilo import fragments

    original = fragments.Fragment.compensate
    if getattr(original, "_dilo_poison", False):
        return

    def compensate(self, pseudo_grad, codec):
        return original(self, liar(pseudo_grad, self.index), codec)

    compensate._dilo_poison = True
    fragments.Fragment.compensate = compensate


def _run_dir(argv: list[str]) -> Path:
    from dilo.config import parse_args

    return Path(parse_args(argv).run.dir)


def install_from_env() -> None:
    """The chaos harness's hook (sitecustomize): a worker process of torchrun (RANK set) lies
    once the trigger file DILO_POISON_FILE names its rank."""
    trigger = os.environ.get("DILO_POISON_FILE")
    if not trigger or "RANK" not in os.environ:
        return
    install(Liar(int(os.environ["RANK"]), Path(trigger).parent, trigger=Path(trigger)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description="Run dilo.train with one lying worker (test harness). "
                                "Options after -- go to dilo.train.")
    p.add_argument("--poison", required=True, choices=KINDS, help="how the worker lies")
    p.add_argument("--poison-worker", type=int, default=0, help="global rank of the liar (default 0)")
    args = p.parse_args(argv[:cut])
    train_args = argv[cut + 1:]
    rank = int(os.environ.get("RANK", "0"))
    if rank == args.poison_worker:
        install(Liar(rank, _run_dir(train_args), kind=args.poison))
    from dilo.train import main as train

    sys.argv = [sys.argv[0], *train_args]
    return train(train_args)


if __name__ == "__main__":
    sys.exit(main())
