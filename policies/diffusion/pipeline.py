"""Text-to-image policy over diffusers parts: UNet, DDIM scheduler, text encoder, VAE or pixels.

A folder in diffusers' layout holds the parts: ``unet/``, ``scheduler/``, ``text_encoder/``,
``tokenizer/`` and, for latent models such as Stable Diffusion 1.5, ``vae/``. Without ``vae/``
the model works in pixel space folded by ``pixel_unshuffle`` (factor f: a 3 x H x W image is a
3f^2 x H/f x W/f "latent"), which is what the tiny preset uses so it trains on a CPU.

``sample_trajectory`` runs DDIM with classifier-free guidance and eta > 0 and records every
step (latents before and after, timestep, log-prob) into a ``Batch``; ``step_logprob`` rescores
recorded steps under the current weights (with gradients), which is what DDPO and D3PO train on.
The tiny preset is built once with random weights, saved with ``save_pretrained`` and always
loaded with ``from_pretrained``; its text encoder is a small CLIP text transformer that stays
frozen (fixed word embeddings; only the UNet learns) with a local word-level tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlplat.batch import Batch
from rlplat.policies.base import DiffusionPolicy
from rlplat.policies.cache import build_once, cached_folder
from rlplat.policies.diffusion.config import find_diffusion_dir
from rlplat.policies.diffusion.logprob import (
    ddim_output_scale,
    ddim_step_deterministic,
    ddim_step_with_logprob,
    prediction_target,
)
from rlplat.policies.lora import lora_rank, peft_lora_config

_TINY_BUILD_VERSION = 3
# Distinct prompts whose text-encoder states are kept (the cache is cleared when it would overflow).
_PROMPT_CACHE_SIZE = 4096
# Words of the tiny tokenizer: the shapes world's captions (envs/preference/shapes.py) and a few more.
_TINY_WORDS = ["a", "an", "one", "two", "three", "four", "red", "green", "blue", "yellow", "purple", "orange", "pink", "white", "black", "gray", "brown", "cyan", "circle", "circles", "square", "squares", "triangle", "triangles", "on", "background", "of", "and", "the", "with", "image", "photo"]
def build_tiny_tokenizer(save_dir: str | os.PathLike, max_length: int = 16):
    """A word-level tokenizer over ``_TINY_WORDS`` (pad/bos/eos/unk first), saved and reloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate([*specials, *dict.fromkeys(_TINY_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length, padding_side="right")
    fast.save_pretrained(save_dir)
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


def build_tiny_diffusion(
    save_dir: str | os.PathLike,
    image_size: int = 32,
    fold: int = 2,
    block_out_channels: Sequence[int] = (32, 64),
    attention_from_level: int = 1,
    text_hidden_size: int = 32,
    num_train_timesteps: int = 1000,
    zero_terminal_snr: bool = True,
    seed: int = 0,
) -> Path:
    """Writes a random tiny text-to-image model in diffusers' folder layout; returns the folder.

    ``block_out_channels`` gives one UNet level per entry (each halves the resolution); levels
    from ``attention_from_level`` on get cross-attention to the prompt. Attention at the full
    16 x 16 resolution costs more than the rest of the UNet on a CPU (measured: 2.8 vs 1.3
    training steps/s at batch 64 for channels (32, 64)), and the prompt is read well enough at
    the coarser levels and the mid block.

    The scheduler has SD1.5's scaled-linear betas. With ``zero_terminal_snr`` (the default) they
    are rescaled so that x_T carries no signal, with v-prediction and trailing timesteps (Lin et
    al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed"). Without it x_T
    keeps sqrt(alpha_T) = 0.068 of the image, as large as the spread of a 16 x 16 channel's
    mean in pure noise (1/16): a pixel-space model then reads each folded channel's noise mean
    as image colour, and its samples carry a 2 x 2 checkerboard of colour (measured on the first
    shipped base model: foreground share 0.96 at guidance 3; 0.51 once x_T's channel means were
    set as a white image's would be). ``zero_terminal_snr=False`` gives SD1.5's exact settings
    (epsilon prediction, leading timesteps, steps_offset 1).
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if image_size % fold:
        raise ValueError(f"image_size={image_size} must be a multiple of fold={fold}")
    save_dir = Path(save_dir)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(save_dir / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    text.save_pretrained(save_dir / "text_encoder")
    channels = 3 * fold * fold
    attends = [level >= attention_from_level for level in range(len(block_out_channels))]
    unet = UNet2DConditionModel(
        sample_size=image_size // fold, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        cross_attention_dim=text_hidden_size,
        attention_head_dim=8, norm_num_groups=min(32, block_out_channels[0] // 2),
    )
    unet.save_pretrained(save_dir / "unet")
    snr = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  **(snr if zero_terminal_snr else {})).save_pretrained(save_dir / "scheduler")
    (save_dir / "model_index.json").write_text(json.dumps({"_class_name": "rlplat.TinyTextToImage", "fold": fold}))
    return save_dir


def ensure_tiny(cache_dir: str | os.PathLike | None, **build_args: Any) -> Path:
    """The tiny preset's cache folder for ``build_args``, built there on first use."""
    target = cached_folder(cache_dir, "diffusion_tiny", build_args, _TINY_BUILD_VERSION)
    return build_once(target, "unet/config.json", lambda tmp: build_tiny_diffusion(tmp, **build_args))


class TextToImagePolicy(DiffusionPolicy):
    """DDIM text-to-image sampler with per-step log-probs (the diffusion ``policy``).

    Args:
        path: Local diffusers-layout folder (e.g. SD1.5); null builds/loads the tiny preset.
        tiny: Build arguments of the tiny preset (``image_size``, ``fold``, ``block_out_channels``...).
        cache_dir: Where the tiny preset is cached (null: ``$RLPLAT_CACHE_DIR`` or the temp dir).
        dtype: float32, bfloat16 or float16 for the UNet, text encoder and VAE.
        device: auto (cuda when available), cpu or cuda[:i].
        lora: ``r`` (0: train the whole UNet), ``alpha``, ``dropout``, ``target_modules`` (default:
            the UNet attention projections to_q/to_k/to_v/to_out.0).
        num_steps: DDIM steps per sample.
        guidance_scale: Classifier-free guidance weight (1: no guidance, one UNet pass per step).
        eta: DDIM noise scale (> 0 for log-probs).
        reduction: "mean" or "sum" of the per-element log-density (ddim_step_with_logprob).
        sample_batch_size: Images per UNet batch when a caller samples more (``sample_chunked``).
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        tiny: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        lora: Mapping[str, Any] | None = None,
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        eta: float = 1.0,
        reduction: str = "mean",
        sample_batch_size: int = 64,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"policy.dtype={dtype!r} is not one of {sorted(dtypes)}")
        if not eta > 0:
            raise ValueError(f"policy.eta={eta} must be > 0: a deterministic DDIM step has no log-probability")
        if num_steps < 1:
            raise ValueError(f"policy.num_steps={num_steps} must be >= 1")
        folder = find_diffusion_dir(path) if path else ensure_tiny(cache_dir, **dict(tiny or {}))
        self.source = folder
        self._device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        torch_dtype = dtypes[dtype]
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch_dtype)
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        self.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch_dtype) if (folder / "vae").is_dir() else None
        if self.vae is None:
            self.fold = round((self.unet.config.in_channels // 3) ** 0.5)
            if 3 * self.fold**2 != self.unet.config.in_channels:
                raise ValueError(f"{folder}: a pixel-space UNet needs 3 f^2 input channels, got {self.unet.config.in_channels}")
        else:
            self.fold = 1
            self.vae.requires_grad_(False)
        if (folder / "unet_lora").is_dir():
            # An export of a LoRA run: its adapter becomes part of the base weights.
            self.unet.load_lora_adapter(folder / "unet_lora", adapter_name="export", prefix=None,
                                        weight_name="pytorch_lora_weights.safetensors")
            self.unet.fuse_lora(adapter_names=["export"])
            self.unet.unload_lora()
        self.text_encoder.requires_grad_(False)
        self.lora_rank = lora_rank(lora)
        if self.lora_rank > 0:
            self.unet.requires_grad_(False)
            # The attention projections (D3PO's and DDPO's setting).
            self.unet.add_adapter(peft_lora_config(lora, ["to_q", "to_k", "to_v", "to_out.0"]))
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.reduction = reduction
        self.sample_batch_size = int(sample_batch_size)
        self.scheduler.set_timesteps(self.num_steps)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.to(self._device)
        self.eval()

    # ------------------------------------------------------------------ training interface
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """One optimizer group: the trainable UNet weights (LoRA or all) at ``lr``."""
        return [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": lr}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet weights training changes (the LoRA factors, or every UNet weight)."""
        return {f"unet.{name}": p for name, p in self.unet.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads what ``trainable_state_dict`` returned; the names must match exactly."""
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"trainable weights do not match this policy (missing {missing}, unexpected "
                             f"{unexpected}): was the checkpoint written with the same policy.lora.r?")
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name.removeprefix("unet.")].copy_(value)

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path:
        """Writes a diffusers-layout folder that ``policy.path`` loads again.

        The frozen parts (text encoder, tokenizer, scheduler, VAE) are copied from the source
        folder. Full fine-tuning writes ``unet/``; LoRA keeps the base ``unet/`` and adds the
        adapter in ``unet_lora/`` (diffusers' ``save_lora_adapter`` format), fused in at load.
        """
        if self.lora_rank > 0 and (self.source / "unet_lora").is_dir():
            raise ValueError(f"{self.source} is itself a LoRA export; a second adapter on top of it cannot be "
                             f"exported as one folder: train with policy.lora.r=0 or export the first run merged")
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        parts = ["text_encoder", "tokenizer", "scheduler", "vae", "model_index.json"] + (["unet"] if self.lora_rank else [])
        for part in (self.source / name for name in parts):
            if not part.exists():
                continue
            if part.is_dir():
                shutil.copytree(part, save_dir / part.name, dirs_exist_ok=True)
            else:
                shutil.copy2(part, save_dir / part.name)
        if self.lora_rank > 0:
            with _without_noop_cast_warning():
                self.unet.save_lora_adapter(save_dir / "unet_lora")
        else:
            self.unet.save_pretrained(save_dir / "unet")
        return save_dir

    # ------------------------------------------------------------------ helpers
    @property
    def reference_is_builtin(self) -> bool:
        """The reference model is the UNet with its LoRA adapter disabled (no second copy)."""
        return self.lora_rank > 0

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Runs the block with the base UNet (needs LoRA)."""
        if self.lora_rank <= 0:
            raise RuntimeError("adapter_disabled() needs policy.lora.r > 0 (there is no adapter to disable)")
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D] (padded to the tokenizer's max length).

        The text encoder is frozen, so each distinct prompt is encoded once and cached: training
        rescores every denoising step of the same prompts many times.
        """
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if len(self._prompt_cache) + len(missing) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.clear()
        for prompt in missing:
            # One prompt per pass: a batched matmul's last bits depend on the batch it ran in, and
            # a resumed run must see exactly the encodings of the uninterrupted one.
            ids = self.tokenizer([prompt], padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            self._prompt_cache[prompt] = self.text_encoder(input_ids=ids.input_ids.to(self._device)).last_hidden_state[0]
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def images_to_latents(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] images -> latents [B, C, h, w] (the diffusion space)."""
        x = torch.as_tensor(np.asarray(images), device=self._device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.vae is None:
            return F.pixel_unshuffle(x, self.fold).to(self.unet.dtype)
        with torch.no_grad():
            dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def latents_to_images(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [B, C, h, w] -> uint8 images [B, H, W, 3]."""
        if self.vae is None:
            x = F.pixel_shuffle(latents.float(), self.fold)
        else:
            x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor, uncond: torch.Tensor | None,
                      guidance_scale: float) -> torch.Tensor:
        """The UNet's (guided) prediction; ``uncond`` None or guidance 1 means one conditional pass."""
        if uncond is None or guidance_scale == 1.0:
            return self.unet(latents, t, encoder_hidden_states=cond).sample
        t = torch.as_tensor(t, device=latents.device)
        both = self.unet(torch.cat([latents, latents]), torch.cat([t, t]) if t.ndim else t,
                         encoder_hidden_states=torch.cat([uncond, cond])).sample
        out_uncond, out_cond = both.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    # ------------------------------------------------------------------ DiffusionPolicy
    @torch.no_grad()
    def sample_trajectory(
        self, prompts: Sequence[str], generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
        guidance_scale: float | None = None, sde_step: int | None = None, prefix_steps: int = 0,
        prefix_generators: Sequence[torch.Generator] | None = None,
    ) -> Batch:
        """Samples images for ``prompts`` and records the DDIM trajectory.

        Returns a Batch of B rows: ``latents`` [B, T, C, h, w] (x_t before each step),
        ``next_latents`` [B, T, C, h, w] (x_{t-1}), ``timesteps`` [B, T], ``logprobs`` [B, T],
        ``images`` uint8 [B, H, W, 3] and ``prompts`` (extras). ``latents`` given: start from
        that x_T (e.g. shared by the two samples of a D3PO pair).

        ``sde_step`` given: only that step (an index into the T steps) draws noise (with the
        policy's eta); every other step is the deterministic DDIM step (eta = 0, log-prob 0), so
        samples from one x_T agree up to that step and differ by its noise alone. The batch then
        also holds ``sde_step`` [B].

        ``prefix_steps`` > 0: the first ``prefix_steps`` steps draw each row's noise from its own
        generator in ``prefix_generators`` (one per row) instead of ``generator``; rows that start
        from one x_T with generators seeded alike then agree through those steps and part after them.
        """
        if sde_step is not None and not 0 <= sde_step < self.num_steps:
            raise ValueError(f"sde_step={sde_step} is not a step index of the {self.num_steps} steps (policy.num_steps)")
        if prefix_steps > 0 and (prefix_generators is None or len(prefix_generators) != len(prompts)):
            got = None if prefix_generators is None else len(prefix_generators)
            raise ValueError(f"prefix_steps={prefix_steps} needs one generator per row in prefix_generators "
                             f"({len(prompts)} rows, got {got})")
        if prefix_steps > 0 and sde_step is not None:
            raise ValueError(f"prefix_steps={prefix_steps} and sde_step={sde_step}: a branching sample is already "
                             f"deterministic before its one noisy step; give one of them")
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts)) if g != 1.0 else None
        if latents is None:
            latents = torch.randn((len(prompts), *self.latent_shape), generator=generator,
                                  device=torch.device("cpu")).to(self._device, self.unet.dtype)
        x = latents.to(self._device, self.unet.dtype) * self.scheduler.init_noise_sigma
        before, after, logps = [], [], []
        for i, t in enumerate(self.scheduler.timesteps):
            noise = self.predict_noise(x, t, cond, uncond, g)
            if sde_step is None or i == sde_step:
                step_generator = list(prefix_generators) if i < prefix_steps else generator
                x_prev, logp = ddim_step_with_logprob(self.scheduler, noise, t, x, self.eta, generator=step_generator,
                                                      reduction=self.reduction)
            else:
                x_prev = ddim_step_deterministic(self.scheduler, noise, t, x)
                logp = torch.zeros(len(prompts), device=x.device)
            before.append(x)
            after.append(x_prev)
            logps.append(logp)
            x = x_prev
        steps = len(self.scheduler.timesteps)
        fields = {
            "latents": torch.stack(before, 1).cpu(), "next_latents": torch.stack(after, 1).cpu(),
            "timesteps": self.scheduler.timesteps.reshape(1, steps).expand(len(prompts), steps).clone(),
            "logprobs": torch.stack(logps, 1).cpu(), "images": torch.as_tensor(self.latents_to_images(x)),
        }
        if sde_step is not None:
            fields["sde_step"] = torch.full((len(prompts),), int(sde_step), dtype=torch.int64)
        return Batch(
            fields,
            extras={"prompts": list(prompts)},
            meta={"guidance_scale": g, "eta": self.eta, "reduction": self.reduction},
        )

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, noise, t)``: ``x0`` noised at training timesteps; ``noise`` and ``t`` not given
        are drawn fresh (standard normal, uniform timesteps) by ``generator`` on the CPU."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator)
        if t is None:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        noise, t = noise.to(x0.device, x0.dtype), t.to(x0.device)
        return self.scheduler.add_noise(x0, noise, t), noise, t

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The UNet's conditional output (no guidance), with gradients."""
        return self.unet(x_t, t, encoder_hidden_states=self.encode_prompts(list(prompts))).sample

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's regression target for ``x0`` noised with ``noise`` at ``t`` (its prediction type)."""
        return prediction_target(self.scheduler, x0, noise, t)

    def step_output_scale(self, t: torch.Tensor) -> torch.Tensor:
        """|d mu_t / d output| / sigma_t of the DDIM steps at timesteps ``t`` (``ddim_output_scale``):
        how much each step's log-prob gradient is magnified relative to the others."""
        return ddim_output_scale(self.scheduler, t, self.eta)

    def step_logprob(self, latents_t: torch.Tensor, latents_prev: torch.Tensor, t: torch.Tensor, cond: Any
                     ) -> torch.Tensor:
        """log p(latents_prev | latents_t) [B] under the current weights, with gradients.

        ``cond``: the prompts (a list of strings) or a dict with ``prompts`` and optionally
        ``guidance_scale`` (default: the policy's).
        """
        if isinstance(cond, Mapping):
            prompts, g = cond["prompts"], float(cond.get("guidance_scale", self.guidance_scale))
        else:
            prompts, g = cond, self.guidance_scale
        text = self.encode_prompts(list(prompts))
        uncond = self.encode_prompts([""] * len(prompts)) if g != 1.0 else None
        x = latents_t.to(self._device, self.unet.dtype)
        t = torch.as_tensor(t, device=self._device)
        noise = self.predict_noise(x, t, text, uncond, g)
        _, logp = ddim_step_with_logprob(self.scheduler, noise, t, x, self.eta, prev_sample=latents_prev.to(x),
                                         reduction=self.reduction)
        return logp


class _DropNoopCastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32" not in record.getMessage()


@contextmanager
def _without_noop_cast_warning() -> Iterator[None]:
    """diffusers' ``save_lora_adapter`` casts the UNet with ``to(dtype=None)``, a no-op that logs
    a warning about float32 modules (with an empty list of them) on every save, i.e. every
    checkpoint of a LoRA run; this drops that one message while the block runs."""
    log, drop = logging.getLogger("diffusers.models.modeling_utils"), _DropNoopCastWarning()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)
