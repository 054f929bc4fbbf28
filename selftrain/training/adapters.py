"""LoRA adapters (peft): train a small low-rank update instead of every weight.

``adapter: {type: lora, r, alpha, dropout, target_modules}`` in a training stage's options
wraps the model with ``peft.get_peft_model`` before training; afterwards the update is merged
into the weights (``merge_and_unload``), so every checkpoint stays a plain model directory.
``target_modules`` null takes peft's defaults for the architecture (Llama: q_proj, v_proj;
BERT: query, value); ``all-linear`` adapts every linear layer but the output head.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from selftrain.errors import SelftrainError


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["lora"] = Field("lora", description="Adapter kind (lora: low-rank update, merged on save).")
    r: int = Field(8, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(16.0, gt=0, description="Scale of the update: it is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input during training.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Modules adapted: names (q_proj, ...), all-linear, or null for peft's defaults for the model.")


def lora_config(opts: LoraOptions, model):
    """The ``peft.LoraConfig`` of ``opts`` for ``model`` (TRL trainers take it as ``peft_config``)."""
    from peft import LoraConfig, TaskType

    check_adapter(opts, model)
    causal = not type(model).__name__.endswith("ForMaskedLM")
    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=opts.target_modules,
                      task_type=TaskType.CAUSAL_LM if causal else None)


def check_adapter(opts: LoraOptions | None, model) -> None:
    """SelftrainError, before a run starts, if the adapter would find nothing to adapt in ``model``."""
    if opts is None:
        return
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = opts.target_modules
    if targets == "all-linear":
        return
    if targets is None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in DEFAULTS:
            raise SelftrainError(f"adapter: peft has no default LoRA target modules for model type {model_type!r}; "
                                 "set adapter.target_modules (module names, or all-linear)")
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())})
        raise SelftrainError(f"adapter.target_modules: {missing} match no module of this model; "
                             f"its layers are named {', '.join(leaves[:20])}")


def attach(model, opts: LoraOptions):
    """``model`` wrapped in a fresh LoRA adapter (only the adapter trains)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(opts, model))


def is_adapted(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge(model):
    """The plain model with the adapter's update merged in (``model`` itself when it has none)."""
    if not is_adapted(model):
        return model
    merged = model.merge_and_unload()
    for p in merged.parameters():  # peft froze the base weights; a later full fine-tuning must see them
        p.requires_grad_(True)
    return merged
