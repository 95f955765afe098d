"""Config: presets, overrides, and mistakes refused before training with the key named."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib

import pytest

from dilo.config import Config, key_name, parse_args
from dilo.config_help import field_docs
from tests.helpers import REPO, SMALL

TINY = str(REPO / "configs" / "tiny.toml")


def test_presets_load_and_validate():
    for preset in sorted((REPO / "configs").glob("*.toml")):
        cfg = parse_args(["--config", str(preset)])
        assert cfg.outer.inner_steps >= 1


def test_overrides_both_spellings():
    cfg = parse_args(["--config", TINY, "--outer.inner_steps", "7", "--comm.codec=fp16",
                      "--outer.nesterov=false", "--outer.momentum", "0.5"])
    assert (cfg.outer.inner_steps, cfg.comm.codec, cfg.outer.nesterov) == (7, "fp16", False)
    assert cfg.outer.momentum == 0.5


def test_overrides_beat_the_preset():
    cfg = parse_args(["--outer.inner_steps", "9", "--config", TINY])
    assert cfg.outer.inner_steps == 9


@pytest.mark.parametrize("args,needle", [
    (["--outer.inner_stepz", "5"], "outer.inner_stepz"),
    (["--nope.x", "1"], "unknown config section 'nope'"),
    (["--outer.inner_steps", "five"], "outer.inner_steps: expected an integer"),
    (["--outer.inner_steps", "0"], "outer.inner_steps (H) must be >= 1"),
    (["--inner.lr", "0"], "inner.lr must be > 0"),
    (["--outer.lr", "-1"], "outer.lr must be > 0"),
    (["--comm.codec", "int3"], "comm.codec must be one of fp32, bf16, fp16, int8, fp4"),
    (["--run.mode", "fsdp"], "run.mode must be one of diloco, ddp"),
    (["--model.n_heads", "3"], "model.n_heads (3) must divide model.d_model (128)"),
    (["--outer.nesterov", "maybe"], "outer.nesterov: expected true or false"),
    (["--checkpoint.resume", "auto", "--checkpoint.init_from", "x"], "exclude each other"),
    (["--config", "/no/such.toml"], "no such file"),
    (["--outer.inner_steps"], "needs a value"),
    (["--metrics.port", "70000"], "metrics.port must be a TCP port in 1..65535, or 0"),
    (["--metrics.port", "-1"], "metrics.port must be a TCP port"),
    (["--metrics.host", ""], "metrics.host must be an address"),
])
def test_mistakes_name_the_key(args, needle):
    with pytest.raises(ValueError) as e:
        parse_args(args)
    assert needle in str(e.value)


def test_bad_toml_key_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[outer]\ninner_steps = 5\nlr = 'fast'\n")
    with pytest.raises(ValueError, match="outer.lr: expected a number"):
        parse_args(["--config", str(bad)])


def test_fingerprint_tracks_shared_settings():
    a, b = Config(), Config()
    assert a.fingerprint() == b.fingerprint()
    b.run.dir = "elsewhere"  # local setting: same run
    assert a.fingerprint() == b.fingerprint()
    b.comm.codec = "fp16"
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize("args,needle", [
    (["--outer.inner_steps", "0"], "outer.inner_steps"),
    (["--data.path", "/no/such/corpus.txt"], "data.path"),
])
@pytest.mark.e2e
def test_cli_refuses_before_training(procs, tmp_path, args, needle):
    run = tmp_path / "run"
    res = procs.run([sys.executable, "-m", "dilo.cli", "train", *SMALL, "--run.dir", str(run), *args],
                    tmp_path / "log.txt", timeout=60)
    assert res.returncode == 2
    assert needle in res.stdout
    assert not list(run.glob("checkpoints/*")) and not list(run.glob("summary-*"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dilo.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_every_key_has_a_description():
    cfg, docs = Config(), field_docs()
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        for g in dataclasses.fields(section):
            assert docs.get((type(section).__name__, g.name)), \
                f"{f.name}.{key_name(g.name)} has no docstring in dilo/config_sections.py"


def test_train_help_on_stdout_with_every_key():
    res = cli("train", "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: dilo train")
    out = " ".join(res.stdout.split())  # descriptions are wrapped
    assert "--outer.lr FLOAT (default 0.7) Outer (Nesterov SGD) learning rate." in out
    assert '--metrics.host STR (default "127.0.0.1") Address the Prometheus endpoint' in out
    assert "--checkpoint.async BOOL (default false)" in out
    for name, section in dataclasses.asdict(Config()).items():
        for key in section:
            assert f"--{name}.{key_name(key)} " in res.stdout
    assert "Traceback" not in res.stderr


def test_version_and_top_level_help():
    res = cli("--version")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert (res.returncode, res.stdout.strip()) == (0, f"dilo {project['version']}")
    res = cli("--help")
    assert res.returncode == 0 and "train" in res.stdout and "--version" in res.stdout
    res = cli()
    assert res.returncode == 2 and "usage: dilo" in res.stderr


def test_swarm_help():
    res = cli("swarm", "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: dilo swarm") and "--peers.key_file STR" in res.stdout


@pytest.mark.parametrize("args,needle", [
    (["--inner.lr", "inf"], "inner.lr must be a finite number, got inf"),
    (["--inner.weight_decay", "inf"], "inner.weight_decay must be a finite number"),
    (["--inner.grad_clip", "nan"], "inner.grad_clip must be a finite number, got nan"),
    (["--outer.momentum", "nan"], "outer.momentum must be a finite number"),
    (["--comm.timeout", "inf"], "comm.timeout must be a finite number"),
    (["--peers.linger", "-inf"], "peers.linger must be a finite number"),
    (["--inner.lr", "3"], "inner.lr = 3.0 is absurd for AdamW"),
    (["--outer.lr", "50"], "outer.lr = 50.0 is absurd"),
    (["--inner.lr", "0.5", "--inner.weight_decay", "2"], "inner.lr x inner.weight_decay = 1 must be < 1"),
])
def test_non_finite_and_absurd_hyperparameters_refused_at_config_time(args, needle):
    with pytest.raises(ValueError) as e:
        parse_args(["--config", TINY, *args])
    assert needle in str(e.value)


def test_research_values_of_hyperparameters_still_allowed():
    cfg = parse_args(["--config", TINY, "--inner.lr", "0.03", "--outer.lr", "2.0", "--outer.momentum", "0.99",
                      "--inner.weight_decay", "0.5", "--inner.grad_clip", "0"])
    assert (cfg.inner.lr, cfg.outer.lr) == (0.03, 2.0)


def test_diloco_refuses_a_non_finite_outer_lr():
    from dilo.options import check_outer_options

    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="outer.lr must be > 0 and finite.*DiLoCo keyword: outer_lr"):
            check_outer_options(inner_steps=10, outer_lr=bad)


def test_owner_feedback_refusals_say_what_to_change_and_read_a_codecs_attributes():
    from dilo.options import check_owner_feedback

    check_owner_feedback(False, error_feedback=False, codec="fp32", exchange="gather")  # off: nothing to check
    check_owner_feedback(True, error_feedback=True, codec="int2", exchange="two_phase")
    # A user's codec: its own attributes decide, not the built-in codec of the same name.
    check_owner_feedback(True, error_feedback=False, codec="mine", exchange="two_phase", codec_lossless=False,
                         codec_needs_error_feedback=True)
    with pytest.raises(ValueError, match=r"loses nothing.*\(DiLoCo keywords: owner_feedback, codec\)"):
        check_owner_feedback(True, error_feedback=True, codec="int8", exchange="two_phase", codec_lossless=True)
    with pytest.raises(ValueError, match=r"exchanged by gather.*set comm.sparse_exchange = two_phase"):
        check_owner_feedback(True, error_feedback=True, codec="sparse", exchange="gather")
    with pytest.raises(ValueError, match=r"set comm.error_feedback = true or comm.owner_feedback = false"):
        check_owner_feedback(True, error_feedback=False, codec="fp4", exchange="two_phase")
    with pytest.raises(ValueError, match="comm.owner_feedback = true adds"):  # the CLI: before anything starts
        parse_args([*SMALL, "--comm.codec", "fp4", "--comm.owner_feedback", "true"])
