"""LoRA adapters via peft, with `auto` target modules per architecture."""

from __future__ import annotations

from typing import Any

from torch import nn

# attention and MLP projection names across common architectures
KNOWN_TARGETS = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # llama/qwen/mistral
    "query", "key", "value", "dense",  # bert/roberta/xlm-r/minilm (attention + intermediate/output)
    "c_attn", "c_proj", "c_fc",  # gpt2
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h",  # gpt-neox/falcon
    "qkv_proj", "gate_up_proj", "Wqkv", "Wo", "Wi",  # phi3 / modernbert
}
SKIP = {"pooler", "lm_head", "classifier", "score"}


def auto_target_modules(model: nn.Module) -> list[str]:
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(part in SKIP for part in full.split(".")):
            names.add(full.rsplit(".", 1)[-1])
    chosen = sorted(names & KNOWN_TARGETS)
    return chosen or sorted(names)


def apply_lora(backbone: nn.Module, cfg: Any) -> nn.Module:
    """Wrap ``backbone`` with LoRA adapters as the recipe's ``model.lora`` says."""
    from peft import LoraConfig, get_peft_model

    targets = auto_target_modules(backbone) if cfg.target_modules == "auto" else list(cfg.target_modules)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    return get_peft_model(backbone, config)


def is_peft(module: Any) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "merge_and_unload")
