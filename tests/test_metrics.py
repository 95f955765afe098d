import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from dilo.metrics import Metrics, read_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
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
        m.log("inner", step=3, loss=2.0, tokens=100, lr=float("nan"))
        m.log("inner", step=4, loss=1.5, tokens=50)
        m.log("sync", bytes_sent=1000, bytes_received=400, seconds=0.5)
        m.log("sync", bytes_sent=24, bytes_received=100, seconds=0.25)
        m.count("rejected_peers", reason="fingerprint")
        m.count("rejected_peers", 2, reason="fingerprint")
        m.count("rejected_peers", reason="auth")

        status, content_type, body = scrape(port)
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        samples = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        w = 'worker="w1"'
        assert samples[f"dilo_inner_loss{{{w}}}"] == 1.5
        assert samples[f"dilo_inner_step{{{w}}}"] == 4
        assert f"dilo_inner_lr{{{w}}}" not in samples  # NaN skipped
        assert samples[f"dilo_sync_seconds{{{w}}}"] == 0.25
        assert samples[f"dilo_tokens_total{{{w}}}"] == 150
        assert samples[f"dilo_bytes_sent_total{{{w}}}"] == 1024
        assert samples[f"dilo_bytes_received_total{{{w}}}"] == 500
        assert samples[f"dilo_inner_events_total{{{w}}}"] == 2
        assert samples[f"dilo_sync_events_total{{{w}}}"] == 2
        assert samples[f'dilo_rejected_peers_total{{{w},reason="fingerprint"}}'] == 3
        assert samples[f'dilo_rejected_peers_total{{{w},reason="auth"}}'] == 1
        assert all("worker=" in key for key in samples)
        assert "# TYPE dilo_inner_loss gauge" in body
        assert body.count("# TYPE dilo_rejected_peers_total counter") == 1

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
        s.bind(("0.0.0.0", port))
        s.listen()
    with Metrics(tmp_path, "w1", port=port, progress=False) as again:  # e.g. a resumed run
        again.log("inner", loss=1.0)
        assert 'dilo_inner_loss{worker="w1"} 1.0' in scrape(port)[2]


def test_port_in_use_raises(tmp_path):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=rf"metrics\.port.*{port}.*0 to disable"):
            Metrics(tmp_path, 0, port=port, progress=False)


def test_write_summary_is_atomic_json(tmp_path):
    with Metrics(tmp_path, 2, progress=False) as m:
        path = m.write_summary({"final_loss": 1.25, "diverged": float("inf"), "steps": 10})
        path = m.write_summary({"final_loss": 1.0, "steps": 20})  # overwrite
    assert path == tmp_path / "summary-2.json"
    assert json.loads(path.read_text()) == {"final_loss": 1.0, "steps": 20}
    assert "\n  " in path.read_text()  # pretty-printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics-2.jsonl", "summary-2.json"]


def test_non_writer_is_a_no_op(tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    with Metrics(run_dir, 1, port=port, progress=True, is_writer=False) as m:
        m.log("inner", loss=1.0)
        m.count("x")
        m.progress(1, loss=1.0)
        m.write_summary({"a": 1})
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))  # no server was started
    assert not run_dir.exists()


def test_progress_is_throttled_and_finished(tmp_path, capsys):
    with Metrics(tmp_path, 0, total_steps=400, progress=True) as m:
        for step in range(1, 101):
            m.progress(step, loss=2.3141, tok_per_s=5234.0, outer=6)
        first = capsys.readouterr().err
        assert first.count("\r") == 1  # 100 calls in well under 0.2 s: one redraw
        assert "step 1/400 | loss 2.31 | 5.23k tok/s | outer 6" in first
        m.progress(400, loss=1.0)  # the final step is always drawn
        assert "step 400/400 | loss 1" in capsys.readouterr().err
    assert capsys.readouterr().err == "\n"


def test_progress_off_writes_nothing(tmp_path, capsys):
    with Metrics(tmp_path, 0, total_steps=10, progress=False) as m:
        m.progress(1, loss=1.0)
    assert capsys.readouterr().err == ""
