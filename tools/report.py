"""What every tool does with its numbers: statistics, the JSON document, the optional plot.

Rules (docs/results.md): compare within one run (ratios), repeat, report medians and
spread. `describe(values)` is the one summary of repeated measurements used everywhere.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any


class ToolError(Exception):
    """A user mistake or an unmet requirement; the tool prints it and exits with status 2."""


def describe(values: list[float]) -> dict[str, float | int | None]:
    """median, mean, min, max, std (sample, 0 for one value) and n of a list of numbers."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"n": 0, "median": None, "mean": None, "min": None, "max": None, "std": None}
    return {"n": len(vals), "median": statistics.median(vals), "mean": statistics.fmean(vals),
            "min": min(vals), "max": max(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def document(tool: str, settings: dict, results: Any) -> dict:
    """The JSON every tool writes: what ran, where, with which settings, and the results."""
    return {"tool": tool, "schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv, "machine": machine(), "settings": settings, "results": results}


def write_json(path: str | Path, doc: dict) -> Path:
    """Atomic write (dilo/atomic_write.py): a tool killed mid-write leaves the old file."""
    # Imported here: `import dilo` still loads torch, and netsim (which imports this module
    # for ToolError) starts without it.
    from dilo.atomic_write import write_json as atomic_write_json

    return atomic_write_json(path, doc, default=_plain)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def require_matplotlib():
    """pyplot with the file-only Agg backend, or a ToolError that says how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ToolError("plotting needs matplotlib, which is not installed: "
                        "`pip install matplotlib` (or `pip install -e .[tools]`), "
                        "or pass --png '' to skip the picture") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_path(out: str | Path, png: str | None) -> Path | None:
    """--png given: that path ('' = no picture); else the JSON path with .png."""
    if png is not None:
        return Path(png) if png else None
    return Path(out).with_suffix(".png")


def _leave(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_tool(main_fn, argv: list[str] | None = None, name: str = "") -> int:
    """Call main_fn(argv); print ToolError/ValueError as one clear line and return 2.

    SIGTERM and SIGHUP become SystemExit, so the tools' `finally` blocks end the runs
    they started (their children live in sessions of their own and would survive); the
    handlers found are put back on return (a tool called in-process, e.g. by a test).
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _leave)
    try:
        return main_fn(sys.argv[1:] if argv is None else argv) or 0
    except (ToolError, ValueError) as e:
        print(f"{name or Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name or Path(sys.argv[0]).stem}: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
