"""A swarm peer that crashes mid-exchange: `dilo train` with a fault injected, for tests and tools.

    python -m tools.swarm_fault_peer --kill-at ROUND:PHASE <dilo train arguments>

In round ROUND, phase PHASE (1: the contributions, 2: the averaged chunks) this peer
delivers its slice to exactly one other member of the group (the lowest rank) and then
SIGKILLs itself: a crash in the middle of an exchange, with one survivor holding this
peer's data and the others not. tests/test_swarm.py and tools/bench_swarm.py run it.

The hook lives here, not in dilo: it replaces `Exchange.deliver` (dilo/comm/swarm_exchange.py)
before the trainer starts, then runs `dilo.train.main` unchanged.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys


def install(round_number: int, phase: int) -> None:
    """Make this process die mid-delivery in that round's phase (see the module docstring)."""
    from dilo.comm.swarm_exchange import Exchange

    deliver = Exchange.deliver

    async def deliver_then_die(self, phase_now: int, header: dict, outgoing: list, deadline: float):
        sends = await deliver(self, phase_now, header, outgoing, deadline)
        if (self.t, phase_now) != (round_number, phase) or not sends:
            return sends
        first = min(sends)
        for j, task in sends.items():
            if j != first:
                task.cancel()
        await asyncio.wait([sends[first]])
        os.kill(os.getpid(), signal.SIGKILL)

    Exchange.deliver = deliver_then_die


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--kill-at":
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        round_number, phase = (int(x) for x in argv[1].split(":"))
    except ValueError:
        print(f"--kill-at takes ROUND:PHASE (e.g. 4:2), got {argv[1]!r}", file=sys.stderr)
        return 2
    if phase not in (1, 2):
        print(f"--kill-at: PHASE is 1 or 2, got {phase}", file=sys.stderr)
        return 2
    install(round_number, phase)
    from dilo.train import main as train_main

    return train_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
