"""Adapters end to end: 2 workers under torchrun (docs/adapters.md). dilo's GPT with LoRA
exact from a base checkpoint, and a tiny Llama-style Hugging Face model with peft LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dilo import checkpoint
from dilo.config import ModelConfig
from dilo.model import GPT
from tests.helpers import SMALL, summaries, torchrun_cmd

LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "tie_word_embeddings": False}


@pytest.mark.e2e
def test_gpt_lora_exact_from_a_base(procs, tmp_path):
    torch.manual_seed(3)  # a base that is not the run's own initialisation
    base = GPT(ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=32))
    flat = torch.cat([p.detach().reshape(-1) for p in base.parameters()])
    checkpoint.save(tmp_path / "base", 0, 1, {"diloco": {"global_params": flat}, "model_rest": {}}, keep=1)
    run = tmp_path / "run"
    args = [*SMALL, "--run.dir", str(run), "--run.steps", "6", "--outer.inner_steps", "3",
            "--comm.codec", "fp32", "--model.lora_rank", "4", "--model.lora_targets", "qkv,fc",
            "--outer.lora_aggregate", "exact", "--checkpoint.every", "1",
            "--checkpoint.init_from", str(tmp_path / "base" / "checkpoints" / "step-000001")]
    res = procs.run(torchrun_cmd(2, args), tmp_path / "log.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    found = summaries(run)
    assert len(found) == 2 and found[0]["global_hash"] == found[1]["global_hash"]
    adapters = 4 * (32 + 96) + 4 * (32 + 128)  # qkv 32→96 and fc 32→128, rank 4
    assert found[0]["synced_params"] == adapters
    # exact: every worker receives the others' fp32 adapters after each of the 2 outer steps
    assert found[0]["bytes_sent"] >= 2 * 4 * adapters
    states = [checkpoint.read_verified(run / "checkpoints" / "step-000002" / f"worker-{w}.pt") for w in (0, 1)]
    bases = [s["model_rest"]["blocks.0.qkv.weight"] for s in states]
    assert torch.equal(bases[0], bases[1])  # the folded bases agree bit for bit
    start = base.blocks[0].qkv.weight.detach()
    assert 0 < (bases[0] - start).abs().max() < 1e-2  # the base moved (residuals), a little
    assert torch.equal(states[0]["model_rest"]["blocks.0.proj.weight"], base.blocks[0].proj.weight)


@pytest.mark.e2e
def test_hf_llama_with_peft_lora_exact_two_workers(procs, tmp_path):
    pytest.importorskip("transformers", reason="model.hf_config needs the [hf] extra (transformers)")
    pytest.importorskip("peft", reason="LoRA on a Hugging Face model needs the [hf] extra (peft)")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA))
    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 256, 100000).astype("<u2").tofile(tokens)
    run = tmp_path / "run"
    args = [*SMALL, "--run.dir", str(run), "--run.steps", "6", "--outer.inner_steps", "3",
            "--data.path", str(tokens), "--model.hf_config", str(config), "--model.lora_rank", "4",
            "--outer.lora_aggregate", "exact", "--checkpoint.every", "1"]
    res = procs.run(torchrun_cmd(2, args), tmp_path / "log.txt")
    assert res.returncode == 0, res.stdout[-3000:]
    found = summaries(run)
    assert len(found) == 2 and found[0]["global_hash"] == found[1]["global_hash"]
    # A and B of q_proj (32→32) and v_proj (32→16, 2 kv heads) in 2 layers, rank 4
    adapters = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert found[0]["synced_params"] == adapters and all(s["outer_steps"] == 2 for s in found)
    assert found[0]["bytes_sent"] >= 2 * 4 * adapters  # exact's all-gather, 2 outer steps
    states = [checkpoint.read_verified(run / "checkpoints" / "step-000002" / f"worker-{w}.pt") for w in (0, 1)]
    bases = [{k: v for k, v in s["model_rest"].items() if "q_proj.base_layer" in k} for s in states]
    assert len(bases[0]) == 2 and all(torch.equal(bases[0][k], bases[1][k]) for k in bases[0])


def test_peft_frozen_a_trains_b_only(tmp_path):
    pytest.importorskip("transformers", reason="model.hf_config needs the [hf] extra (transformers)")
    pytest.importorskip("peft", reason="LoRA on a Hugging Face model needs the [hf] extra (peft)")
    from dilo.hf_model import HFCausalLM, add_peft_lora

    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA))
    model = HFCausalLM(str(config), vocab_size=256, seq_len=32)
    x = torch.randint(0, 256, (2, 32))
    before = model(x).detach()
    adapters = add_peft_lora(model, 4, 8.0, ["q_proj", "v_proj"], train_a=False)
    assert len(adapters) == 4
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(a.lora_b) for a in adapters}
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # B = 0: the adapted model is the base
    with pytest.raises(ValueError, match="vocab_size"):
        HFCausalLM(str(config), vocab_size=1000, seq_len=32)
