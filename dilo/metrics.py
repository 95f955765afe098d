"""Observability for one DiLoCo worker: JSON lines, Prometheus endpoint, progress bar.

Every record goes to ``<run_dir>/metrics-<worker>.jsonl`` (one JSON object per line,
flushed at once so a killed worker keeps everything it logged). When ``port > 0`` the
same numbers are served as Prometheus text at ``http://<host>:<port>/metrics``.
Standard library only, so tools can read the files without torch installed.
"""

from __future__ import annotations

import errno
import http.server
import json
import math
import os
import re
import socketserver
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Fields that are also summed into run-wide counters, whatever kind of line they are in.
_ACCUMULATED = ("bytes_sent", "bytes_received", "tokens")
_PROGRESS_MIN_INTERVAL_S = 0.2  # at most ~5 redraws per second


def _metric_name(*parts: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", "_".join(parts))
    return "_" + name if name[0].isdigit() else name


def _label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _jsonable(value: Any) -> Any:
    """Replace non-finite floats by None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors, numpy scalars
        try:
            return _jsonable(value.item())
        except (ValueError, RuntimeError):
            pass
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _human(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that can hang offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


class Metrics:
    """JSONL + Prometheus + progress bar for one worker. Thread-safe; usable as a context manager."""

    def __init__(self, run_dir: str | Path, worker: int | str, *, port: int = 0,
                 total_steps: int = 0, progress: bool | None = None, is_writer: bool = True):
        self.worker = str(worker)
        self.path = Path(run_dir) / f"metrics-{self.worker}.jsonl"
        self.port = port
        self.total_steps = total_steps
        self.is_writer = is_writer
        self._lock = threading.Lock()
        self._gauges: dict[str, float] = {}
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._file = None
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None
        self._closed = not is_writer
        self._show_progress = False
        self._last_draw = -math.inf
        self._last_len = 0
        if not is_writer:
            return
        self._show_progress = sys.stderr.isatty() if progress is None else progress
        if port > 0:
            self._start_server(port)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self._stop_server()
            raise

    # ---- JSON lines and metric updates -------------------------------------------------

    def log(self, kind: str, **fields: Any) -> None:
        """Append one line {"kind", "time", **fields}; numeric fields become gauges dilo_<kind>_<field>."""
        record = {"kind": kind, "time": time.time(), **fields}
        with self._lock:
            if self._closed:  # checked under the lock: another thread may be closing
                return
            for key, value in fields.items():
                if not _is_number(value):
                    continue
                self._gauges[_metric_name("dilo", kind, key)] = float(value)
                if key in _ACCUMULATED:
                    self._add_counter(_metric_name("dilo", key, "total"), value, ())
            self._add_counter(_metric_name("dilo", kind, "events_total"), 1, ())
            self._write(record)

    def count(self, name: str, value: float = 1.0, **labels: Any) -> None:
        """Increment counter dilo_<name>_total{labels} and log a kind="counter" line."""
        label_key = tuple(sorted((_metric_name(k), str(v)) for k, v in labels.items()))
        with self._lock:
            if self._closed:
                return
            total = self._add_counter(_metric_name("dilo", name, "total"), value, label_key)
            record = {"kind": "counter", "time": time.time(), "name": name, "value": value,
                      "total": total}
            if labels:
                record["labels"] = labels
            self._write(record)

    def _add_counter(self, name: str, value: float, labels: tuple) -> float:
        key = (name, labels)
        self._counters[key] = self._counters.get(key, 0.0) + float(value)
        return self._counters[key]

    def _write(self, record: dict) -> None:
        # Flushed per line: a SIGKILL loses at most the line being written (read_jsonl skips it).
        self._file.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        self._file.flush()

    # ---- progress bar ------------------------------------------------------------------

    def progress(self, step: int, **fields: Any) -> None:
        """Redraw `step 120/400 | loss 2.31 | 5.2k tok/s | outer 6`, at most ~5 times a second.

        A field named `<unit>_per_s` is shown as a rate (`tok_per_s=5200` -> `5.2k tok/s`).
        """
        if self._closed or not self._show_progress:
            return
        now = time.monotonic()
        final = self.total_steps > 0 and step >= self.total_steps
        if now - self._last_draw < _PROGRESS_MIN_INTERVAL_S and not final:
            return
        self._last_draw = now
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        for key, value in fields.items():
            if key.endswith("_per_s") and _is_number(value):
                parts.append(f"{_human(value)} {key[:-len('_per_s')]}/s")
            elif isinstance(value, float):
                parts.append(f"{key} {value:.3g}")
            else:
                parts.append(f"{key} {value}")
        line = " | ".join(parts)
        sys.stderr.write("\r" + line.ljust(self._last_len))
        sys.stderr.flush()
        self._last_len = len(line)

    # ---- summary and shutdown ----------------------------------------------------------

    def write_summary(self, summary: dict) -> Path:
        """Write <run_dir>/summary-<worker>.json atomically (temp file, fsync, rename)."""
        path = self.path.parent / f"summary-{self.worker}.json"
        if not self.is_writer:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(_jsonable(summary), f, indent=2, sort_keys=True, allow_nan=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def close(self) -> None:
        """End the progress line, stop the HTTP server, close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._last_len:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self._stop_server()
        with self._lock:
            self._file.close()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- Prometheus endpoint -----------------------------------------------------------

    def render_prometheus(self) -> str:
        """The current metrics in Prometheus text exposition format 0.0.4."""
        worker = f'worker="{_label_value(self.worker)}"'
        lines: list[str] = []
        with self._lock:
            for name, value in sorted(self._gauges.items()):
                lines += [f"# TYPE {name} gauge", f"{name}{{{worker}}} {value!r}"]
            typed: set[str] = set()
            for (name, labels), value in sorted(self._counters.items()):
                if name not in typed:
                    typed.add(name)
                    lines.append(f"# TYPE {name} counter")
                label_text = "".join(f',{k}="{_label_value(v)}"' for k, v in labels)
                lines.append(f"{name}{{{worker}{label_text}}} {value!r}")
        return "\n".join(lines) + "\n"

    def _start_server(self, port: int) -> None:
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                body = metrics.render_prometheus().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per scrape is noise

        try:
            self._server = _QuietServer(("0.0.0.0", port), Handler)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ValueError(
                    f"metrics.port={port}: port {port} is not available ({e.strerror}); "
                    "choose another port (--metrics.port) or 0 to disable the endpoint"
                ) from e
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"dilo-metrics-{port}", daemon=True)
        self._thread.start()

    def _stop_server(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
        self._server = self._thread = None


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a metrics file; a truncated last line (the writer was killed mid-write) is skipped."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {line[:80]!r}") from None
    return records
