"""Gaussian actor-critic for state and/or image observations (the cleanrl / ManiSkill PPO shape).

Actor and critic are separate towers (no shared trunk, as in cleanrl's continuous PPO), each
encoding the observation keys it is given: flat vectors (``state``, ``proprio``) are
concatenated, ``image`` goes through a small CNN, and ``instruction`` strings become a hashed
bag of words, so the same class serves as the state baseline and the language-conditioned
image baseline.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Normal

from rlplat.policies.base import ActionPolicy, ActOutput, EvalOutput, Observation
from rlplat.registry import register

_VECTOR_KEYS = ("state", "proprio")


def _layer(module: nn.Module, gain: float = float(np.sqrt(2)), bias: float = 0.0) -> nn.Module:
    """Orthogonal init (the PPO implementation detail that matters for stability)."""
    nn.init.orthogonal_(module.weight, gain)
    nn.init.constant_(module.bias, bias)
    return module


def hash_words(texts: Sequence[str], buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids and offsets for ``nn.EmbeddingBag``; crc32 so ids agree across processes."""
    ids: list[int] = []
    offsets: list[int] = []
    for text in texts:
        offsets.append(len(ids))
        words = str(text).lower().split() or [""]
        ids.extend(zlib.crc32(w.encode()) % buckets for w in words)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


class ObsEncoder(nn.Module):
    """Concatenated features of the chosen observation keys."""

    def __init__(
        self,
        observation_space: gym.spaces.Dict,
        obs_keys: Sequence[str],
        instruction_dim: int,
        instruction_buckets: int,
    ) -> None:
        super().__init__()
        missing = [k for k in obs_keys if k not in observation_space.spaces]
        if missing:
            raise ValueError(
                f"policy.obs_keys={list(obs_keys)} asks for {missing}, but the env only provides "
                f"{sorted(observation_space.spaces)}; change policy.obs_keys or env.obs_mode"
            )
        self.obs_keys = list(obs_keys)
        self.vector_keys = [k for k in self.obs_keys if k in _VECTOR_KEYS]
        self.out_dim = sum(int(np.prod(observation_space[k].shape)) for k in self.vector_keys)
        self.cnn: nn.Module | None = None
        if "image" in self.obs_keys:
            h, w, c = observation_space["image"].shape
            self.cnn = nn.Sequential(
                _layer(nn.Conv2d(c, 16, 8, stride=4)), nn.ReLU(),
                _layer(nn.Conv2d(16, 32, 4, stride=2)), nn.ReLU(),
                _layer(nn.Conv2d(32, 32, 3, stride=1)), nn.ReLU(),
                nn.Flatten(),
            )
            with torch.no_grad():
                self.out_dim += self.cnn(torch.zeros(1, c, h, w)).shape[1]
        self.words: nn.EmbeddingBag | None = None
        self.instruction_buckets = instruction_buckets
        if "instruction" in self.obs_keys:
            self.words = nn.EmbeddingBag(instruction_buckets, instruction_dim, mode="mean")
            self.out_dim += instruction_dim

    def forward(self, obs: Observation) -> torch.Tensor:
        device = next(self.parameters(), torch.empty(0)).device
        parts = [torch.as_tensor(obs[k], device=device).float().flatten(1) for k in self.vector_keys]
        if self.cnn is not None:
            image = torch.as_tensor(obs["image"], device=device)
            parts.append(self.cnn(image.permute(0, 3, 1, 2).float() / 255.0))
        if self.words is not None:
            ids, offsets = hash_words(list(obs["instruction"]), self.instruction_buckets)
            parts.append(self.words(ids.to(device), offsets.to(device)))
        return torch.cat(parts, dim=-1)


class RunningNorm(nn.Module):
    """Standardises one observation key with running mean and variance of the training data.

    The statistics are buffers, so checkpoints and weight syncs carry them; they change only in
    ``update`` (once per training batch), never while acting, so a rollout and the update that
    follows it see the same normalisation. Outputs are clipped to +-``clip`` (cleanrl's 10).
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.clip, self.eps = clip, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - self.mean) / torch.sqrt(self.var + self.eps)
        return z.clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Merges a batch's mean, (population) variance and row count (Chan et al.'s parallel rule)."""
        total = self.count + count
        delta = mean - self.mean
        new_mean = self.mean + delta * (count / total)
        m2 = self.var * self.count + var * count + delta.pow(2) * (self.count * count / total)
        self.mean.copy_(new_mean)
        self.var.copy_(m2 / total)
        self.count.fill_(float(total))


class _Tower(nn.Module):
    """Encoder + MLP with a linear head of ``out_dim`` outputs."""

    def __init__(self, encoder: ObsEncoder, hidden_sizes: Sequence[int], out_dim: int, head_gain: float):
        super().__init__()
        self.encoder = encoder
        layers: list[nn.Module] = []
        width = encoder.out_dim
        for hidden in hidden_sizes:
            layers += [_layer(nn.Linear(width, hidden)), nn.Tanh()]
            width = hidden
        layers.append(_layer(nn.Linear(width, out_dim), gain=head_gain))
        self.mlp = nn.Sequential(*layers)

    def forward(self, obs: Observation) -> torch.Tensor:
        return self.mlp(self.encoder(obs))


@dataclass
class MLPPolicyConfig:
    """Gaussian actor-critic on state and/or image observations (policies/mlp.py)."""

    # Observation keys the policy reads: any of state, proprio, image, instruction.
    obs_keys: list[str] = field(default_factory=lambda: ["state"])
    # Hidden layer widths of the actor and the critic MLPs.
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    # Initial log standard deviation of the Gaussian action distribution.
    init_log_std: float = -0.5
    # Width of the instruction embedding (hashed bag of words) when obs_keys has instruction.
    instruction_dim: int = 32
    # Number of hash buckets for instruction words.
    instruction_buckets: int = 256
    # Standardise state/proprio with running statistics of the training batches.
    normalize_obs: bool = False


@register("policy", "mlp", MLPPolicyConfig)
class ActorCritic(ActionPolicy):
    """Diagonal-Gaussian actor and a value critic over the chosen observation keys.

    Args:
        observation_space: the env's single (unbatched) observation Dict space.
        action_space: the env's single Box action space.
        obs_keys: observation keys to read.
        hidden_sizes: MLP widths after the encoders.
        init_log_std: initial state-independent log standard deviation.
        instruction_dim: embedding width of hashed instruction words.
        instruction_buckets: hash buckets for instruction words.
    """

    def __init__(
        self,
        observation_space: gym.spaces.Dict,
        action_space: gym.spaces.Box,
        obs_keys: Sequence[str] = ("state",),
        hidden_sizes: Sequence[int] = (256, 256),
        init_log_std: float = -0.5,
        instruction_dim: int = 32,
        instruction_buckets: int = 256,
        normalize_obs: bool = False,
    ) -> None:
        super().__init__()
        action_dim = int(np.prod(action_space.shape))
        self.obs_norm = nn.ModuleDict({
            key: RunningNorm(tuple(observation_space[key].shape))
            for key in (obs_keys if normalize_obs else ()) if key in _VECTOR_KEYS
        })

        def encoder() -> ObsEncoder:
            return ObsEncoder(observation_space, obs_keys, instruction_dim, instruction_buckets)

        self.actor = _Tower(encoder(), hidden_sizes, action_dim, head_gain=0.01)
        self.critic = _Tower(encoder(), hidden_sizes, 1, head_gain=1.0)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def _normalized(self, obs: Observation) -> Observation:
        if not self.obs_norm:
            return obs
        device = self.log_std.device
        return {**{k: obs[k] for k in obs.keys()},
                **{k: norm(torch.as_tensor(obs[k], device=device)) for k, norm in self.obs_norm.items()}}

    def observe(self, obs: Observation, reduce: Callable[[list[float]], list[float]] | None = None) -> None:
        for key, norm in self.obs_norm.items():
            x = torch.as_tensor(obs[key], device=self.log_std.device).float()
            mean, var = x.mean(0), x.var(0, unbiased=False)
            if reduce is not None:  # equal shards: global mean = mean of means, E[x^2] likewise
                flat = reduce(torch.cat([mean, var + mean.pow(2)]).tolist())
                mean, second = torch.tensor(flat, device=x.device).view(2, *mean.shape)
                var = second - mean.pow(2)
            norm.update(mean, var, len(x))

    def _dist(self, obs: Observation) -> Normal:
        mean = self.actor(obs)
        return Normal(mean, self.log_std.exp().expand_as(mean))

    def act(self, obs: Observation, deterministic: bool = False) -> ActOutput:
        obs = self._normalized(obs)
        dist = self._dist(obs)
        actions = dist.mean if deterministic else dist.sample()
        return ActOutput(actions, dist.log_prob(actions).sum(-1), self._value(obs))

    def evaluate_actions(
        self, obs: Observation, actions: torch.Tensor, extras: Mapping[str, Any] | None = None
    ) -> EvalOutput:
        obs = self._normalized(obs)
        dist = self._dist(obs)
        return EvalOutput(dist.log_prob(actions).sum(-1), dist.entropy().sum(-1), self._value(obs))

    def value(self, obs: Observation) -> torch.Tensor:
        return self._value(self._normalized(obs))

    def _value(self, normalized: Observation) -> torch.Tensor:
        return self.critic(normalized).squeeze(-1)
