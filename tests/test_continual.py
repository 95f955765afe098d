"""Continual runs (docs/continual.md): run.steps = 0, watched data folders (agreement, manifest,
replay, when_idle), eval.sets, published versions and `dilo export`."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dilo import checkpoint, publish
from dilo.cli import main as cli_main
from dilo.comm.local import local_groups
from dilo.comm.protocol import SoloGroup
from dilo.config import parse_args
from dilo.data_stream import WatchedBatches, agreed_new
from dilo.inner_loop import lr_at
from dilo.train import Trainer
from tests.helpers import SMALL, Procs, run_workers, summaries, torchrun_cmd

T, B = 8, 2  # seq_len, rows per worker per step


def shard(folder: Path, name: str, n: int, seed: int) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(0, 256, n).astype(np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / name, tokens)
    return tokens


def reference_rows(tokens: np.ndarray, lanes: int, first: int, count: int) -> np.ndarray:
    """Row g = window g // L of lane g mod L (written independently of dilo/data_stream.py)."""
    lane_len = tokens.size // lanes
    out = []
    for g in range(first, first + count):
        lane, window = g % lanes, g // lanes
        start = lane * lane_len + window * T
        out.append(tokens[start:start + T + 1])
    return np.stack(out)


def stream(folder: Path, group, rank: int = 0, size: int = 1, **kw) -> WatchedBatches:
    return WatchedBatches(str(folder), group, rank, size, B, T, **kw)


def rows_of(batch) -> np.ndarray:
    x, y = batch
    return torch.cat([x, y[:, -1:]], dim=1).numpy()


# -- config and schedule ------------------------------------------------------------------------
def test_endless_lr_is_warmup_then_constant_and_finite_runs_keep_their_cosine():
    cfg = parse_args(["--run.steps", "0", "--inner.warmup_steps", "10", "--inner.lr", "0.01"])
    assert lr_at(cfg, 4) == pytest.approx(0.005)
    assert [lr_at(cfg, s) for s in (10, 1000, 10**7)] == [0.01] * 3
    finite = parse_args(["--run.steps", "110", "--inner.warmup_steps", "10", "--inner.lr", "0.01"])
    assert lr_at(finite, 60) == pytest.approx(0.001 + 0.009 * 0.5)  # cosine midpoint


@pytest.mark.parametrize("args, message", [
    (["--run.steps", "-1"], "run.steps"),
    (["--data.when_idle", "sleep"], "data.when_idle"),
    (["--data.replay", "0.1"], "data.watch"),
    (["--data.watch", "true", "--data.path", "d", "--data.replay", "1"], "data.replay"),
    (["--data.watch", "true"], "data.path"),
    (["--data.watch", "true", "--data.path", "d", "--comm.backend", "hivemind", "--peers.open", "true"],
     "when_idle = repeat"),
    (["--data.watch", "true", "--data.path", "d", "--comm.backend", "hivemind", "--peers.open", "true",
      "--data.when_idle", "repeat", "--outer.delay", "1"], "outer.delay = 0"),
    (["--eval.sets", "code"], "name=path"),
    (["--eval.sets", "a=x,a=y"], "distinct"),
    (["--publish.keep", "0"], "publish.keep"),
    (["--publish.every", "-1"], "publish.every"),
])
def test_bad_continual_settings_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        parse_args(args)


# -- the watched folder -------------------------------------------------------------------------
def test_agreement_takes_only_what_every_process_sees_with_the_same_size():
    seen = [[("a", 10), ("b", 5), ("c", 7)], [("a", 10), ("b", 4), ("c", 7), ("d", 1)]]
    assert agreed_new(seen, "") == [("a", 10), ("c", 7)]
    assert agreed_new(seen, "a") == [("c", 7)]


def test_workers_take_a_shard_only_once_all_see_it_and_read_disjoint_reference_rows(tmp_path):
    """Two workers with their own copy of the folder (files arrive at different moments)."""
    folders = [tmp_path / "w0", tmp_path / "w1"]
    a = shard(folders[0], "a.npy", 2000, 1)
    folders[1].mkdir()
    shutil.copy(folders[0] / "a.npy", folders[1])
    b = shard(folders[0], "b.npy", 2000, 2)  # worker 1 does not see b yet
    groups = local_groups(2)
    streams = run_workers(lambda r: stream(folders[r], groups[r], r, 2), 2)
    assert [[s.name for s in st.shards] for st in streams] == [["a.npy"]] * 2
    lanes = 2 * B
    for step in range(3):
        got = run_workers(lambda r: rows_of(streams[r].next_batch()), 2)
        np.testing.assert_array_equal(np.concatenate(got), reference_rows(a, lanes, step * lanes, lanes))
    shutil.copy(folders[0] / "b.npy", folders[1])
    assert run_workers(lambda r: streams[r].sync(), 2) == [True, True]
    assert streams[0].state_dict() == {**streams[1].state_dict(), "shard": 0, "folder": str(folders[0])}
    rows_a = streams[0].shards[0].rows
    steps_a = rows_a // lanes
    for _ in range(steps_a - 3):
        run_workers(lambda r: streams[r].next_batch(), 2)
    got = run_workers(lambda r: rows_of(streams[r].next_batch()), 2)  # the first step of b
    np.testing.assert_array_equal(np.concatenate(got), reference_rows(b, lanes, 0, lanes))
    manifest = streams[0].state_dict()
    assert [s["name"] for s in manifest["shards"]] == ["a.npy", "b.npy"]
    assert manifest["cursor"] == 1 and manifest["position"] == lanes


def test_the_manifest_resumes_exactly_and_refuses_a_changed_shard(tmp_path):
    folder = tmp_path / "data"
    shard(folder, "a.npy", 900, 1), shard(folder, "b.npy", 900, 2)
    first = stream(folder, SoloGroup(), replay=0.5)
    for _ in range(30):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
    shard(folder, "c.npy", 900, 3)  # arrived after the checkpoint: a resume takes it later
    again = stream(folder, SoloGroup(), replay=0.5)
    again.load_state_dict(state)
    assert [s.name for s in again.shards] == ["a.npy", "b.npy"]
    for _ in range(20):
        np.testing.assert_array_equal(rows_of(first.next_batch()), rows_of(again.next_batch()))
    shard(folder, "b.npy", 900, 99)
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        stream(folder, SoloGroup()).load_state_dict(state)


def test_a_bigger_world_continues_the_manifest_at_the_same_global_row(tmp_path):
    """Join mid-stream on torch = an elastic resume: 3 workers load the manifest 2 wrote and
    read rows [G, G + 3B) of the same lanes (L = 2B, fixed for the run), worker w from G + wB."""
    folder = tmp_path / "data"
    a = shard(folder, "a.npy", 3000, 1)
    groups = local_groups(2)
    old = run_workers(lambda r: stream(folder, groups[r], r, 2), 2)
    for _ in range(5):
        run_workers(lambda r: old[r].next_batch(), 2)
    state = json.loads(json.dumps(old[0].state_dict()))
    groups = local_groups(3)
    new = run_workers(lambda r: stream(folder, groups[r], r, 3), 3)
    for st in new:
        st.load_state_dict(state)
    G = state["position"]
    assert G == 5 * 2 * B and all(st.num_lanes == 2 * B for st in new)
    for step in range(2):
        got = run_workers(lambda r: rows_of(new[r].next_batch()), 3)
        np.testing.assert_array_equal(np.concatenate(got), reference_rows(a, 2 * B, G + step * 3 * B, 3 * B))
    assert {st.state_dict()["position"] for st in new} == {G + 2 * 3 * B}


def test_replay_draws_its_share_from_older_shards_deterministically(tmp_path):
    folder = tmp_path / "data"
    a = shard(folder, "a.npy", 400, 1)
    shard(folder, "b.npy", 4000, 2)
    runs = []
    for _ in range(2):
        s = WatchedBatches(str(folder), SoloGroup(), 0, 1, 4, T, replay=0.25)
        while s.cursor == 0:
            s.next_batch()
        runs.append([rows_of(s.next_batch()) for _ in range(5)])
    old = {tuple(r) for r in reference_rows(a, 4, 0, 4 * ((a.size // 4 - 1) // T))}
    for batch in runs[0]:
        assert tuple(batch[3]) in old  # round(0.25 * 4) = 1 replayed row, from shard a
        assert not any(tuple(r) in old for r in batch[:3])
    np.testing.assert_array_equal(np.stack(runs[0]), np.stack(runs[1]))


def test_repeat_passes_over_old_shards_then_jumps_to_a_new_one(tmp_path):
    folder = tmp_path / "data"
    a = shard(folder, "a.npy", 200, 1)
    s = stream(folder, SoloGroup(), when_idle="repeat")
    steps = s.shards[0].rows // B
    first = [rows_of(s.next_batch()) for _ in range(steps)]
    np.testing.assert_array_equal(rows_of(s.next_batch()), first[0])  # pass 1
    assert s.passes == 1 and s.repeating
    b = shard(folder, "b.npy", 200, 2)
    assert s.sync()
    np.testing.assert_array_equal(rows_of(s.next_batch()), reference_rows(b, B, 0, B))
    assert not s.repeating and a.size


def test_wait_blocks_until_a_new_shard_and_a_stop_ends_the_wait(tmp_path):
    folder = tmp_path / "data"
    shard(folder, "a.npy", 200, 1)
    s = stream(folder, SoloGroup(), poll_s=0.02)
    for _ in range(s.shards[0].rows // B):
        s.next_batch()
    timer = threading.Timer(0.3, lambda: shard(folder, "b.npy", 200, 2))
    timer.start()
    started = time.monotonic()
    s.next_batch()
    assert time.monotonic() - started >= 0.25 and s.cursor == 1
    timer.join()
    stopping = stream(folder, SoloGroup(), poll_s=0.02, stop_requested=lambda: True)
    for _ in range(sum(x.rows for x in stopping.shards) // B + 1):
        stopping.next_batch()  # dry with a stop requested: the round ends on repeated rows
    assert stopping.passes == 1
    with pytest.raises(ValueError, match="before any shard"):
        stream(tmp_path / "empty", SoloGroup(), poll_s=0.01, stop_requested=lambda: True)


# -- published versions -------------------------------------------------------------------------
def test_a_consumer_polling_latest_never_sees_a_half_written_version(tmp_path):
    out = tmp_path / "pub"
    seen, errors, done = set(), [], threading.Event()

    def consumer():
        while not done.is_set():
            try:
                got = publish.read_latest(out)
            except FileNotFoundError:  # the version `latest` named was pruned meanwhile
                continue
            except Exception as e:  # noqa: BLE001 - a torn read is the failure under test
                errors.append(e)
                return
            if got is not None:
                manifest, tensors = got
                assert torch.equal(tensors["w"], torch.full((64, 64), float(manifest["outer_step"])))
                seen.add(manifest["outer_step"])

    thread = threading.Thread(target=consumer)
    thread.start()
    try:
        for step in range(1, 41):
            publish.publish(out, step, {"w": torch.full((64, 64), float(step))}, {"x": step}, keep=3)
    finally:
        done.set()
        thread.join(30)
    assert not errors, errors
    assert len(seen) > 1
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step-000038", "step-000039", "step-000040"]
    assert (out / "latest").read_text() == "step-000040\n"


# -- an endless run, in process -----------------------------------------------------------------
def run_until(run_dir: Path, data: Path, stop_when, *extra: str) -> tuple[dict, Trainer]:
    cfg = parse_args([*SMALL, "--run.dir", str(run_dir), "--outer.inner_steps", "4", "--run.steps", "0",
                      "--data.watch", "true", "--data.path", str(data), "--data.val_fraction", "0",
                      "--checkpoint.every", "1", "--publish.every", "2", "--publish.keep", "2",
                      "--eval.sets", f"first={data / 'a.txt'}", "--data.eval_every", "2", *extra])
    trainer = Trainer(cfg)
    watcher_done = threading.Event()

    def watch():
        while not watcher_done.is_set() and not stop_when(trainer):
            time.sleep(0.01)
        trainer.stopper.requested = True

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        return trainer.run(), trainer
    finally:
        watcher_done.set()
        thread.join(10)
        trainer.close()


@pytest.mark.usefixtures("no_launch_env")
def test_an_endless_run_takes_new_shards_publishes_and_resumes_from_its_manifest(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    text = Path(__file__).read_text()
    (data / "a.txt").write_text(text[:6000])

    def add_b_then_stop(trainer):
        s = trainer.state
        if s.outer_step >= 2 and not (data / "b.txt").exists():
            (data / "b.txt").write_text(text[6000:12000])
        return len(s.batches.shards) == 2 and s.outer_step >= 5

    summary, trainer = run_until(run, data, add_b_then_stop)
    assert summary["stopped"] and summary["outer_steps"] >= 5
    manifest, tensors = publish.read_latest(run / "published")
    assert manifest["outer_step"] % 2 == 0 and manifest["global_hash"]
    assert [s["name"] for s in manifest["data"]["shards"]][0] == "a.txt"
    assert set(tensors) >= {"tok_emb.weight", "head.weight"}
    records = [json.loads(line) for line in (run / "metrics-0.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and r.get("set") == "first" and r["set_loss"] > 0 for r in records)
    assert trainer.metrics.render_prometheus().count('dilo_eval_set_loss{set="first",worker="0"}') == 1

    # dilo export of the checkpoint at a published step gives the same weights and hash
    step = manifest["outer_step"]
    assert cli_main(["export", str(checkpoint.step_dir(run, step)), str(tmp_path / "exported")]) == 0
    exported, weights = publish.read_latest(tmp_path / "exported")
    assert exported["global_hash"] == manifest["global_hash"] and exported["outer_step"] == step
    assert all(torch.equal(weights[k], tensors[k]) for k in tensors)

    last = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(run, summary["outer_steps"]), 0))
    resumed, _ = run_until(run, data, lambda t: t.state.outer_step >= summary["outer_steps"] + 1,
                           "--checkpoint.resume", "auto")
    first_new = checkpoint.read_verified(checkpoint.worker_file(
        checkpoint.step_dir(run, summary["outer_steps"] + 1), 0))
    assert first_new["data"]["shards"] == last["data"]["shards"]
    assert first_new["data"]["steps"] == last["data"]["steps"] + 4  # continued, not restarted
    assert resumed["stopped"]


# -- two processes: a resume into the running stream ends where the uninterrupted run ends -------
@pytest.mark.e2e
def test_a_resume_mid_stream_ends_on_the_same_hash_and_manifest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    src = Path(__file__).read_text()
    for i, name in enumerate(("a.txt", "b.txt", "c.txt")):
        (data / name).write_text(src[i * 5000:(i + 1) * 5000])
    procs = Procs()
    common = [*SMALL, "--outer.inner_steps", "5", "--run.steps", "20", "--data.watch", "true",
              "--data.path", str(data), "--data.val_fraction", "0", "--data.replay", "0.25",
              "--checkpoint.every", "1", "--checkpoint.keep", "10"]
    try:
        full = procs.run(torchrun_cmd(2, [*common, "--run.dir", str(tmp_path / "full")]), tmp_path / "a.txt")
        assert full.returncode == 0, full.stdout[-3000:]
        mid = checkpoint.step_dir(tmp_path / "full", 2)
        resumed = procs.run(torchrun_cmd(2, [*common, "--run.dir", str(tmp_path / "again"),
                                             "--checkpoint.resume", str(mid)]), tmp_path / "b.txt")
        assert resumed.returncode == 0, resumed.stdout[-3000:]
    finally:
        procs.cleanup()
    ends = summaries(tmp_path / "full") + summaries(tmp_path / "again")
    assert len(ends) == 4 and len({s["global_hash"] for s in ends}) == 1
    manifests = [checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(tmp_path / run, 4), w))["data"]
                 for run in ("full", "again") for w in (0, 1)]
    assert all({**m, "shard": 0} == {**manifests[0], "shard": 0} for m in manifests)
    assert manifests[0]["cursor"] >= 1  # the run moved on to later shards


def test_plot_draws_one_curve_per_eval_set(tmp_path):
    from tools import plot

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"kind": "inner", "step": 10, "loss": 4.0, "tokens_per_s": 10.0},
             {"kind": "eval", "step": 10, "set": "code", "set_loss": 3.5},
             {"kind": "eval", "step": 10, "set": "docs", "set_loss": 4.5},
             {"kind": "eval", "step": 20, "set": "code", "set_loss": 3.0}]
    (run / "metrics-0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    c = plot.curves(plot.load(str(run)))
    assert c["set_loss"] == {"code": [(10, 3.5), (20, 3.0)], "docs": [(10, 4.5)]} and c["eval_loss"] == []
    assert plot.main([str(run), "--out", str(tmp_path / "p.png")]) == 0


def test_export_usage_and_a_missing_checkpoint_are_clear_errors(tmp_path, capsys):
    assert cli_main(["export"]) == 2
    assert "usage: dilo export CHECKPOINT OUT" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_a_fractional_replay_share_is_exact_on_average(tmp_path):
    folder = tmp_path / "data"
    shard(folder, "a.npy", 200, 1)
    s = WatchedBatches(str(folder), SoloGroup(), 0, 1, 4, T, replay=0.1)
    s.cursor = 1  # reading a later shard: older ones exist
    replayed = []
    for n in range(100):
        s.steps = n
        replayed.append(4 - s.fresh_rows)
    assert sum(replayed) == 40 and set(replayed) == {0, 1}  # 0.1 x 4 rows per step on average
