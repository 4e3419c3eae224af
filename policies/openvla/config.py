"""Config of the OpenVLA family (light: composing a config imports no model code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlplat.policies.lora import LoRAConfig
from rlplat.registry import register


@dataclass
class OpenVLATinyConfig:
    """Shape of the random-init tiny OpenVLA (built once, cached, loaded with from_pretrained)."""

    # Square input side of the vision tower(s) in pixels (env images are resized to it).
    image_size: int = 32
    # Side of a ViT patch in pixels (image_size must be a multiple).
    patch_size: int = 8
    # DINOv2 + SigLIP fused towers (6-channel input) instead of SigLIP alone.
    fused: bool = False
    # Width of the vision tower(s).
    vision_hidden_size: int = 32
    # Transformer blocks per vision tower.
    vision_layers: int = 2
    # Width of the Llama decoder.
    llm_hidden_size: int = 64
    # Llama decoder blocks.
    llm_layers: int = 2
    # Init seed of the random weights (part of the cache key).
    seed: int = 0


@dataclass
class OpenVLAPolicyConfig:
    """OpenVLA vision-language-action policy (policies/openvla/policy.py)."""

    # Local HF-format model folder or hub id found in the local HF cache (null: the tiny preset).
    path: str | None = None
    # Tiny preset shape, used when path is null.
    tiny: OpenVLATinyConfig = field(default_factory=OpenVLATinyConfig)
    # Cache folder of the tiny preset (null: $RLPLAT_CACHE_DIR or <tmp>/rlplat-cache).
    cache_dir: str | None = None
    # Start from an rlplat run / checkpoint / export (e.g. an SFT run) instead of path or tiny.
    init_from: str | None = None
    # Weight dtype: float32, bfloat16 or float16.
    dtype: str = "float32"
    # auto (cuda when available), cpu or cuda[:i].
    device: str = "auto"
    # LoRA adapter via peft; the KL reference is the model with the adapter disabled.
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Add a value head on the last prompt position (PPO needs it; GRPO does not).
    value_head: bool = False
    # Learning rate of the value head (null: the algorithm's lr).
    value_lr: float | None = None
    # Keep the value loss from shaping the shared trunk (the head reads a detached state).
    value_detach: bool = False
    # Sampling temperature of rollouts.
    temperature: float = 1.0
    # Statistics entry that unnormalises actions (null: the only one).
    unnorm_key: str | None = None
    # Keep the vision tower(s) fixed.
    freeze_vision: bool = False
    # Recompute LLM activations in backward (saves memory on 7B).
    gradient_checkpointing: bool = False
    # Copy the base weights next to the LoRA adapter in exports (off for 7B bases).
    export_base: bool = True


register("policy", "openvla", OpenVLAPolicyConfig, target="rlplat.policies.openvla.policy.OpenVLAPolicy")
