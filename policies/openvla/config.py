"""Config of the OpenVLA family and the checks of its weights on disk (light: composing and
validating a config imports no model code)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlplat.policies.lora import LoRAConfig
from rlplat.registry import checked, register


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
    value_lr: float | None = checked(None, gt=0)
    # Keep the value loss from shaping the shared trunk (the head reads a detached state).
    value_detach: bool = False
    # Sampling temperature of rollouts.
    temperature: float = checked(1.0, gt=0)
    # Log-probs per action token ([B, action_dim]: PPO/GRPO clip each token's ratio, token-level
    # RL as in RL4VLA / RLinf) instead of per action (their sum, [B]).
    logprob_per_token: bool = False
    # Statistics entry that unnormalises actions (null: the only one).
    unnorm_key: str | None = None
    # Keep the vision tower(s) fixed.
    freeze_vision: bool = False
    # Recompute LLM activations in backward (saves memory on 7B).
    gradient_checkpointing: bool = False
    # Copy the base weights next to the LoRA adapter in exports (off for 7B bases).
    export_base: bool = True


# Where an rlplat checkpoint's policy folder keeps its export, and the adapter inside an export.
PRETRAINED_DIR = "pretrained"
ADAPTER_DIR = "adapter"

DOWNLOAD_HINT = (
    "download the weights once on a machine with hub access, e.g. "
    "`hf download openvla/openvla-7b --local-dir /data/openvla-7b`, copy the folder "
    "here and pass policy.path=/data/openvla-7b or export OPENVLA_7B_PATH=/data/openvla-7b (a folder with config.json and *.safetensors; "
    "timm-named Prismatic checkpoints convert with rlplat.policies.openvla.load_openvla_checkpoint)"
)


def resolve_pretrained(path: str | os.PathLike) -> Path:
    """The exported model folder behind ``path``.

    Accepts an export (``config.json`` or ``adapter/`` inside), an rlplat checkpoint's policy
    folder or step folder (``.../step_N[/policy]``, using its ``pretrained/``), or a run folder
    (its newest checkpoint).
    """
    folder = Path(path)
    candidates = [folder, folder / PRETRAINED_DIR, folder / "policy" / PRETRAINED_DIR]
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir():
        steps = sorted(
            (p for p in checkpoints.glob("step_*") if p.name.removeprefix("step_").isdigit()),
            key=lambda p: int(p.name.removeprefix("step_")),
        )
        if steps:
            candidates.append(steps[-1] / "policy" / PRETRAINED_DIR)
    for c in candidates:
        if (c / "config.json").is_file() or (c / ADAPTER_DIR / "adapter_config.json").is_file():
            return c
    raise FileNotFoundError(
        f"policy.init_from={str(path)!r}: no exported model there (looked for config.json or "
        f"{ADAPTER_DIR}/ in {', '.join(str(c) for c in candidates)}); pass a run folder, a "
        f"checkpoints/step_N folder, or a folder written by OpenVLAPolicy.save_pretrained"
    )


def find_model_dir(path: str | os.PathLike) -> Path:
    """A local model folder: ``path`` itself, or a hub id's snapshot in the local HF cache."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return folder
    if not folder.exists() and str(path).count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            pass
    raise FileNotFoundError(f"policy.path={str(path)!r} is not a local model folder: {DOWNLOAD_HINT}")


def preflight(init_from: str | None = None, path: str | None = None, **_: Any) -> None:
    """Fails in seconds when the weights ``init_from`` / ``path`` name are not on this machine."""
    if init_from:
        resolve_pretrained(init_from)
    elif path:
        find_model_dir(path)


register("policy", "openvla", OpenVLAPolicyConfig, target="rlplat.policies.openvla.policy.OpenVLAPolicy",
         preflight=preflight)
