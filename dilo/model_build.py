"""The model a worker trains: dilo's GPT or a Hugging Face causal LM (`model.hf_config`),
with LoRA adapters when `model.lora_rank` > 0 (docs/adapters.md).

With adapters the base weights come from `checkpoint.init_from` (a checkpoint of a full
run of the same model) and are loaded here, before the adapters are added and frozen
with the rest; the adapters are then what the inner optimizer trains and what DiLoCo
exchanges, and the run's own checkpoints hold the bases in `model_rest`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dilo import checkpoint
from dilo.config import Config
from dilo.config_checks import lora_targets
from dilo.global_layout import write_flat
from dilo.lora import ExactAggregation, add_lora, check_same_base
from dilo.model import GPT

log = logging.getLogger("dilo")


@dataclass
class BuiltModel:
    model: nn.Module
    adapters: list = field(default_factory=list)
    """The adapted layers (LoRALinear, or hf_model.PeftAdapter): exact folds into their bases."""
    base_from: str = ""
    """The checkpoint the frozen base was loaded from ("" = none: the base is fresh)."""


def build_model(cfg: Config, device: torch.device) -> BuiltModel:
    """The model on `device`, its base loaded and adapters added if model.lora_rank > 0."""
    m = cfg.model
    if m.hf_config:
        from dilo.hf_model import HFCausalLM

        model: nn.Module = HFCausalLM(m.hf_config, m.vocab_size, m.seq_len)
    else:
        model = GPT(m)
    model = model.to(device)
    if m.lora_rank == 0:
        return BuiltModel(model)
    built = BuiltModel(model, base_from=cfg.checkpoint.init_from)
    if built.base_from:
        load_base(model, built.base_from)
    elif not cfg.checkpoint.resume:  # (a resumed run's bases come from its checkpoint's model_rest)
        log.warning("model.lora_rank = %d without checkpoint.init_from: the adapters train on a freshly "
                    "initialised (random) base", m.lora_rank)
    targets, aggregate = lora_targets(m), cfg.outer.lora_aggregate
    if m.hf_config:
        from dilo.hf_model import add_peft_lora

        built.adapters = add_peft_lora(model, m.lora_rank, m.lora_alpha, targets,
                                       train_a=aggregate != "frozen_a")
    else:
        built.adapters = add_lora(model, m.lora_rank, m.lora_alpha, targets, aggregate, seed=cfg.run.seed)
    return built


@torch.no_grad()
def load_base(model: nn.Module, where: str) -> None:
    """The weights of a checkpoint of a full run of this model, into `model` (before adapters)."""
    path = checkpoint.resolve_init_from(where)
    state = checkpoint.read_verified(path)
    if "diloco" in state:
        params = list(model.parameters())
        flat = state["diloco"]["global_params"]
        numel = sum(p.numel() for p in params)
        if flat.numel() != numel:
            raise ValueError(f"checkpoint.init_from = {where} holds {flat.numel()} global parameters, the "
                             f"model has {numel}: the base must be a full run (no adapters) of the same "
                             "model.* shape")
        write_flat(params, flat.to(torch.float32))
        model.load_state_dict(state.get("model_rest", {}), strict=False)
    else:
        model.load_state_dict(state["model"])
    log.info("LoRA base weights from %s (frozen)", path)


def frozen_tensors(model: nn.Module, synced: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """The model's tensors that are not DiLoCo's θ: an adapter run's frozen base (and buffers)."""
    ids = {id(p) for p in synced}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in ids}


def attach_aggregation(built: BuiltModel, cfg: Config, diloco) -> None:
    """Adapters: a fixed group's workers must start from one base (compared here);
    outer.lora_aggregate = exact: DiLoCo's post-outer-step hook folds the residual."""
    if cfg.model.lora_rank and diloco is not None and not diloco.group.open_membership:
        check_same_base(frozen_tensors(built.model, diloco.params), diloco.group)
    if cfg.model.lora_rank and cfg.outer.lora_aggregate == "exact" and diloco is not None:
        diloco.after_outer_step = ExactAggregation(built.adapters, diloco.params, diloco.group, cfg.outer.lr)

