"""Graceful stop: SIGTERM or Ctrl-C ends the run at the next outer step, with a checkpoint.

A signal only sets a flag. The training loop asks `agreed(group)` at every outer-step
boundary (after the sync), never between inner steps, so the hot path stays free of
collectives. `agreed` is one tiny collective (an all-reduce MAX of the flag on the torch
backend): a signal that reached only one rank stops every rank at the same outer step,
so all of them write the checkpoint of the same step and exit 0 together.

Why at outer boundaries only: between two outer steps the workers' models differ (each
trains on its own data), and only the global state θ, v, step is the same everywhere;
a checkpoint of that boundary is exact, one of a mid-round state would not be. The price
is latency: a stop takes up to one round (H inner steps). Under torchrun the agent
SIGKILLs workers `--shutdown-timeout` seconds (default 30) after forwarding a signal, so
set that above the duration of one round (launch/torchrun_elastic.sh does). torchrun
itself exits 1 after forwarding a signal, however cleanly the workers stopped; launched by
`python -m dilo.torchrun` (same arguments) the run exits 0 (dilo/torchrun.py). Every rank
writes its summary, marked `"stopped": true`.

A second Ctrl-C while a stop is pending raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from dilo.comm.protocol import Group

log = logging.getLogger("dilo")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (main thread only; elsewhere signals stay as they are)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if not self.requested:
            log.warning("%s received: stopping after the current outer step, with a checkpoint "
                        "(Ctrl-C again to stop at once)", name)
        self.requested = True
        self.signal_name = self.signal_name or name

    def agreed(self, group: Group) -> bool:
        """Whether any member was asked to stop; every member gets the same answer.

        A collective: every member must call it at the same outer step.
        """
        return group.any_true(self.requested)


# -- exit reports for dilo.torchrun -----------------------------------------------------------
# torchrun's agent exits 1 after forwarding a SIGTERM even when every worker stopped cleanly
# (dilo/torchrun.py). There, every worker reports how it ended in a file of its own under
# $DILO_EXIT_DIR (set by dilo.torchrun; without it nothing is written).
EXIT_DIR_ENV = "DILO_EXIT_DIR"


def _exit_report_path() -> Path | None:
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Path(folder) / f"{int(attempt):06d}-{os.getpid()}"


def mark_start() -> None:
    """This worker runs (it has not ended cleanly: a SIGKILL leaves this report)."""
    path = _exit_report_path()
    if path is not None:
        path.write_text("running")


def mark_exit(code: int) -> None:
    """This worker ends with exit status `code`."""
    path = _exit_report_path()
    if path is not None:
        path.write_text(str(code))
