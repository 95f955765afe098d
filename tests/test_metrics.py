import json
import logging
import re
import socket
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from prometheus_client.parser import text_string_to_metric_families

from dilo.metric_names import COUNTER_HELP, EVENTS, FIELD_METRICS, STEP_METRICS
from dilo.metrics import Metrics, read_jsonl

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, "", ""


def test_jsonl_lines_nan_and_truncated_tail(tmp_path):
    with Metrics(tmp_path / "run", 0, progress=False) as m:
        m.log("inner", step=1, loss=2.5, lr=4e-4)
        m.log("sync", step=1, codec_error=float("nan"), hashes=[1.0, float("inf")], peers="a,b")
        m.count("dropped_contributions", reason="nonfinite")
    path = tmp_path / "run" / "metrics-0.jsonl"
    assert path.exists()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        json.loads(line)  # strict JSON: no NaN tokens
    records = read_jsonl(path)
    assert records[0]["kind"] == "inner" and records[0]["loss"] == 2.5 and records[0]["time"] > 0
    assert records[1]["codec_error"] is None and records[1]["hashes"] == [1.0, None]
    assert records[2] == {**records[2], "kind": "counter", "name": "dropped_contributions",
                          "value": 1.0, "total": 1.0, "labels": {"reason": "nonfinite"}}

    # Appends on reopen; a line cut short by a kill is skipped.
    with Metrics(tmp_path / "run", 0, progress=False) as m:
        m.log("event", what="restart")
    with open(path, "a") as f:
        f.write('{"kind": "inner", "st')
    records = read_jsonl(path)
    assert [r["kind"] for r in records] == ["inner", "sync", "counter", "event"]


def test_read_jsonl_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_prometheus_endpoint_and_release(tmp_path):
    port = free_port()
    m = Metrics(tmp_path, "w1", port=port, progress=False)
    try:
        m.log("event", event="start", workers=4, mode="diloco", fingerprint="abc", worker_size=1,
              synced_params=1000, world=7)
        m.log("inner", step=3, outer_step=0, loss=2.0, tokens=100, lr=float("nan"), tokens_per_s=9.0)
        m.log("inner", step=4, outer_step=0, loss=1.5, tokens=50)
        m.log("sync", step=4, outer_step=1, fragment=0, bytes_sent=1000, bytes_received=400,
              seconds=0.5, peers=4, global_hash="ab12", adopted=False)
        m.log("sync", step=6, outer_step=1, fragment=1, bytes_sent=24, bytes_received=100, seconds=0.25)
        m.log("sync", step=8, outer_step=2, fragment=0, bytes_sent=10, bytes_received=10, seconds=0.25)
        m.log("eval", step=8, outer_step=2, eval_loss=1.25)
        m.count("refused_peers", reason="fingerprint")
        m.count("refused_peers", 2, reason="fingerprint")
        m.count("refused_peers", reason="auth")

        status, content_type, body = scrape(port)
        assert status == 200 and content_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert all(f.documentation for f in families.values()), "a family without HELP"
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families.values() for s in f.samples}
        w = ("worker", "w1")
        assert samples[("dilo_train_loss", (w,))] == 1.5
        assert samples[("dilo_inner_step", (w,))] == 8
        assert samples[("dilo_outer_step", (w,))] == 2
        assert ("dilo_inner_learning_rate", (w,)) not in samples  # NaN skipped
        assert samples[("dilo_tokens_total", (w,))] == 150
        assert samples[("dilo_eval_loss", (w,))] == 1.25
        assert samples[("dilo_workers", (w,))] == 4
        f0, f1 = ("fragment", "0"), ("fragment", "1")
        assert samples[("dilo_sync_sent_bytes_total", (f0, w))] == 1010
        assert samples[("dilo_sync_sent_bytes_total", (f1, w))] == 24
        assert samples[("dilo_sync_received_bytes_total", (f0, w))] == 410
        assert samples[("dilo_sync_duration_seconds_count", (f0, w))] == 2
        assert samples[("dilo_sync_duration_seconds_sum", (f0, w))] == 0.75
        assert samples[("dilo_events_total", (("event", "start"), w))] == 1
        assert samples[("dilo_run_info", (("fingerprint", "abc"), ("mode", "diloco"), w,
                                          ("worker_size", "1")))] == 1
        assert samples[("dilo_refused_peers_total", (("reason", "fingerprint"), w))] == 3
        assert samples[("dilo_refused_peers_total", (("reason", "auth"), w))] == 1
        assert families["dilo_refused_peers"].type == "counter"
        assert families["dilo_sync_duration_seconds"].type == "summary"
        dilo_names = {name for name, _ in samples if name.startswith("dilo_")}
        assert all(("worker", "w1") in labels for name, labels in samples if name in dilo_names)
        # No rate gauge, no ids as values, no stutter.
        assert not any("per_s" in name or "hash" in name or "world" in name for name in dilo_names)
        assert not any(name.startswith(("dilo_eval_eval", "dilo_event_event")) for name in dilo_names)

        assert scrape(port, "/other")[0] == 404
    finally:
        m.close()
    m.close()  # idempotent
    assert not any(t.name == f"dilo-metrics-{port}" for t in threading.enumerate())
    with pytest.raises(OSError):
        scrape(port)  # nothing listens any more
    # The port is free again. SO_REUSEADDR (as every server sets) because the scraped
    # connections were closed by the server side and sit in TIME_WAIT.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    with Metrics(tmp_path, "w1", port=port, progress=False) as again:  # e.g. a resumed run
        again.log("inner", loss=1.0)
        assert 'dilo_train_loss{worker="w1"} 1.0' in scrape(port)[2]


def test_endpoint_listens_on_metrics_host_only(tmp_path):
    port = free_port()
    with Metrics(tmp_path, 0, port=port, progress=False) as m:  # default: loopback only
        assert m._server.server_address[0] == "127.0.0.1"
    with Metrics(tmp_path, 0, port=port, host="0.0.0.0", progress=False) as m:
        assert m._server.server_address[0] == "0.0.0.0"
        assert scrape(port)[0] == 200
    with pytest.raises(ValueError, match="metrics.host=192.0.2.1"):
        Metrics(tmp_path, 0, port=port, host="192.0.2.1", progress=False)  # not this machine's


def test_port_in_use_raises(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=rf"metrics\.port={port}.*0 disables"):
            Metrics(tmp_path, 0, port=port, progress=False)


def test_every_counter_the_code_counts_has_help():
    """Each `count("name")` in dilo/ is declared with HELP text in dilo/metric_names.py."""
    counted = set()
    for path in (REPO / "dilo").rglob("*.py"):
        counted |= set(re.findall(r"\bcount\(\s*\"(\w+)\"", path.read_text()))
    assert counted, "no count() calls found: did the pattern go stale?"
    assert counted <= set(COUNTER_HELP), f"declare in COUNTER_HELP: {sorted(counted - set(COUNTER_HELP))}"


def test_declared_names_follow_prometheus_conventions():
    specs = [*FIELD_METRICS.values(), *STEP_METRICS.values(), EVENTS]
    for spec in specs:
        assert spec.name.startswith("dilo_") and spec.help.endswith(".")
        assert not spec.name.endswith("_total"), "prometheus_client adds _total to counters"
        words = spec.name.split("_")
        assert all(a != b for a, b in zip(words, words[1:])), f"{spec.name} stutters"
        if "seconds" in spec.name or "bytes" in spec.name:
            assert words[-1] in ("seconds", "bytes"), f"{spec.name}: base unit last"
    assert len({s.name for s in specs}) == len(specs)


def test_write_summary_is_atomic_json(tmp_path):
    with Metrics(tmp_path, 2, progress=False) as m:
        path = m.write_summary({"final_loss": 1.25, "diverged": float("inf"), "steps": 10})
        path = m.write_summary({"final_loss": 1.0, "steps": 20})  # overwrite
    assert path == tmp_path / "summary-2.json"
    assert json.loads(path.read_text()) == {"final_loss": 1.0, "steps": 20}
    assert "\n  " in path.read_text()  # pretty-printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics-2.jsonl", "summary-2.json"]  # no temp left


def test_non_writer_is_a_no_op(tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    with Metrics(run_dir, 1, port=port, progress=True, is_writer=False) as m:
        m.log("inner", loss=1.0)
        m.count("x")
        m.progress(1, loss=1.0)
        m.write_summary({"a": 1})
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # no server was started
    assert not run_dir.exists()


def test_progress_bar_and_log_lines_do_not_glue(tmp_path, capsys):
    """On a TTY (progress=True) a tqdm bar; a log line goes above it, never onto it."""
    handler = logging.StreamHandler(sys.stderr)  # capsys's stderr, like basicConfig's
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.root.addHandler(handler)
    try:
        with Metrics(tmp_path, 0, total_steps=400, progress=True) as m:
            m.progress(10, loss=2.3141, tok_per_s=5234.0, outer=6)
            logging.getLogger("dilo").warning("outer 6 | something to say")
            m.progress(400, loss=1.0, tok_per_s=6000.0, outer=20)
        assert handler in logging.root.handlers  # the redirect is undone at close
    finally:
        logging.root.removeHandler(handler)
    err = capsys.readouterr().err
    pieces = [p.strip() for p in re.split(r"[\r\n]", err)]
    # (hivemind, once imported by another test, renames the level: ask logging for its name)
    assert f"{logging.getLevelName(logging.WARNING)} outer 6 | something to say" in pieces  # a line of its own
    assert "loss 2.31 | 5.23k tok/s | outer 6" in err
    assert any("400/400" in p and "outer 20" in p for p in pieces)
    assert err.endswith("\n")


@pytest.mark.parametrize("progress", [None, False])  # auto when stderr is not a TTY, or off
def test_progress_lines_without_a_tty(tmp_path, capsys, caplog, progress):
    caplog.set_level(logging.INFO, logger="dilo")
    with Metrics(tmp_path, 0, total_steps=400, progress=progress) as m:
        m.progress(10, loss=2.3141, tok_per_s=5234.0, outer=0)
        m.progress(20, loss=2.2, tok_per_s=5300.0, outer=1)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == ["step 10/400 | loss 2.31 | 5.23k tok/s | outer 0",
                     "step 20/400 | loss 2.2 | 5.3k tok/s | outer 1"]
    assert "\r" not in capsys.readouterr().err  # no bar


def test_unusable_run_dir_or_port_is_a_message(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="choose a writable --run.dir"):
        Metrics(blocker / "run", 0, progress=False)
    with pytest.raises(ValueError, match="past 65535"):
        Metrics(tmp_path, 0, port=65536, progress=False)  # metrics.port + local rank
