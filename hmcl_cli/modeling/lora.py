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


def check_target_modules(model: nn.Module, targets: list[str], model_name: str) -> None:
    """A RecipeError naming each of ``targets`` (``model.lora.target_modules``) that is no layer of
    ``model`` as peft matches them (a module's name or a dotted end of it: ``query``,
    ``attention.self.query``), with the model's linear layers and the closest of them. peft itself
    fails only where no target matches ("internal error: NoMatchingPeftModuleError" for q_proj on
    a BERT model) and leaves a misspelt one of several without adapters and without a word."""
    from hmcl_cli.errors import RecipeError
    from hmcl_cli.recipe import suggest

    names = [full for full, _ in model.named_modules() if full]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return
    linear = sorted({full.rsplit(".", 1)[-1] for full, m in model.named_modules()
                     if isinstance(m, nn.Linear) and not any(part in SKIP for part in full.split("."))})
    meant = [f"{close!r} for {t!r}" for t in missing if (close := suggest(t, linear))]
    raise RecipeError(
        f"model.lora.target_modules: {', '.join(map(repr, missing))} {'is' if len(missing) == 1 else 'are'} no layer of "
        f"{model_name} (its linear layers: {', '.join(linear)})" + (f" — did you mean {', '.join(meant)}?" if meant else ""),
        hint="name some of its layers, or write `auto` (the attention and MLP projections of its architecture)")


def apply_lora(backbone: nn.Module, cfg: Any, model_name: str = "the model") -> nn.Module:
    """Wrap ``backbone`` with LoRA adapters as the recipe's ``model.lora`` says."""
    from peft import LoraConfig, get_peft_model

    from hmcl_cli.errors import RecipeError

    if cfg.target_modules == "auto":
        targets = auto_target_modules(backbone)
    else:
        targets = list(cfg.target_modules)
        check_target_modules(backbone, targets, model_name)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    try:
        return get_peft_model(backbone, config)
    except ValueError as e:  # a layer peft cannot adapt (a LayerNorm, say)
        raise RecipeError(f"model.lora.target_modules: {e}", hint="name linear layers, or write `auto`") from None


def is_peft(module: Any) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "merge_and_unload")
