"""LoRA runs resume and admit new workers exactly (docs/adapters.md): for each
outer.lora_aggregate a run resumed from its middle ends on the global hash of the run that
never stopped (the hash covers the frozen bases, which `exact` changes), and workers whose
bases differ are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dilo import checkpoint
from dilo.config import ModelConfig, parse_args
from dilo.model import GPT
from dilo.train import Trainer
from tests.helpers import SMALL

STEPS, H = 12, 3


def base_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(3)  # a base that is not the run's own initialisation
    base = GPT(ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=32))
    flat = torch.cat([p.detach().reshape(-1) for p in base.parameters()])
    checkpoint.save(tmp_path / "base", 0, 1, {"diloco": {"global_params": flat}, "model_rest": {}}, keep=1)
    return tmp_path / "base" / "checkpoints" / "step-000001"


def lora_args(run_dir: Path, aggregate: str, *extra: str) -> list[str]:
    return [*SMALL, "--run.dir", str(run_dir), "--run.steps", str(STEPS), "--outer.inner_steps", str(H),
            "--model.lora_rank", "2", "--model.lora_targets", "qkv,fc", "--outer.lora_aggregate", aggregate,
            "--checkpoint.every", "1", "--checkpoint.keep", "10", *extra]


def train(args: list[str]) -> tuple[dict, dict]:
    trainer = Trainer(parse_args(args))
    try:
        summary = trainer.run()
        return summary, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()


@pytest.mark.usefixtures("no_launch_env")
@pytest.mark.parametrize("aggregate", ["naive", "frozen_a", "exact"])
def test_a_lora_run_resumed_mid_run_ends_bit_identical(tmp_path, aggregate):
    base = base_checkpoint(tmp_path)
    full, full_model = train(lora_args(tmp_path / "full", aggregate, "--checkpoint.init_from", str(base)))
    mid = checkpoint.step_dir(tmp_path / "full", 2)
    again, again_model = train(lora_args(tmp_path / "again", aggregate, "--checkpoint.resume", str(mid)))
    assert again["global_hash"] == full["global_hash"] and again["inner_steps"] == STEPS
    assert full_model.keys() == again_model.keys()
    assert all(torch.equal(full_model[k], again_model[k]) for k in full_model)  # bases and adapters
    qkv = full_model["blocks.0.qkv.weight"]
    loaded = checkpoint.read_verified(checkpoint.worker_file(mid, 0))["model_rest"]["blocks.0.qkv.weight"]
    if aggregate == "exact":  # the folded residuals moved the base after step 2: the resume restored it
        assert not torch.equal(qkv, loaded)
    else:
        assert torch.equal(qkv, loaded)  # naive, frozen_a: the base never moves


@pytest.mark.usefixtures("no_launch_env")
def test_the_global_hash_covers_the_frozen_base(tmp_path):
    trainer = Trainer(parse_args(lora_args(tmp_path / "run", "naive")))
    try:
        before = trainer.state.global_hash()
        assert before != trainer.diloco.global_hash()  # θ's digest and the base's
        with torch.no_grad():
            trainer.model.blocks[0].proj.weight[0, 0] += 1e-3  # a frozen, non-adapted weight
        assert trainer.state.global_hash() != before
    finally:
        trainer.close()


def test_workers_with_different_bases_are_refused_and_exact_checks_the_folded_bases():
    from dilo.comm.local import local_groups
    from dilo.lora import ExactAggregation, add_lora, check_same_base
    from tests.helpers import run_workers

    groups = local_groups(2)
    bases = [{"w": torch.zeros(3)}, {"w": torch.tensor([0.0, 0.0, 1e-7])}]
    errors = run_workers(lambda r: _raises(lambda: check_same_base(bases[r], groups[r])), 2)
    assert all("LoRA bases differ" in e for e in errors)

    cfg = ModelConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=1, n_heads=2)
    groups = local_groups(2)

    def worker(rank: int) -> str:
        torch.manual_seed(0)
        model = GPT(cfg)
        layers = add_lora(model, 2, 4.0, ["qkv"], "exact", seed=1)
        with torch.no_grad():
            layers[0].weight[0, 0] += rank * 1e-6  # worker 1's folded base drifted
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        return _raises(lambda: ExactAggregation(layers, params, groups[rank], 0.7)(flat, flat))

    assert all("folded bases differ" in e for e in run_workers(worker, 2))


def _raises(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return str(e)
    return ""


@pytest.mark.e2e
def test_a_worker_joining_a_lora_exact_run_elastically_ends_on_the_same_hash(procs, tmp_path):
    """2 workers train LoRA exact to outer step 2; the run restarts with 3 (an elastic resume:
    the new worker receives θ and the folded bases); all 3 end on one hash and one base."""
    from tests.helpers import summaries, torchrun_cmd

    base = base_checkpoint(tmp_path)
    run = tmp_path / "run"
    first = procs.run(torchrun_cmd(2, lora_args(run, "exact", "--run.steps", "6", "--comm.codec", "fp32",
                                                "--checkpoint.init_from", str(base))), tmp_path / "a.txt")
    assert first.returncode == 0, first.stdout[-3000:]
    grown = procs.run(torchrun_cmd(3, lora_args(run, "exact", "--comm.codec", "fp32", "--checkpoint.resume",
                                                "auto")), tmp_path / "b.txt")
    assert grown.returncode == 0, grown.stdout[-3000:]
    found = summaries(run)
    assert len(found) == 3 and len({s["global_hash"] for s in found}) == 1
    assert all(s["inner_steps"] == STEPS for s in found)
    last = checkpoint.step_dir(run, STEPS // H)
    bases = [checkpoint.read_verified(checkpoint.worker_file(last, w))["model_rest"]["blocks.0.qkv.weight"]
             for w in range(3)]
    assert torch.equal(bases[0], bases[1]) and torch.equal(bases[0], bases[2])
    resumed = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(run, 2), 0))
    assert not torch.equal(bases[0], resumed["model_rest"]["blocks.0.qkv.weight"])  # it kept folding


@pytest.mark.usefixtures("no_launch_env")
def test_a_published_lora_version_reports_the_hash_of_its_checkpoint(tmp_path):
    from dilo import publish

    summary, _ = train(lora_args(tmp_path / "run", "exact", "--run.steps", "6", "--publish.every", "2"))
    manifest, _ = publish.read_latest(tmp_path / "run" / "published")
    saved = checkpoint.read_verified(checkpoint.worker_file(checkpoint.step_dir(tmp_path / "run", 2), 0))
    assert manifest["outer_step"] == 2 and manifest["global_hash"] == saved["global_hash"] == summary["global_hash"]
