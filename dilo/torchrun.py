"""`python -m dilo.torchrun [torchrun arguments]`: torchrun that exits 0 after a graceful stop.

Why torchrun alone exits 1 after a clean SIGTERM stop: its agent turns the signal into a
`SignalException`, forwards SIGTERM to the workers, waits for them to exit and then
re-raises the exception, whatever the workers' exit codes. Our workers stop at the next
outer step with a checkpoint, a summary and exit 0 (dilo/graceful_stop.py), yet the run
reads as failed to schedulers and scripts.

This runs torchrun's own `main` with the same arguments. Every worker reports how it
ended in $DILO_EXIT_DIR (graceful_stop.mark_start / mark_exit); on the agent's
SignalException the run exits 0 if every worker of the last attempt reported exit 0,
else 128 + the signal number, as a process killed by it would.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from dilo.graceful_stop import EXIT_DIR_ENV


def clean_stop(folder: Path) -> bool:
    """Whether every worker of the newest attempt reported exit status 0."""
    reports = sorted(folder.iterdir())
    if not reports:
        return False
    newest = reports[-1].name.split("-")[0]
    return all(p.read_text() == "0" for p in reports if p.name.split("-")[0] == newest)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    with tempfile.TemporaryDirectory(prefix="dilo-exits-") as folder:
        os.environ[EXIT_DIR_ENV] = folder  # inherited by the agent's workers
        try:
            torchrun_main(sys.argv[1:] if argv is None else argv)
        except SignalException as e:
            if clean_stop(Path(folder)):
                print(f"dilo: stopped on {e.sigval.name}; every worker saved and exited cleanly",
                      file=sys.stderr)
                return 0
            print(f"dilo: stopped on {e.sigval.name}; not every worker exited cleanly", file=sys.stderr)
            return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
