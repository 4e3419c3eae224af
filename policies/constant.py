"""ConstantPolicy: the same action for every observation (a no-op arm, or a fixed command).

It measures what the platform costs around a simulator (``bench/rollout.py``: raw env steps/s
vs rollout steps/s through Ray with this policy) and drives smoke runs of new environments
without a model. It has no critic and one dummy weight, so every algorithm's update runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlplat.policies.base import ActionPolicy, ActOutput, EvalOutput, Observation
from rlplat.registry import register


@dataclass
class ConstantPolicyConfig:
    """The same action on every row (policies/constant.py): no-op runs and overhead benchmarks."""

    # The action, broadcast to the action shape (0: no-op for delta controllers).
    value: float = 0.0


@register("policy", "constant", ConstantPolicyConfig)
class ConstantPolicy(ActionPolicy):
    """Acts ``value`` (broadcast to the action shape, clipped to the action space) on every row.

    Args:
        observation_space: the env's single observation space (unused beyond the batch size).
        action_space: the env's single Box action space.
        value: the action (0: a no-op for delta controllers).
    """

    has_value = False

    def __init__(self, observation_space: gym.spaces.Dict, action_space: gym.spaces.Box, value: float = 0.0) -> None:
        super().__init__()
        action = np.broadcast_to(np.asarray(value, np.float32), action_space.shape)
        action = np.clip(action, action_space.low, action_space.high)
        self.register_buffer("action", torch.as_tensor(action, dtype=torch.float32))
        self.keys = list(observation_space.spaces)
        # One weight so optimizers have something to hold; the loss never depends on obs.
        self.dummy = nn.Parameter(torch.zeros(()))

    def _rows(self, obs: Observation) -> int:
        return len(obs[self.keys[0]])

    def act(self, obs: Observation, deterministic: bool = False) -> ActOutput:
        n = self._rows(obs)
        return ActOutput(actions=self.action.expand(n, *self.action.shape).clone(), logprobs=torch.zeros(n))

    def evaluate_actions(self, obs: Observation, actions: torch.Tensor,
                 extras: Mapping[str, torch.Tensor] | None = None) -> EvalOutput:
        zeros = self.dummy * torch.zeros(len(actions))
        return EvalOutput(logprobs=zeros, entropy=zeros)
