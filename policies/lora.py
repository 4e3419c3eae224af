"""LoRA for every policy family: one settings dataclass, one peft config built from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlplat.registry import checked


@dataclass
class LoRAConfig:
    """peft LoRA settings (r = 0 trains every weight instead)."""

    # Adapter rank; 0 disables LoRA (full fine-tuning, and no built-in reference model).
    r: int = checked(0, ge=0)
    # LoRA alpha (null: min(r, 16), OpenVLA's fine-tuning default; the same as r up to rank 16).
    alpha: int | None = checked(None, ge=1)
    # Dropout on the adapter input.
    dropout: float = checked(0.0, ge=0, le=1)
    # Modules that get adapters: "all-linear" or a list of module-name suffixes (null: the
    # family's default: every linear layer but the LM head for OpenVLA, the attention
    # projections to_q, to_k, to_v, to_out.0 for diffusion UNets).
    target_modules: Any = None


def lora_rank(lora: Mapping[str, Any] | None) -> int:
    """The adapter rank of ``lora`` settings (0: no adapter)."""
    return int((lora or {}).get("r", 0) or 0)


def peft_lora_config(lora: Mapping[str, Any] | None, default_targets: str | Sequence[str], **extra: Any) -> Any:
    """The ``peft.LoraConfig`` of ``lora`` settings (``LoRAConfig`` fields), or None when r is 0.

    Args:
        lora: the settings; missing keys take ``LoRAConfig``'s defaults.
        default_targets: the family's adapter targets when ``target_modules`` is null.
        extra: further ``peft.LoraConfig`` arguments (e.g. ``modules_to_save``).
    """
    rank = lora_rank(lora)
    if rank <= 0:
        return None
    from peft import LoraConfig

    targets = lora.get("target_modules") or default_targets
    return LoraConfig(r=rank, lora_alpha=int(lora.get("alpha") or min(rank, 16)),
                      lora_dropout=float(lora.get("dropout", 0.0)),
                      target_modules=targets if isinstance(targets, str) else list(targets), **extra)
