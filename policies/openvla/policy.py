"""OpenVLA as an ``ActionPolicy``: action tokens in, env actions out, LoRA and a value head.

``act`` renders OpenVLA's prompt for each observation's image and instruction, decodes the
action tokens (sampled at ``temperature``, or greedy when deterministic), maps them to bin
centres in [-1, 1] and unnormalises them with the q01/q99 statistics of ``unnorm_key``. The
tokens travel with the rollout (``extras["action_tokens"]``), so ``evaluate_actions`` scores exactly
what was sampled; given env actions without tokens (demonstrations), it normalises and
tokenises them first, which makes ``-evaluate_actions(...).logprobs`` OpenVLA's next-token
cross-entropy on action tokens.

Weights come from one of three places, in this order: ``init_from`` (an rlplat checkpoint or an
exported directory), ``path`` (a local HF-format directory such as openvla/openvla-7b), or the
``tiny`` preset, built once with ``save_pretrained`` into a cache directory and always loaded
back with ``from_pretrained``. With ``lora.r > 0`` the base is frozen and only the peft adapter
(and the value head) train; the KL reference is the same model with the adapter disabled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlplat.policies.base import ActionPolicy, ActOutput, EvalOutput, Observation
from rlplat.policies.cache import build_once, cached_folder
from rlplat.policies.lora import peft_lora_config
from rlplat.policies.openvla.action_tokenizer import (
    STATS_FILENAME,
    ActionTokenizer,
    load_stats,
    normalize,
    resolve_unnorm_key,
    save_stats,
    unnormalize,
)
from rlplat.policies.openvla.config import ADAPTER_DIR, find_model_dir, resolve_pretrained
from rlplat.policies.openvla.modeling import (
    OpenVLAForActionPrediction,
    build_tiny_openvla,
)
from rlplat.policies.openvla.processor import OpenVLAProcessor

log = logging.getLogger(__name__)

TOKENS_KEY = "action_tokens"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bump when build_tiny_openvla changes what it writes, so stale caches are not reused.
_TINY_BUILD_VERSION = 1

def tiny_cache_dir(cache_dir: str | os.PathLike | None, build_args: Mapping[str, Any]) -> Path:
    """The folder the tiny preset with ``build_args`` is cached in (not created here).

    ``cache_dir`` or ``$RLPLAT_CACHE_DIR`` or ``<tmp>/rlplat-cache``, then a name that hashes the
    build arguments, so different tiny shapes never share a folder.
    """
    return cached_folder(cache_dir, "openvla_tiny", build_args, _TINY_BUILD_VERSION)


def ensure_tiny(cache_dir: str | os.PathLike | None, **build_args: Any) -> Path:
    """Builds the tiny preset into its cache folder unless it is there; returns the folder."""
    return build_once(tiny_cache_dir(cache_dir, build_args), "config.json",
                      lambda tmp: build_tiny_openvla(tmp, **build_args))


def source_is_openvla(folder: Path) -> bool:
    """Whether ``folder`` holds OpenVLA's own (remote-code) checkpoint, built straight on the device."""
    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "openvla"


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    value_head: bool | None = None,
    merge_adapter: bool = True,
) -> tuple[nn.Module, OpenVLAProcessor, ActionTokenizer, dict[str, Any]]:
    """Model, processor, action tokenizer and statistics of an exported OpenVLA policy.

    ``path`` is anything ``resolve_pretrained`` accepts. The base weights come from the folder
    itself, or, for an adapter-only export, from the base folder its ``adapter_config.json``
    names. The adapter is merged into the base (``merge_adapter``) or kept as a peft model.
    Statistics: the folder's ``dataset_statistics.json``, else the model config's ``norm_stats``.
    """
    folder = resolve_pretrained(path)
    adapter = folder / ADAPTER_DIR
    base = folder
    if not (folder / "config.json").is_file():
        with (adapter / "adapter_config.json").open() as f:
            base = Path(json.load(f).get("base_model_name_or_path") or "")
        if not (base / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} holds only a LoRA adapter and its base model folder {str(base)!r} is missing; "
                f"put the base weights there or re-export with export_base=true"
            )
    model = _load_base(base, dtype, device, value_head)
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=not merge_adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    if device is not None:
        model = model.to(device)
    vla = _unwrap(model)
    processor_dir = folder if (folder / "tokenizer_config.json").is_file() else base
    stats = load_stats(folder) if (folder / STATS_FILENAME).is_file() else dict(vla.config.norm_stats)
    return model.eval(), OpenVLAProcessor.from_pretrained(processor_dir), vla.config.action_tokenizer(), stats


def _load_base(
    base: Path, dtype: torch.dtype | None, device: str | torch.device | None, value_head: bool | None
) -> nn.Module:
    """An rlplat/HF-format folder via from_pretrained, or OpenVLA's own checkpoint via the key mapping."""
    with (base / "config.json").open() as f:
        raw = json.load(f)
    if raw.get("model_type") == "openvla":
        from rlplat.policies.openvla.checkpoint_mapping import load_openvla_checkpoint
        from rlplat.policies.openvla.modeling import (
            instantiate_on,
            openvla_config_from_json,
        )

        config = openvla_config_from_json(raw, value_head=bool(value_head))
        model = instantiate_on(config, dtype or torch.bfloat16, device or "cpu")
        load_openvla_checkpoint(base, model, missing_ok=("value_head.",))
        return model
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if value_head is not None:
        kwargs["value_head"] = value_head
    with _quiet_transformers():
        return OpenVLAForActionPrediction.from_pretrained(base, **kwargs)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silences transformers' load report and progress bars (a fresh value head is expected)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _unwrap(model: nn.Module) -> OpenVLAForActionPrediction:
    """The OpenVLA module inside a (possibly peft-wrapped) model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, OpenVLAForActionPrediction):
        raise TypeError(f"expected an OpenVLAForActionPrediction, got {type(inner).__name__}")
    return inner


def _plain(value: Any) -> Any:
    """Hydra passes nested configs as DictConfig/ListConfig; turn them into dicts and lists."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


class OpenVLAPolicy(ActionPolicy):
    """OpenVLA over batched ``image`` + ``instruction`` observations.

    Args:
        observation_space: The env's single observation space (needs ``image`` and
            ``instruction``).
        action_space: The env's single action space (a Box of ``action_dim`` dims).
        path: Local HF-format OpenVLA folder (``config.json`` + safetensors + tokenizer).
        tiny: Build arguments of the tiny preset (``image_size``, ``llm_hidden_size``, ...), used
            when ``path`` is null; ``action_dim`` follows the env.
        cache_dir: Where the tiny preset is cached (null: ``$RLPLAT_CACHE_DIR`` or the temp dir).
        init_from: Start from an rlplat checkpoint / export instead (its adapter is merged in,
            its statistics replace the model's).
        dtype: float32, bfloat16 or float16 for the model weights.
        device: auto (cuda when available), cpu or cuda[:i].
        lora: ``r`` (0: train every weight), ``alpha``, ``dropout``, ``target_modules``.
        value_head: Add a critic on the last prompt position's hidden state (PPO).
        value_lr: Learning rate of the value head (null: the algorithm's lr).
        value_detach: Stop the value loss from shaping the shared trunk.
        temperature: Sampling temperature of rollouts (log-probs are at this temperature).
        logprob_per_token: Log-probs per action token [B, D] instead of per action [B].
        unnorm_key: Which statistics entry unnormalises actions (null: the only one).
        freeze_vision: Keep the vision backbone(s) fixed.
        gradient_checkpointing: Recompute LLM activations in backward (large models).
        export_base: Write the base weights next to the adapter in ``save_pretrained`` (off for
            7B-size bases, whose folder the adapter then names).
    """

    def __init__(
        self,
        observation_space: gym.spaces.Dict,
        action_space: gym.spaces.Box,
        *,
        path: str | None = None,
        tiny: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        init_from: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        lora: Mapping[str, Any] | None = None,
        value_head: bool = False,
        value_lr: float | None = None,
        value_detach: bool = False,
        temperature: float = 1.0,
        logprob_per_token: bool = False,
        unnorm_key: str | None = None,
        freeze_vision: bool = False,
        gradient_checkpointing: bool = False,
        export_base: bool = True,
    ) -> None:
        super().__init__()
        spaces = getattr(observation_space, "spaces", {})
        missing = [k for k in ("image", "instruction") if k not in spaces]
        if missing:
            raise ValueError(
                f"policy openvla reads image and instruction, but the env does not provide {missing}; "
                f"use an env.obs_mode with rgb (e.g. env.obs_mode=rgb)"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"policy.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        if temperature <= 0:
            raise ValueError(f"policy.temperature must be > 0, got {temperature}")
        self.action_dim = int(np.prod(action_space.shape))
        self.temperature = float(temperature)
        self.logprob_per_token = bool(logprob_per_token)
        self.value_detach = bool(value_detach)
        self.value_lr = value_lr
        self.export_base = bool(export_base)
        self.has_value = bool(value_head)
        self._device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        lora = dict(_plain(lora) or {})
        self.lora_rank = int(lora.get("r", 0))

        if init_from:
            source = resolve_pretrained(init_from)
        elif path:
            source = find_model_dir(path)
        else:
            build = {"action_dim": self.action_dim, **dict(_plain(tiny) or {})}
            source = ensure_tiny(cache_dir, **build)
        model, self.processor, self.action_tokenizer, stats = load(
            source, dtype=_DTYPES[dtype], value_head=bool(value_head),
            device=self._device if source_is_openvla(source) else None,
        )
        self.base_source = source
        vla = _unwrap(model)
        if vla.config.action_dim != self.action_dim:
            raise ValueError(
                f"the model at {source} emits {vla.config.action_dim} action tokens but the env's "
                f"actions have {self.action_dim} dims; pick a model trained for this action space"
            )
        if value_head:
            _reset_value_head_if_new(vla, source)
        if freeze_vision:
            vla.vision_backbone.requires_grad_(False)
        if gradient_checkpointing:
            vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora_rank > 0:
            from peft import get_peft_model

            # Every linear layer but the LM head (OpenVLA's fine-tuning recipe).
            config = peft_lora_config(lora, "all-linear", modules_to_save=["value_head"] if value_head else None)
            model = get_peft_model(vla, config)
        self.model = model.to(self._device)
        self.norm_stats: dict[str, Any] = dict(stats)
        self.unnorm_key = resolve_unnorm_key(self.norm_stats, unnorm_key) if self.norm_stats else None
        self.eval()

    # ------------------------------------------------------------------ properties
    @property
    def vla(self) -> OpenVLAForActionPrediction:
        """The OpenVLA module (inside the peft wrapper when LoRA is on)."""
        return _unwrap(self.model)

    @property
    def reference_is_builtin(self) -> bool:
        """With LoRA the reference is this model with the adapter disabled (no second copy)."""
        return self.lora_rank > 0

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (of the trainable ones only, if asked)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ inputs and outputs
    def _inputs(self, obs: Observation) -> dict[str, torch.Tensor]:
        instructions = [str(s) for s in np.asarray(obs["instruction"]).reshape(-1)]
        inputs = self.processor(obs["image"], instructions)
        return {k: v.to(self._device) for k, v in inputs.items()}

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Env actions [B, D] (float32) from action token ids [B, D]."""
        normalized = self.action_tokenizer.decode(tokens.cpu().numpy())
        if self.unnorm_key is not None:
            normalized = unnormalize(normalized, self.norm_stats, self.unnorm_key)
        return torch.as_tensor(np.asarray(normalized, dtype=np.float32))

    def actions_to_tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Action token ids [B, D] of env actions [B, D] (normalised, clipped, binned)."""
        a = actions.detach().cpu().numpy().astype(np.float64)
        if self.unnorm_key is not None:
            a = normalize(a, self.norm_stats, self.unnorm_key)
        return torch.as_tensor(self.action_tokenizer.encode(a), dtype=torch.long)

    def _value(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vla.values(hidden.detach() if self.value_detach else hidden)

    # ------------------------------------------------------------------ ActionPolicy
    def act(self, obs: Observation, deterministic: bool = False) -> ActOutput:
        inputs = self._inputs(obs)
        tokens, logprobs, hidden = self.vla.generate_actions(
            **inputs, action_tokenizer=self.action_tokenizer, do_sample=not deterministic,
            temperature=self.temperature, return_hidden=True,
        )
        values = self._value(hidden).cpu() if self.has_value else None
        return ActOutput(
            actions=self.tokens_to_actions(tokens),
            logprobs=(logprobs if self.logprob_per_token else logprobs.sum(-1)).float().cpu(),
            values=values,
            extras={TOKENS_KEY: tokens.cpu()},
        )

    def evaluate_actions(
        self, obs: Observation, actions: torch.Tensor, extras: Mapping[str, torch.Tensor] | None = None
    ) -> EvalOutput:
        if extras is not None and TOKENS_KEY in extras:
            tokens = extras[TOKENS_KEY]
        else:
            tokens = self.actions_to_tokens(actions)
        out = self.vla.evaluate_actions(
            **self._inputs(obs), action_token_ids=tokens.to(self._device),
            action_tokenizer=self.action_tokenizer, temperature=self.temperature,
        )
        values = self._value(out["hidden"]).cpu() if self.has_value else None
        logprobs = out["token_logprobs"] if self.logprob_per_token else out["action_logprob"]
        return EvalOutput(logprobs=logprobs.cpu(), entropy=out["entropy"].cpu(), values=values)

    def evaluate_actions_reference(
        self, obs: Observation, actions: torch.Tensor, extras: Mapping[str, torch.Tensor] | None = None
    ) -> EvalOutput:
        """``evaluate_actions`` under the base model (adapter disabled); needs LoRA."""
        with self.adapter_disabled():
            return self.evaluate_actions(obs, actions, extras)

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Runs the block with the LoRA adapter (and its value-head copy) switched off."""
        if self.lora_rank <= 0:
            raise RuntimeError("adapter_disabled() needs policy.lora.r > 0 (there is no adapter to disable)")
        with self.model.disable_adapter():
            yield

    def value(self, obs: Observation) -> torch.Tensor:
        if not self.has_value:
            raise NotImplementedError("OpenVLAPolicy was built without a value head (policy.value_head=false)")
        return self._value(self.vla.prompt_hidden(**self._inputs(obs))).cpu()

    # ------------------------------------------------------------------ training hooks
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: the trainable weights at ``lr``, the value head at ``value_lr``."""
        head = {id(p) for n, p in self.named_parameters() if "value_head" in n and p.requires_grad}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in head]
        groups = [{"params": main, "lr": lr}]
        if head:
            head_params = [p for p in self.parameters() if id(p) in head]
            groups.append({"params": head_params, "lr": self.value_lr if self.value_lr is not None else lr})
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that change in training (adapter and value head with LoRA; else all)."""
        if self.lora_rank <= 0 and all(p.requires_grad for p in self.parameters()):
            return self.state_dict()
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads what ``trainable_state_dict`` returned; every trainable weight must be there."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - set(self.state_dict())
        if missing or unexpected:
            raise KeyError(
                f"policy weights do not match this OpenVLA policy: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (was the checkpoint written with other policy.lora settings?)"
            )
        self.load_state_dict(dict(state), strict=False)

    def set_action_stats(self, stats: Mapping[str, Any], key: str) -> None:
        """Use ``stats`` (one dataset entry, ``compute_stats`` format) under ``key`` from now on."""
        self.norm_stats = load_stats({key: dict(stats)})
        self.unnorm_key = key
        self.vla.config.norm_stats = self.norm_stats

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path:
        """Exports model (or adapter + base), processor and ``dataset_statistics.json``.

        Full fine-tuning writes the model with ``save_pretrained``. With LoRA the adapter goes to
        ``adapter/`` (peft format) and the untouched base is copied next to it (``export_base``)
        or named in ``adapter_config.json``. ``load(save_dir)`` reads all three layouts.
        """
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.vla.config.norm_stats = self.norm_stats
        if self.lora_rank > 0:
            if self.export_base:
                for item in self.base_source.iterdir():
                    if item.is_file() and item.name != STATS_FILENAME:
                        shutil.copy2(item, save_dir / item.name)
            self.model.peft_config["default"].base_model_name_or_path = str(
                save_dir if self.export_base else self.base_source.resolve()
            )
            self.model.save_pretrained(save_dir / ADAPTER_DIR)
        else:
            self.vla.save_pretrained(save_dir)
        self.processor.save_pretrained(save_dir)
        if self.norm_stats:
            save_stats(self.norm_stats, save_dir / STATS_FILENAME)
        return save_dir


def _reset_value_head_if_new(vla: OpenVLAForActionPrediction, source: Path) -> None:
    """Zero a freshly added value head (V = 0 at start), keep a trained one."""
    from safetensors import safe_open

    # Also the adapter folder: with LoRA the trained head is saved there (modules_to_save).
    for shard in source.rglob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            if any(k.startswith("value_head.") or ".value_head." in k for k in f.keys()):
                return
    nn.init.zeros_(vla.value_head.weight)
    nn.init.zeros_(vla.value_head.bias)
