"""Config of the text-to-image diffusion family and the check of its weights on disk (light:
composing and validating a config imports no diffusers)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlplat.policies.lora import LoRAConfig
from rlplat.registry import checked, register


@dataclass
class DiffusionTinyConfig:
    """Shape of the random-init tiny text-to-image model (built once, cached, loaded with from_pretrained)."""

    # Side of the square images in pixels.
    image_size: int = 32
    # pixel_unshuffle factor: a 3 x H x W image is a 3 f^2 x H/f x W/f latent.
    fold: int = 2
    # UNet channels per level (each level halves the resolution).
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    # First level with cross-attention to the prompt (attention at full resolution is slow on CPUs).
    attention_from_level: int = 1
    # Width of the frozen text encoder (the fixed word embeddings).
    text_hidden_size: int = 32
    # Zero-terminal-SNR betas with v-prediction and trailing timesteps (false: SD1.5's epsilon
    # schedule, whose x_T keeps 6.8% of the image: pixel-space samples then show a colour checkerboard).
    zero_terminal_snr: bool = True
    # Init seed of the random weights (part of the cache key).
    seed: int = 0


@dataclass
class DiffusionPolicyConfig:
    """Text-to-image DDIM sampler with per-step log-probs (policies/diffusion/pipeline.py)."""

    # Local diffusers-layout folder (SD1.5, an rlplat export); null: the tiny preset.
    path: str | None = None
    # Tiny preset shape, used when path is null.
    tiny: DiffusionTinyConfig = field(default_factory=DiffusionTinyConfig)
    # Cache folder of the tiny preset (null: $RLPLAT_CACHE_DIR or <tmp>/rlplat-cache).
    cache_dir: str | None = None
    # Weight dtype: float32, bfloat16 or float16.
    dtype: str = "float32"
    # auto (cuda when available), cpu or cuda[:i].
    device: str = "auto"
    # LoRA adapter via peft; the reference model is the adapter disabled.
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # DDIM steps per sample.
    num_steps: int = checked(20, ge=1)
    # Classifier-free guidance weight (1: no guidance, one UNet pass per step).
    guidance_scale: float = checked(3.0, ge=0)
    # DDIM noise scale; > 0, since a deterministic step has no log-probability.
    eta: float = checked(1.0, ge=0, le=1)
    # Reduction of the per-element Gaussian log-density of a step: mean (DDPO/D3PO) or sum.
    reduction: str = "mean"
    # Images sampled per UNet batch (larger requests are split).
    sample_batch_size: int = checked(64, ge=1)


SD15_HINT = (
    "download it once on a machine with hub access (e.g. `hf download "
    "stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir /data/sd15 --include '*.json' '*.txt' "
    "'*.safetensors'`), copy the folder here and pass policy.path=/data/sd15 or export SD15_PATH=/data/sd15"
)


def find_diffusion_dir(path: str | os.PathLike) -> Path:
    """A local folder with ``unet/`` and ``scheduler/``; FileNotFoundError naming where to put it."""
    folder = Path(path).expanduser()
    missing = [p for p in ("unet/config.json", "scheduler/scheduler_config.json") if not (folder / p).is_file()]
    if missing:
        raise FileNotFoundError(f"policy.path={str(path)!r} is not a local diffusers model folder (missing {missing}): "
                                f"{SD15_HINT}")
    return folder


def preflight(path: str | None = None, **_: Any) -> None:
    """Fails before any worker starts when ``path`` is not a local diffusers folder."""
    if path:
        find_diffusion_dir(path)


register("policy", "diffusion", DiffusionPolicyConfig, target="rlplat.policies.diffusion.pipeline.TextToImagePolicy",
         preflight=preflight, contract="DiffusionPolicy")
