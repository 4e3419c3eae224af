"""OpenVLA (Prismatic) as a transformers model: SigLIP [+ DINOv2] -> MLP projector -> Llama.

The module layout and parameter names follow OpenVLA's HF port, so a converted checkpoint's keys
line up: ``vision_backbone.featurizer`` [``vision_backbone.fused_featurizer``], ``projector.fc1/
fc2[/fc3]``, ``language_model`` (a ``LlamaForCausalLM``), plus our optional ``value_head``.

Reference (behaviour reproduced, code written independently), openvla/openvla:

- ``prismatic/extern/hf/configuration_prismatic.py``: ``PrismaticConfig`` / ``OpenVLAConfig``
  store ``vision_backbone_id``, ``llm_backbone_id``, ``use_fused_vision_backbone``,
  ``image_sizes`` (a list, one per backbone), ``text_config``, ``pad_token_id`` (32000) and
  ``pad_to_multiple_of`` (64), ``norm_stats``, ``n_action_bins`` (256). For the fused
  ``dinosiglip-vit-so-224px`` backbone the timm ids are ``[dinov2 (reg4), siglip]``: the
  *first* backbone, ``featurizer``, is DINOv2 and ``fused_featurizer`` is SigLIP.
- ``prismatic/extern/hf/modeling_prismatic.py``:
  ``PrismaticVisionBackbone``: each featurizer returns the patch tokens (prefix tokens dropped)
  of the **second-to-last** block (timm ``get_intermediate_layers(n={len(blocks) - 2})``, no
  final norm); fused pixel values are split ``[3, 3]`` along channels and the two feature maps
  concatenated along features.
  ``PrismaticProjector``: non-fused ``fc1: vision->llm, GELU, fc2: llm->llm``; fused
  ``fc1: vision->4*vision, GELU, fc2: 4*vision->llm, GELU, fc3: llm->llm``.
  ``forward``: the projected patches are inserted right after the BOS token,
  ``[BOS, patches, rest]``, with the attention mask extended by ones and labels by -100.
  ``OpenVLAForActionPrediction``: the action vocabulary is ``text_config.vocab_size -
  pad_to_multiple_of`` (32064 - 64 = 32000); generation there is batch-size-1 and unmasked.

Differences, on purpose: batched generation with left padding (the patches go after each row's
first attended token, positions come from the attention mask), logits restricted to the action
ids, and ``evaluate_actions`` for RL. Vision features are taken from ``hidden_states[-2]`` of
the HF vision models, which equals timm's second-to-last block output.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DynamicCache,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from rlplat.policies.openvla.action_tokenizer import ActionTokenizer
from rlplat.policies.openvla.processor import (
    OpenVLAProcessor,
    build_tiny_tokenizer,
    processor_config_for,
)

IGNORE_INDEX = -100

try:  # transformers >= 5 declares composite configs with SubConfigSpec.
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # pragma: no cover - transformers 4.x
    SubConfigSpec = None


def _as_config(value: Any, cls: type[PretrainedConfig]) -> PretrainedConfig | None:
    return cls(**value) if isinstance(value, dict) else value


class OpenVLAConfig(PretrainedConfig):
    """Configuration of ``OpenVLAForActionPrediction`` (OpenVLA's fields, transformers sub-configs).

    Args:
        siglip_config: The SigLIP vision tower (``featurizer``, or ``fused_featurizer`` when fused).
        dino_config: The DINOv2-with-registers tower; required when ``use_fused_vision_backbone``
            (it is then the ``featurizer``, as in OpenVLA's ``dinosiglip`` backbones).
        text_config: The Llama LLM.
        use_fused_vision_backbone: DINOv2 + SigLIP (6-channel pixel values) instead of SigLIP alone.
        image_sizes: Input side per backbone (OpenVLA stores a list; all entries must be equal).
        vision_feature_layer: Which ``hidden_states`` entry of the vision towers to use (-2:
            the second-to-last block, as OpenVLA).
        n_action_bins: Bins of the action tokenizer (OpenVLA: 256).
        action_dim: Tokens generated per action (OpenVLA derives it from ``norm_stats``).
        norm_stats: ``dataset_statistics.json`` content keyed by dataset (may be empty).
        pad_to_multiple_of: Rows added to the embedding for alignment; the action vocabulary is
            ``text_config.vocab_size - pad_to_multiple_of`` (OpenVLA-7B: 64).
        value_head: Add ``value_head: Linear(llm_hidden, 1)`` on the last prompt position.
        vision_backbone_id, llm_backbone_id: Informational names (OpenVLA's identifiers).
    """

    model_type = "rlplat_openvla"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "siglip_config": SubConfigSpec(SiglipVisionConfig),
            "dino_config": SubConfigSpec(Dinov2WithRegistersConfig, optional=True),
            "text_config": SubConfigSpec(LlamaConfig),
        }
    else:  # pragma: no cover - transformers 4.x
        sub_configs = {
            "siglip_config": SiglipVisionConfig,
            "dino_config": Dinov2WithRegistersConfig,
            "text_config": LlamaConfig,
        }

    def __init__(
        self,
        siglip_config: SiglipVisionConfig | dict | None = None,
        dino_config: Dinov2WithRegistersConfig | dict | None = None,
        text_config: LlamaConfig | dict | None = None,
        use_fused_vision_backbone: bool = False,
        image_sizes: list[int] | None = None,
        vision_feature_layer: int = -2,
        n_action_bins: int = 256,
        action_dim: int = 7,
        norm_stats: dict[str, Any] | None = None,
        pad_to_multiple_of: int = 0,
        value_head: bool = False,
        vision_backbone_id: str = "siglip",
        llm_backbone_id: str = "llama",
        **kwargs: Any,
    ) -> None:
        self.siglip_config = _as_config(siglip_config, SiglipVisionConfig) or SiglipVisionConfig()
        self.dino_config = _as_config(dino_config, Dinov2WithRegistersConfig)
        self.text_config = _as_config(text_config, LlamaConfig) or LlamaConfig()
        self.use_fused_vision_backbone = bool(use_fused_vision_backbone)
        if self.use_fused_vision_backbone and self.dino_config is None:
            raise ValueError("use_fused_vision_backbone=True needs a dino_config (the DINOv2 featurizer)")
        n_backbones = 2 if self.use_fused_vision_backbone else 1
        self.image_sizes = list(image_sizes) if image_sizes is not None else [self.siglip_config.image_size] * n_backbones
        if len(self.image_sizes) != n_backbones or len(set(self.image_sizes)) != 1:
            raise ValueError(
                f"image_sizes must hold {n_backbones} equal sizes (one per backbone), got {self.image_sizes}"
            )
        self.vision_feature_layer = int(vision_feature_layer)
        self.n_action_bins = int(n_action_bins)
        self.action_dim = int(action_dim)
        self.norm_stats = dict(norm_stats) if norm_stats else {}
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.value_head = bool(value_head)
        self.vision_backbone_id = vision_backbone_id
        self.llm_backbone_id = llm_backbone_id
        kwargs.setdefault("pad_token_id", self.text_config.pad_token_id)
        super().__init__(**kwargs)

    @property
    def image_size(self) -> int:
        """Square input side shared by the vision backbones."""
        return self.image_sizes[0]

    @property
    def action_vocab_size(self) -> int:
        """The vocabulary size the action ids count down from (OpenVLA's ``vocab_size``)."""
        return self.text_config.vocab_size - self.pad_to_multiple_of

    def action_tokenizer(self) -> ActionTokenizer:
        """The ``ActionTokenizer`` this model's action ids follow."""
        return ActionTokenizer(vocab_size=self.action_vocab_size, n_bins=self.n_action_bins)


class OpenVLAVisionBackbone(nn.Module):
    """Patch features [B, N, D] (D summed over backbones) of the chosen hidden layer."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        self.use_fused_vision_backbone = config.use_fused_vision_backbone
        self.feature_layer = config.vision_feature_layer
        siglip = SiglipVisionModel(config.siglip_config)
        if self.use_fused_vision_backbone:
            # OpenVLA's dinosiglip order: DINOv2 first (channels 0:3), SigLIP second (3:6).
            self.featurizer = Dinov2WithRegistersModel(config.dino_config)
            self.fused_featurizer = siglip
            self.embed_dim = config.dino_config.hidden_size + config.siglip_config.hidden_size
        else:
            self.featurizer = siglip
            self.embed_dim = config.siglip_config.hidden_size

    def _patches(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        # DINOv2 prefixes [CLS, registers...]; SigLIP has no prefix tokens.
        n_prefix = 1 + tower.config.num_register_tokens if isinstance(tower, Dinov2WithRegistersModel) else 0
        return hidden[:, n_prefix:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.use_fused_vision_backbone:
            return self._patches(self.featurizer, pixel_values)
        first, second = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self._patches(self.featurizer, first), self._patches(self.fused_featurizer, second)], dim=2)


class OpenVLAProjector(nn.Module):
    """Prismatic's GELU MLP from vision features to LLM embeddings (fc3 only when fused)."""

    def __init__(self, fused: bool, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
            self.act_fn2 = nn.GELU()
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act_fn1(self.fc1(patches)))
        if self.fused:
            x = self.fc3(self.act_fn2(x))
        return x


@dataclass
class _Prompt:
    """A left-padded multimodal prompt ready for the decoder."""

    embeds: torch.Tensor  # [B, T + P, H]
    attention_mask: torch.Tensor  # [B, T + P]
    position_ids: torch.Tensor  # [B, T + P]


class OpenVLAForActionPrediction(PreTrainedModel):
    """OpenVLA with batched, action-masked generation and teacher-forced action log-probs."""

    config_class = OpenVLAConfig
    config: OpenVLAConfig
    base_model_prefix = "openvla"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["OpenVLAProjector"]

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__(config)
        self.vision_backbone = OpenVLAVisionBackbone(config)
        self.projector = OpenVLAProjector(
            config.use_fused_vision_backbone, self.vision_backbone.embed_dim, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        if config.value_head:
            self.value_head = nn.Linear(config.text_config.hidden_size, 1)
        self.post_init()

    # ---- transformers boilerplate ---------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # ---- multimodal prompt ---------------------------------------------------------------

    def embed_prompt(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> _Prompt:
        """[pads, BOS, patches, rest of prompt] per row, with mask and positions (left padding)."""
        _check_left_padded(attention_mask)
        batch, length = input_ids.shape
        patches = self.projector(self.vision_backbone(pixel_values.to(self.dtype)))
        n_patches = patches.shape[1]
        text = self.get_input_embeddings()(input_ids)
        source = torch.cat([text, patches.to(text.dtype)], dim=1)  # [B, T + P, H]
        # Row b has k_b left pads and its BOS at k_b. Output slot j takes: text j (j <= k_b),
        # patch j - k_b - 1 (k_b < j <= k_b + P), text j - P (after the patches).
        n_pad = (attention_mask == 0).sum(dim=1, keepdim=True)  # [B, 1]
        j = torch.arange(length + n_patches, device=input_ids.device).unsqueeze(0)  # [1, T + P]
        is_patch = (j > n_pad) & (j <= n_pad + n_patches)
        index = torch.where(j <= n_pad, j, torch.where(is_patch, length + j - n_pad - 1, j - n_patches))
        embeds = source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
        mask = (j >= n_pad).to(attention_mask.dtype).expand(batch, -1)
        return _Prompt(embeds, mask, _positions(mask))

    def _decoder_kwargs(self, cache: DynamicCache | None) -> dict[str, Any]:
        # transformers 5.x names the cache argument `cache`, 4.x `past_key_values`.
        return {_cache_kwarg(self.language_model.get_decoder()): cache}

    def _decode(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Final (normed) hidden states [B, S, H] of the LLM decoder."""
        out = self.language_model.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **self._decoder_kwargs(cache),
        )
        return out.last_hidden_state

    def _action_logits(self, hidden: torch.Tensor, action_tokenizer: ActionTokenizer) -> torch.Tensor:
        """Float32 logits [..., n_bins] restricted to the action ids (inclusive range)."""
        low, high = action_tokenizer.action_token_range
        if high >= self.config.text_config.vocab_size:
            raise ValueError(
                f"action ids {low}..{high} exceed the LLM vocabulary ({self.config.text_config.vocab_size}); "
                f"build the ActionTokenizer with vocab_size={self.config.action_vocab_size}"
            )
        head = self.get_output_embeddings()
        # Only the action rows of the LM head: equal to masking every other logit to -inf.
        weight = head.weight[low : high + 1]
        bias = head.bias[low : high + 1] if getattr(head, "bias", None) is not None else None
        return F.linear(hidden, weight, bias).float()

    def _values(self, hidden_last: torch.Tensor) -> torch.Tensor | None:
        if not self.config.value_head:
            return None
        return self.value_head(hidden_last).squeeze(-1).float()

    # ---- public API ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Full-vocabulary logits over the multimodal sequence [B, T + P, V] (OpenVLA's forward).

        ``labels`` [B, T] (-100 where ignored) get -100 for the patches and give the shifted
        cross-entropy ``loss``, as OpenVLA's fine-tuning does.
        """
        prompt = self.embed_prompt(input_ids, attention_mask, pixel_values)
        multimodal_labels = None
        if labels is not None:
            filler = torch.full_like(input_ids[:, :1], IGNORE_INDEX)
            patch_labels = filler.expand(-1, prompt.embeds.shape[1] - input_ids.shape[1])
            multimodal_labels = _insert_after_first(labels, patch_labels, attention_mask)
        return self.language_model(
            inputs_embeds=prompt.embeds,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
            labels=multimodal_labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate_actions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        action_tokenizer: ActionTokenizer,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        action_dim: int | None = None,
        return_hidden: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Action token ids [B, D] and their log-probs [B, D], KV-cached, only action ids allowed.

        One prefill over the left-padded prompt, then ``D - 1`` single-token steps. Greedy
        (argmax) unless ``do_sample``. The log-probs are under ``softmax(logits / temperature)``
        restricted to the action ids, i.e. the distribution the tokens were drawn from.
        ``D`` is ``action_dim`` or ``config.action_dim``. With ``return_hidden`` a third tensor
        follows: the hidden state [B, H] at the last prompt position (what the value head reads).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
        steps = self.config.action_dim if action_dim is None else int(action_dim)
        low = action_tokenizer.action_token_range[0]
        prompt = self.embed_prompt(input_ids, attention_mask, pixel_values)
        cache = DynamicCache(config=self.config.text_config)
        hidden = self._decode(prompt.embeds, prompt.attention_mask, prompt.position_ids, cache)[:, -1]
        prompt_hidden = hidden
        mask, position = prompt.attention_mask, prompt.position_ids[:, -1:]
        tokens, logprobs = [], []
        for step in range(steps):
            log_p = torch.log_softmax(self._action_logits(hidden, action_tokenizer) / temperature, dim=-1)
            if do_sample:
                choice = torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(-1)
            else:
                choice = log_p.argmax(dim=-1)
            tokens.append(choice + low)
            logprobs.append(log_p.gather(-1, choice.unsqueeze(-1)).squeeze(-1))
            if step == steps - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            embeds = self.get_input_embeddings()(tokens[-1].unsqueeze(-1))
            hidden = self._decode(embeds, mask, position, cache)[:, -1]
        out = (torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1))
        return (*out, prompt_hidden) if return_hidden else out

    def prompt_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Hidden state [B, H] at the last prompt position (one prefill, no generation)."""
        prompt = self.embed_prompt(input_ids, attention_mask, pixel_values)
        return self._decode(prompt.embeds, prompt.attention_mask, prompt.position_ids)[:, -1]

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) [B] (float32) from ``prompt_hidden``; needs ``config.value_head``."""
        if not self.config.value_head:
            raise ValueError("this OpenVLA config has no value head; build it with value_head=True")
        return self._values(hidden)

    def evaluate_actions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        action_token_ids: torch.Tensor,
        action_tokenizer: ActionTokenizer,
        temperature: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced log-probs of given action tokens [B, D], with gradients.

        Returns ``token_logprobs`` [B, D], ``action_logprob`` [B] (sum over D), ``entropy`` [B]
        (mean over D of the action-restricted distribution's entropy), ``hidden`` [B, H] (last
        prompt position, the state before the first action token) and ``values`` [B] when the
        config has a value head. Matches ``generate_actions``' log-probs for the same tokens.
        """
        low, high = action_tokenizer.action_token_range
        if action_token_ids.ndim != 2 or action_token_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"action_token_ids must be [B={input_ids.shape[0]}, D], got {tuple(action_token_ids.shape)}"
            )
        if bool(((action_token_ids < low) | (action_token_ids > high)).any()):
            raise ValueError(f"action_token_ids must lie in the action range {low}..{high}")
        steps = action_token_ids.shape[1]
        prompt = self.embed_prompt(input_ids, attention_mask, pixel_values)
        # The last action token predicts nothing we score, so it is not fed.
        fed = self.get_input_embeddings()(action_token_ids[:, :-1]).to(prompt.embeds.dtype)
        ones = torch.ones_like(prompt.attention_mask[:, :1]).expand(-1, steps - 1)
        mask = torch.cat([prompt.attention_mask, ones], dim=1)
        positions = prompt.position_ids[:, -1:] + torch.arange(1, steps, device=mask.device)
        hidden = self._decode(
            torch.cat([prompt.embeds, fed], dim=1), mask, torch.cat([prompt.position_ids, positions], dim=1)
        )
        scored = hidden[:, -steps:]  # position of the last prompt token, then of a_0 .. a_{D-2}
        log_p = torch.log_softmax(self._action_logits(scored, action_tokenizer) / temperature, dim=-1)
        token_logprobs = log_p.gather(-1, (action_token_ids - low).unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1).mean(-1)
        out = {
            "token_logprobs": token_logprobs,
            "action_logprob": token_logprobs.sum(-1),
            "entropy": entropy,
            "hidden": scored[:, 0],
        }
        values = self._values(scored[:, 0])
        if values is not None:
            out["values"] = values
        return out


def _cache_kwarg(decoder: nn.Module) -> str:
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    # Left padding: zeros then ones in every row, at least one attended token.
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    m = attention_mask.long()
    if bool((m[:, 1:] < m[:, :-1]).any()) or bool((m[:, -1] == 0).any()):
        raise ValueError(
            "attention_mask must be left-padded (zeros, then ones, ending in a real token); "
            "tokenize with padding_side='left' (OpenVLAProcessor does)"
        )


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask: 0 at the first attended token, 0 on pads."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _insert_after_first(values: torch.Tensor, insert: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values`` [B, T] with ``insert`` [B, P] placed after each row's first attended position."""
    length, n_insert = values.shape[1], insert.shape[1]
    n_pad = (attention_mask == 0).sum(dim=1, keepdim=True)
    j = torch.arange(length + n_insert, device=values.device).unsqueeze(0)
    is_insert = (j > n_pad) & (j <= n_pad + n_insert)
    index = torch.where(j <= n_pad, j, torch.where(is_insert, length + j - n_pad - 1, j - n_insert))
    return torch.cat([values, insert.to(values.dtype)], dim=1).gather(1, index.expand(values.shape[0], -1))


# --------------------------------------------------------------------------------------------
# Tiny preset and loading
# --------------------------------------------------------------------------------------------


def tiny_norm_stats(action_dim: int, key: str = "tiny") -> dict[str, Any]:
    """Statistics that make unnormalisation the identity on [-1, 1] (q01 = -1, q99 = 1)."""
    ones = [1.0] * action_dim
    moments = {"mean": [0.0] * action_dim, "std": ones, "max": ones, "min": [-1.0] * action_dim,
               "q01": [-1.0] * action_dim, "q99": ones}
    return {key: {"action": {**moments, "mask": [True] * action_dim}, "proprio": moments,
                  "num_transitions": 1, "num_trajectories": 1}}


def tiny_openvla_config(
    vocab_size: int,
    action_dim: int = 7,
    fused: bool = False,
    image_size: int = 32,
    value_head: bool = False,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    llm_hidden_size: int = 64,
    llm_layers: int = 2,
    patch_size: int = 8,
) -> OpenVLAConfig:
    """A small random-init config; the defaults give ~150k parameters (2-layer towers, 64-wide Llama).

    Widths must be multiples of their head count (2 heads per vision tower, ``llm_hidden_size
    // 16`` query heads and half as many key/value heads in the Llama).
    """
    patch = patch_size
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of the patch size {patch}, got {image_size}")
    siglip = SiglipVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch, vision_use_head=False,
    )
    dino = None
    if fused:
        dino = Dinov2WithRegistersConfig(
            hidden_size=vision_hidden_size, mlp_ratio=2, num_hidden_layers=vision_layers, num_attention_heads=2,
            image_size=image_size, patch_size=patch, num_register_tokens=4,
        )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=llm_hidden_size, intermediate_size=2 * llm_hidden_size,
        num_hidden_layers=llm_layers, num_attention_heads=max(1, llm_hidden_size // 16),
        num_key_value_heads=max(1, llm_hidden_size // 32), max_position_embeddings=512,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    return OpenVLAConfig(
        siglip_config=siglip, dino_config=dino, text_config=text, use_fused_vision_backbone=fused,
        action_dim=action_dim, norm_stats=tiny_norm_stats(action_dim), value_head=value_head,
        vision_backbone_id="tiny-dinosiglip" if fused else "tiny-siglip", llm_backbone_id="tiny-llama",
    )


def build_tiny_openvla(
    save_dir: str | os.PathLike,
    action_dim: int = 7,
    fused: bool = False,
    image_size: int = 32,
    seed: int = 0,
    value_head: bool = False,
    **sizes: int,
) -> Path:
    """Randomly initialise a tiny OpenVLA and save model, tokenizer and processor to ``save_dir``.

    Load it back with ``load_openvla(save_dir)``. Deterministic given ``seed``. ``sizes`` go to
    ``tiny_openvla_config`` (``vision_hidden_size``, ``llm_layers``, ...).
    """
    save_dir = Path(save_dir)
    tokenizer = build_tiny_tokenizer(save_dir, num_action_bins=256)
    config = tiny_openvla_config(
        vocab_size=len(tokenizer), action_dim=action_dim, fused=fused, image_size=image_size,
        value_head=value_head, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OpenVLAForActionPrediction(config)
    model.save_pretrained(save_dir)
    OpenVLAProcessor(tokenizer, processor_config_for(fused, image_size, interpolation="bilinear")).save_pretrained(
        save_dir
    )
    return save_dir


def load_openvla(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[OpenVLAForActionPrediction, OpenVLAProcessor, ActionTokenizer]:
    """Model (eval mode), processor and action tokenizer from a local directory (no downloads)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}; pass a local directory written by save_pretrained")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = OpenVLAForActionPrediction.from_pretrained(path, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, OpenVLAProcessor.from_pretrained(path), model.config.action_tokenizer()



# --------------------------------------------------------------------------------------------
# openvla/openvla-7b: its published config.json -> OpenVLAConfig
# --------------------------------------------------------------------------------------------

# timm towers of Prismatic's 224 px backbones (vit_large_patch14_reg4_dinov2, vit_so400m_patch14_siglip_224).
_DINOV2_L14_REG4 = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
    "patch_size": 14, "num_register_tokens": 4,
}
_SIGLIP_SO400M_14 = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
    "patch_size": 14, "vision_use_head": False,
}
_BACKBONES = {"dinosiglip-vit-so-224px": True, "siglip-vit-so400m": False}


def openvla_config_from_json(raw: dict[str, Any], value_head: bool = False) -> OpenVLAConfig:
    """Our config for OpenVLA's own ``config.json`` (``model_type: openvla``, remote-code format).

    Supports the 224 px backbones OpenVLA ships (``dinosiglip-vit-so-224px`` as in openvla-7b,
    ``siglip-vit-so400m``); ``text_config`` fills in Llama-2-7B's defaults as transformers does.
    """
    backbone = raw.get("vision_backbone_id", "dinosiglip-vit-so-224px")
    if backbone not in _BACKBONES:
        raise ValueError(f"vision_backbone_id={backbone!r} is not supported; known: {sorted(_BACKBONES)}")
    fused = bool(raw.get("use_fused_vision_backbone", _BACKBONES[backbone]))
    sizes = list(raw.get("image_sizes", [224, 224] if fused else [224]))
    text = {k: v for k, v in dict(raw.get("text_config", {})).items() if k not in ("model_type", "torch_dtype")}
    text.setdefault("vocab_size", 32064)
    text.setdefault("pad_token_id", raw.get("pad_token_id", 32000))
    return OpenVLAConfig(
        siglip_config=SiglipVisionConfig(image_size=sizes[-1], **_SIGLIP_SO400M_14),
        dino_config=Dinov2WithRegistersConfig(image_size=sizes[0], **_DINOV2_L14_REG4) if fused else None,
        text_config=LlamaConfig(**text),
        use_fused_vision_backbone=fused,
        image_sizes=sizes,
        n_action_bins=int(raw.get("n_action_bins", 256)),
        action_dim=7,
        norm_stats=raw.get("norm_stats") or {},
        pad_to_multiple_of=int(raw.get("pad_to_multiple_of", 64)),
        value_head=value_head,
        vision_backbone_id=backbone,
        llm_backbone_id=raw.get("llm_backbone_id", "llama2-7b-pure"),
    )


def openvla_7b_config(value_head: bool = False) -> OpenVLAConfig:
    """openvla-7b's shape (DINOv2-L/14 + SigLIP-So400m/14 at 224 px, Llama-2 7B, 32064 rows)."""
    return openvla_config_from_json(
        {"vision_backbone_id": "dinosiglip-vit-so-224px", "text_config": {"vocab_size": 32064}}, value_head
    )


def instantiate_on(config: OpenVLAConfig, dtype: torch.dtype, device: str | torch.device) -> OpenVLAForActionPrediction:
    """A randomly initialised model built directly on ``device`` in ``dtype`` (no fp32 CPU copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return OpenVLAForActionPrediction(config)
    finally:
        torch.set_default_dtype(previous)
