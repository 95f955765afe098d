"""A Hugging Face causal LM as a dilo model (`model.hf_config`; the optional [hf] extra).

The model is `AutoModelForCausalLM.from_config` of a transformers config.json: built
locally with fresh weights, nothing is downloaded (the base weights come from
`checkpoint.init_from`, as for dilo's GPT). It trains on dilo's data (bytes, or uint16
token files with model.vocab_size) through the same call as dilo's GPT:
`model(idx, targets)` → the mean cross-entropy, targets already shifted by the loader.
With `model.lora_rank` set, peft's LoRA wraps `model.lora_targets` (docs/adapters.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def _import_hf():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("model.hf_config needs transformers: pip install 'dilo[hf]'") from e
    return transformers


class HFCausalLM(nn.Module):
    """`AutoModelForCausalLM.from_config(config.json)` with dilo's forward signature."""

    def __init__(self, config_path: str, vocab_size: int, seq_len: int):
        super().__init__()
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"model.hf_config = {config_path}: no such file (a transformers config.json)")
        transformers = _import_hf()
        fields = json.loads(path.read_text())
        kind = fields.pop("model_type", None)
        if not kind:
            raise ValueError(f"model.hf_config = {config_path} has no model_type (e.g. \"llama\")")
        config = transformers.AutoConfig.for_model(kind, **fields)
        found = getattr(config, "vocab_size", 0)
        if found < vocab_size:
            raise ValueError(f"model.hf_config's vocab_size ({found}) is smaller than model.vocab_size "
                             f"({vocab_size}), the data's token range; raise it in {config_path}")
        positions = getattr(config, "max_position_embeddings", seq_len)
        if positions < seq_len:
            raise ValueError(f"model.hf_config's max_position_embeddings ({positions}) is smaller than "
                             f"model.seq_len ({seq_len}); lower model.seq_len")
        self.hf = transformers.AutoModelForCausalLM.from_config(config)
        self.seq_len = seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        if idx.shape[1] > self.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than model.seq_len = {self.seq_len}")
        logits = self.hf(input_ids=idx).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PeftAdapter:
    """One peft LoRA layer seen as dilo/lora.py's LoRALinear (lora_a, lora_b, weight, scale),
    for outer.lora_aggregate = exact."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    lora_a = property(lambda self: self.layer.lora_A["default"].weight)
    lora_b = property(lambda self: self.layer.lora_B["default"].weight)
    weight = property(lambda self: self.layer.base_layer.weight)
    scale = property(lambda self: self.layer.scaling["default"])


def add_peft_lora(model: HFCausalLM, rank: int, alpha: float, targets: list[str],
                  train_a: bool) -> list[PeftAdapter]:
    """Wrap `targets` with peft's LoRA; everything else frozen (peft's doing). With
    `train_a` False the A matrices stay at their initialisation (outer.lora_aggregate =
    frozen_a): drawn from torch's RNG, seeded alike on every worker."""
    try:
        import peft
    except ImportError as e:
        raise ImportError("model.lora_rank with model.hf_config needs peft: pip install 'dilo[hf]'") from e
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    try:
        model.hf = peft.get_peft_model(model.hf, config)
    except ValueError as e:
        raise ValueError(f"model.lora_targets {targets} do not name linear layers of the model in "
                         f"model.hf_config: {e}") from e
    if not train_a:
        for name, p in model.hf.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return [PeftAdapter(m) for m in model.hf.modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and "default" in m.lora_A]
