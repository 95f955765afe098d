"""Checkpoints: atomic, checksummed, refused whole when damaged; resume and init_from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dilo import checkpoint, resume
from dilo.config import parse_args
from tests.helpers import SMALL, summaries


def test_round_trip(tmp_path):
    state = {"a": torch.arange(5.0), "b": {"step": 3, "name": "x"}}
    path = checkpoint.save(tmp_path, 0, 3, state, keep=2)
    loaded = checkpoint.read_verified(path)
    assert torch.equal(loaded["a"], state["a"]) and loaded["b"] == state["b"]
    assert not list(path.parent.glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty"])
def test_damaged_file_is_refused(tmp_path, damage):
    path = checkpoint.save(tmp_path, 0, 1, {"a": torch.ones(100)}, keep=2)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-10]
    elif damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "magic":
        data[:8] = b"NOTDILO!"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read_verified(path)


def test_keep_prunes_oldest_and_auto_skips_corrupt(tmp_path):
    for step in (1, 2, 3):
        for worker in (0, 1):
            checkpoint.save(tmp_path, worker, step, {"outer_step": step, "num_workers": 2}, keep=2)
    assert checkpoint.list_steps(tmp_path) == [2, 3]
    newest = checkpoint.worker_file(checkpoint.step_dir(tmp_path, 3), 1)
    newest.write_bytes(newest.read_bytes()[:20])
    dirs = [checkpoint.step_dir(tmp_path, s) for s in checkpoint.list_steps(tmp_path)]
    per_worker = [[f["step"] for f in resume.survey(dirs, w, 2)] for w in (0, 1)]
    assert per_worker == [[2, 3], [2]]


def train(procs, tmp_path, run, *args, name="log"):
    cmd = [sys.executable, "-m", "dilo.train", *SMALL, "--run.dir", str(run), *args]
    return procs.run(cmd, tmp_path / f"{name}.txt", timeout=120)


COMMON = ["--run.steps", "20", "--outer.inner_steps", "5", "--checkpoint.every", "1",
          "--checkpoint.keep", "3"]


@pytest.mark.e2e
def test_resume_auto_falls_back_over_a_corrupt_checkpoint(procs, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train(procs, tmp_path, ref, *COMMON, name="ref").returncode == 0
    assert train(procs, tmp_path, run, *COMMON[:1], "10", *COMMON[2:], name="a").returncode == 0
    newest = checkpoint.worker_file(checkpoint.step_dir(run, 2), 0)
    newest.write_bytes(newest.read_bytes()[:-100])  # a torn write of the last checkpoint
    res = train(procs, tmp_path, run, *COMMON, "--checkpoint.resume", "auto", name="b")
    assert res.returncode == 0, res.stdout[-2000:]
    assert "skipping checkpoint" in res.stdout and "step-000001" in res.stdout
    assert summaries(run)[0]["global_hash"] == summaries(ref)[0]["global_hash"]


@pytest.mark.e2e
def test_explicit_corrupt_resume_fails_and_changes_nothing(procs, tmp_path):
    run = tmp_path / "run"
    assert train(procs, tmp_path, run, *COMMON[:1], "10", *COMMON[2:], name="a").returncode == 0
    target = checkpoint.worker_file(checkpoint.step_dir(run, 2), 0)
    target.write_bytes(target.read_bytes()[:-1])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = train(procs, tmp_path, run, *COMMON, "--checkpoint.resume", str(target.parent), name="b")
    assert res.returncode == 2 and "truncated" in res.stdout
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith("metrics")}
    assert after == {p: b for p, b in before.items() if not p.name.startswith("metrics")}


@pytest.mark.e2e
def test_fresh_run_refuses_a_dir_with_checkpoints(procs, tmp_path):
    run = tmp_path / "run"
    assert train(procs, tmp_path, run, *COMMON[:1], "5", *COMMON[2:], name="a").returncode == 0
    res = train(procs, tmp_path, run, *COMMON, name="b")
    assert res.returncode == 2 and "checkpoint.resume auto" in res.stdout


@pytest.mark.e2e
def test_init_from_starts_a_new_run_from_global_weights(procs, tmp_path, monkeypatch):
    src = tmp_path / "src"
    assert train(procs, tmp_path, src, *COMMON[:1], "10", *COMMON[2:], name="a").returncode == 0
    step_dir = checkpoint.step_dir(src, 2)
    want = checkpoint.read_verified(checkpoint.worker_file(step_dir, 0))["diloco"]["global_params"]

    from dilo.train import Trainer

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = parse_args([*SMALL, "--run.dir", str(tmp_path / "new"), *COMMON,
                      "--checkpoint.init_from", str(step_dir), "--inner.lr", "1e-3"])
    trainer = Trainer(cfg)
    try:
        trainer.checkpoints.restore()
        assert torch.equal(trainer.diloco.global_params.detach(), want)
        assert trainer.state.inner_step == 0 and trainer.diloco.outer_step == 0
        assert not trainer.optimizer.state  # fresh inner optimizer
    finally:
        trainer.close()
    lines = [json.loads(l) for l in (tmp_path / "new" / "metrics-0.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start"


def test_prune_survives_another_worker_removing_the_folder(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        for w in (0, 1):
            checkpoint.write_atomic(checkpoint.worker_file(checkpoint.step_dir(tmp_path, step), w), {"s": step})
    real_glob = Path.glob

    def glob_racing_with_worker_1(self, pattern):
        if pattern.startswith(".worker-0.pt.") and pattern.endswith(".tmp"):  # worker 1 empties and removes the folder
            for f in self.iterdir():                # between the is_dir check and the scan
                f.unlink()
            self.rmdir()
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_glob(self, pattern)

    monkeypatch.setattr(Path, "glob", glob_racing_with_worker_1)
    checkpoint.prune(tmp_path, 0, keep=2, num_workers=2)
    assert checkpoint.list_steps(tmp_path) == [2, 3]


def test_resume_with_other_settings_names_them(tmp_path, monkeypatch, capsys):
    from dilo.train import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = [*SMALL, "--run.dir", str(tmp_path / "run"), *COMMON[:1], "10", *COMMON[2:]]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--checkpoint.resume", "auto", "--outer.lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "outer.lr = 0.7 (now 0.5)" in err and "Traceback" not in err



def _trainer(monkeypatch, run, *args):
    from dilo.train import Trainer

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return Trainer(parse_args([*SMALL, "--run.dir", str(run), *args]))


def test_init_from_compares_names_and_shapes_not_only_counts(tmp_path, monkeypatch):
    src = _trainer(monkeypatch, tmp_path / "src")
    try:
        state = src.state.state_dict()
        want = src.diloco.global_params.detach().clone()
    finally:
        src.close()
    path = checkpoint.save(tmp_path / "src", 0, 1, state, keep=1)
    assert state["param_shapes"][0] == ("tok_emb.weight", [256, 32])
    # vocab +16, seq_len -16: the same number of parameters (tied head), other shapes
    other = _trainer(monkeypatch, tmp_path / "b", "--model.vocab_size", "272", "--model.seq_len", "16",
                     "--checkpoint.init_from", str(path))
    deeper = _trainer(monkeypatch, tmp_path / "c", "--model.n_layers", "2", "--checkpoint.init_from", str(path))
    same = _trainer(monkeypatch, tmp_path / "d", "--checkpoint.init_from", str(path))
    try:
        assert other.diloco.numel == src.diloco.numel
        before = other.diloco.global_params.detach().clone()
        with pytest.raises(ValueError, match=r"does not fit this model: shape in the checkpoint vs this model "
                                             r"\(2\): tok_emb.weight \(256, 32\) vs \(272, 32\), "
                                             r"pos_emb.weight \(32, 32\) vs \(16, 32\)"):
            other.checkpoints.restore()
        assert torch.equal(other.diloco.global_params, before)  # nothing loaded
        with pytest.raises(ValueError, match=r"missing from the checkpoint \(\d+\): blocks.1\."):
            deeper.checkpoints.restore()
        same.checkpoints.restore()
        assert torch.equal(same.diloco.global_params.detach(), want)
        # a file written before the names were recorded: the model.* settings are compared
        del state["param_shapes"]
        old = checkpoint.save(tmp_path / "old", 0, 1, state, keep=1)
        with pytest.raises(ValueError, match=r"written with model.vocab_size = 256 \(now 272\); "
                                             r"model.seq_len = 32 \(now 16\)"):
            other.state.init_from(str(old))
        same.state.init_from(str(old))
    finally:
        for t in (other, deeper, same):
            t.close()


def test_init_from_a_data_parallel_run_checks_names_and_sets_theta(tmp_path, monkeypatch):
    from dilo.global_layout import flatten_fp32

    src = _trainer(monkeypatch, tmp_path / "src", "--run.mode", "ddp")
    try:
        with torch.no_grad():  # trained weights, unlike a fresh model of the same seed
            for p in src.model.parameters():
                p.add_(0.5)
        path = checkpoint.save(tmp_path / "src", 0, 1, src.state.state_dict(), keep=1)
        want = flatten_fp32(list(src.model.parameters()))
    finally:
        src.close()
    same = _trainer(monkeypatch, tmp_path / "a", "--checkpoint.init_from", str(path))
    other = _trainer(monkeypatch, tmp_path / "b", "--run.mode", "ddp", "--model.d_model", "64",
                     "--checkpoint.init_from", str(path))
    try:
        same.checkpoints.restore()
        assert torch.equal(same.diloco.global_params.detach(), want)  # θ, not only the live weights
        with pytest.raises(ValueError, match=r"tok_emb.weight \(256, 32\) vs \(256, 64\)"):
            other.checkpoints.restore()
    finally:
        same.close()
        other.close()


def test_resume_auto_over_only_damaged_files_refuses_and_fresh_sets_them_aside(tmp_path, monkeypatch, capsys):
    from dilo.train import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    args = [*SMALL, "--run.dir", str(run), *COMMON[:1], "10", *COMMON[2:]]
    assert main(args) == 0
    files = sorted(checkpoint.checkpoint_root(run).rglob("worker-*.pt"))
    assert len(files) == 2
    for i, f in enumerate(files):  # every file damaged, each its own way
        f.write_bytes(f.read_bytes()[:-100] if i == 0 else b"NOTDILO!" + f.read_bytes()[8:])
    before = {f: f.read_bytes() for f in files}
    capsys.readouterr()
    assert main([*args, "--checkpoint.resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoint files but none is valid" in err and "--checkpoint.resume fresh" in err
    assert f"{files[0]} is truncated" in err and f"{files[1]} is not a dilo checkpoint" in err
    assert {f: f.read_bytes() for f in files} == before  # never overwritten
    assert main(args) == 2 and "--checkpoint.resume fresh" in capsys.readouterr().err
    assert main([*args, "--checkpoint.resume", "fresh"]) == 0
    aside = list(run.glob("checkpoints.old-*"))
    assert len(aside) == 1
    for f, data in before.items():  # moved, byte for byte
        assert (aside[0] / f.relative_to(checkpoint.checkpoint_root(run))).read_bytes() == data
    assert checkpoint.list_steps(run) == [1, 2]  # the new run's, valid
    assert main([*args, "--checkpoint.resume", "auto", "--run.steps", "15"]) == 0  # a good resume: unchanged


def test_survey_reports_why_each_file_was_rejected(tmp_path):
    good = checkpoint.save(tmp_path, 0, 1, {"outer_step": 1, "num_workers": 1}, keep=5)
    bad = checkpoint.save(tmp_path, 0, 2, {"outer_step": 2, "num_workers": 1}, keep=5)
    bad.write_bytes(bad.read_bytes()[:-1])
    rejected: list[str] = []
    found = resume.survey([good.parent, bad.parent], 0, 1, rejected)
    assert [f["step"] for f in found] == [1] and rejected == [f"checkpoint {bad} is truncated: "
                                                              f"{bad.stat().st_size - 48} of "
                                                              f"{bad.stat().st_size - 47} payload bytes"]
