"""Observability for one DiLoCo worker: JSON lines, a Prometheus endpoint, progress.

Every record goes to ``<run_dir>/metrics-<worker>.jsonl`` (one JSON object per line,
flushed at once so a killed worker keeps everything it logged); the JSON lines hold
every field, and tools/ read them without torch installed.

When ``port > 0`` the numbers that make sense to watch live are served for Prometheus
at ``http://<host>:<port>/metrics`` by ``prometheus_client`` (a custom collector over
this object's state, in a private registry, behind a WSGI server that ``close()``
shuts down). They are declared in dilo/metric_names.py, each with its HELP text; a
field not declared there (ids, hashes, strings) is in the JSON lines only. Names
follow Prometheus' conventions: base unit last, ``_total`` on counters, one family
per quantity with ``worker`` (and ``fragment``) as labels, no pre-computed rates
(tokens and bytes are counters: ``rate()`` gives the throughput).

Progress: on a TTY a tqdm bar, with the root logger routed through ``tqdm.write``
while the bar lives, so log lines never land on the bar; otherwise (a pipe, a log
file, or progress off) one INFO line per ``progress()`` call.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily,
                                    Metric, SummaryMetricFamily)
from prometheus_client.registry import Collector
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dilo.atomic_write import write_json
from dilo.metric_names import EVENT_INFO, EVENTS, FIELD_METRICS, STEP_METRICS, Spec, counter_help

log = logging.getLogger("dilo")


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


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


Labels = tuple[tuple[str, str], ...]


class _State:
    """What the endpoint shows, keyed (family name, labels); guarded by Metrics._lock."""

    def __init__(self) -> None:
        self.gauges: dict[tuple[str, Labels], float] = {}
        self.counters: dict[tuple[str, Labels], float] = {}
        self.summaries: dict[tuple[str, Labels], tuple[int, float]] = {}
        self.infos: dict[str, dict[str, str]] = {}

    def add(self, spec: Spec, labels: Labels, value: float) -> float:
        key = (spec.name, labels)
        if spec.type == "gauge":
            self.gauges[key] = value
        elif spec.type == "counter":
            self.counters[key] = self.counters.get(key, 0.0) + value
            return self.counters[key]
        else:
            count, total = self.summaries.get(key, (0, 0.0))
            self.summaries[key] = (count + 1, total + value)
        return value


class _Collector(Collector):
    """Builds the families from a snapshot of the state at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        with m._lock:
            gauges, counters = dict(m._state.gauges), dict(m._state.counters)
            summaries, infos = dict(m._state.summaries), dict(m._state.infos)
        helps = {s.name: s.help for s in (*FIELD_METRICS.values(), *STEP_METRICS.values(), EVENTS)}
        for samples, make in ((gauges, GaugeMetricFamily), (counters, CounterMetricFamily),
                              (summaries, SummaryMetricFamily)):
            by_name: dict[str, list[tuple[dict[str, str], Any]]] = {}
            for (name, labels), value in sorted(samples.items()):
                by_name.setdefault(name, []).append((dict(labels), value))
            for name, rows in by_name.items():
                # One label set per family: a label some samples lack is empty on them.
                label_names = sorted({k for labels, _ in rows for k in labels})
                help_text = helps.get(name) or counter_help(name.removeprefix("dilo_"))
                family = make(name, help_text, labels=["worker", *label_names])
                for labels, value in rows:
                    values = [m.worker, *(labels.get(k, "") for k in label_names)]
                    if make is SummaryMetricFamily:
                        family.add_metric(values, count_value=value[0], sum_value=value[1])
                    else:
                        family.add_metric(values, value)
                yield family
        for name, values in sorted(infos.items()):
            help_text = next(h for n, h, _ in EVENT_INFO.values() if n == name)
            info = InfoMetricFamily(name, help_text, labels=["worker"])
            info.add_metric([m.worker], values)
            yield info


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that can hang offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape is noise


def _serve(registry: CollectorRegistry, host: str, port: int) -> _MetricsServer:
    """A WSGI server for `registry` at http://host:port/metrics (404 elsewhere), not yet serving."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> Any:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        return metrics_app(environ, start_response)

    server_class = _MetricsServer
    if ":" in host:  # an IPv6 address
        server_class = type("_MetricsServer6", (_MetricsServer,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), _QuietHandler)
    except OverflowError:  # metrics.port + local rank went past 65535
        raise ValueError(f"metrics.port: port {port} (metrics.port + this process's local rank) "
                         "is past 65535; choose a lower --metrics.port") from None
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise ValueError(
                f"metrics.port={port} on metrics.host={host}: cannot listen there ({e.strerror}); "
                "choose another port (--metrics.port, 0 disables the endpoint) or a host "
                "address of this machine (--metrics.host)") from e
        raise
    server.set_app(app)
    return server


def _label_name(key: str) -> str:
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
    return "_" + name if name[:1].isdigit() else name


class Metrics:
    """JSONL + Prometheus + progress for one worker. Thread-safe; usable as a context manager.

    `host`/`port`: where the Prometheus endpoint listens (port 0 = no endpoint).
    `progress`: True = a tqdm bar, False = INFO lines, None = a bar when stderr is a TTY.
    """

    def __init__(self, run_dir: str | Path, worker: int | str, *, port: int = 0,
                 host: str = "127.0.0.1", total_steps: int = 0, progress: bool | None = None,
                 is_writer: bool = True):
        self.worker = str(worker)
        self.path = Path(run_dir) / f"metrics-{self.worker}.jsonl"
        self.port, self.host = port, host
        self.total_steps = total_steps
        self.is_writer = is_writer
        self._lock = threading.Lock()
        self._state = _State()
        self.registry = CollectorRegistry(auto_describe=False)  # private: no global state
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, open fds
        self._file = None
        self._server: _MetricsServer | None = None
        self._thread: threading.Thread | None = None
        self._closed = not is_writer
        self._use_bar = False
        self._bar: tqdm | None = None
        self._log_redirect = contextlib.ExitStack()
        if not is_writer:
            return
        self._use_bar = sys.stderr.isatty() if progress is None else progress
        if port > 0:
            self._start_server(host, port)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            self._stop_server()
            raise ValueError(f"run.dir {self.path.parent}: cannot write {self.path.name} there "
                             f"({e.strerror}); choose a writable --run.dir") from e
        except BaseException:
            self._stop_server()
            raise

    # ---- JSON lines and metric updates -------------------------------------------------

    def log(self, kind: str, **fields: Any) -> None:
        """Append one line {"kind", "time", **fields}; declared fields update the endpoint."""
        record = {"kind": kind, "time": time.time(), **fields}
        with self._lock:
            if self._closed:  # checked under the lock: another thread may be closing
                return
            self._update(kind, fields)
            self._write(record)

    def count(self, name: str, value: float = 1.0, **labels: Any) -> None:
        """Increment counter dilo_<name>_total{labels} and log a kind="counter" line."""
        label_key = tuple(sorted((_label_name(k), str(v)) for k, v in labels.items()))
        spec = Spec(f"dilo_{_label_name(name)}", "counter", counter_help(name))
        with self._lock:
            if self._closed:
                return
            total = self._state.add(spec, label_key, float(value))
            record = {"kind": "counter", "time": time.time(), "name": name, "value": value,
                      "total": total}
            if labels:
                record["labels"] = labels
            self._write(record)

    def _update(self, kind: str, fields: dict[str, Any]) -> None:
        state = self._state
        if kind == "event" and fields.get("event"):
            event = str(fields["event"])
            state.add(EVENTS, (("event", event),), 1.0)
            if event in EVENT_INFO:
                name, _, keys = EVENT_INFO[event]
                state.infos[name] = {k: str(fields[k]) for k in keys if k in fields}
        # A run without fragments exchanges the whole model as fragment 0.
        fragment = (("fragment", str(fields.get("fragment", 0))),)
        for key, value in fields.items():
            spec = STEP_METRICS.get(key) or FIELD_METRICS.get((kind, key))
            if spec is not None and _is_number(value):
                labels = ((spec.label, str(fields.get(spec.label, ""))),) if spec.label else ()
                state.add(spec, fragment if spec.by_fragment else labels, float(value))

    def _write(self, record: dict) -> None:
        # Flushed per line: a SIGKILL loses at most the line being written (read_jsonl skips it).
        self._file.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        self._file.flush()

    def render_prometheus(self) -> str:
        """What a scrape returns now, in the Prometheus text format."""
        return generate_latest(self.registry).decode()

    # ---- progress ----------------------------------------------------------------------

    def progress(self, step: int, **fields: Any) -> None:
        """Show `step 120/400 | loss 2.31 | 5.2k tok/s | outer 6` (bar or INFO line).

        A field named `<unit>_per_s` is shown as a rate (`tok_per_s=5200` -> `5.2k tok/s`).
        """
        if self._closed:
            return
        parts = []
        for key, value in fields.items():
            if key.endswith("_per_s") and _is_number(value):
                parts.append(f"{_human(value)} {key[:-len('_per_s')]}/s")
            elif isinstance(value, float):
                parts.append(f"{key} {value:.3g}")
            else:
                parts.append(f"{key} {value}")
        if not self._use_bar:
            total = f"/{self.total_steps}" if self.total_steps else ""
            log.info(" | ".join([f"step {step}{total}", *parts]))
            return
        if self._bar is None:
            # While the bar lives, console log handlers write through tqdm.write, which
            # clears the bar, prints the line and redraws the bar below it.
            self._log_redirect.enter_context(
                logging_redirect_tqdm([logging.root, logging.getLogger("hivemind")]))
            self._bar = tqdm(total=self.total_steps or None, initial=step, unit="step",
                             file=sys.stderr, dynamic_ncols=True, desc="step")
        self._bar.set_postfix_str(" | ".join(parts), refresh=False)
        self._bar.update(step - self._bar.n)

    # ---- summary and shutdown ----------------------------------------------------------

    def write_summary(self, summary: dict) -> Path:
        """Write <run_dir>/summary-<worker>.json atomically."""
        path = self.path.parent / f"summary-{self.worker}.json"
        if self.is_writer:
            write_json(path, _jsonable(summary), sort_keys=True)
        return path

    def close(self) -> None:
        """Close the progress bar, stop the HTTP server, close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._bar is not None:
            self._bar.close()
        self._log_redirect.close()
        self._stop_server()
        with self._lock:
            self._file.close()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start_server(self, host: str, port: int) -> None:
        self._server = _serve(self.registry, host, port)
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
