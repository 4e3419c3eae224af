"""A new env, policy and algorithm added from outside rlplat: what a user writes to extend it.

Each part is a class, its config dataclass and ``@register``; each gets one small YAML in the
user's own config folder (see tests/test_registry.py). rlplat finds this module through
``RLPLAT_PLUGINS=rlplat_example_parts`` (or the ``rlplat.plugins`` entry-point group) and the
YAML files through ``hydra.searchpath``.

- ``line`` env: reach a target on a line (state = position and target, one action dimension).
- ``linear`` policy: a linear Gaussian actor with a linear critic.
- ``vpg`` algorithm: vanilla policy gradient on normalised discounted returns-to-go.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.distributions import Normal

from rlplat.algos.base import Algorithm
from rlplat.algos.optim import OptimConfig
from rlplat.batch import Batch
from rlplat.envs.base import Obs, Seed, VectorEnv, step_info
from rlplat.policies.base import ActionPolicy, ActOutput, EvalOutput, Observation
from rlplat.registry import register

# --------------------------------------------------------------------------- env


@dataclass
class LineEnvConfig:
    """Reach a target on the line [-1, 1]."""

    # Parallel envs in total.
    num_envs: int = 16
    # Episode limit in steps.
    max_episode_steps: int = 20
    # Distance to the target that counts as success (ends the episode).
    success_radius: float = 0.1


@register("env", "line", LineEnvConfig)
class LineReachEnv(VectorEnv):
    """Position and target drawn in [-1, 1]; the action moves the position by 0.25 x a."""

    def __init__(self, num_envs: int = 16, max_episode_steps: int = 20, success_radius: float = 0.1,
                 ignore_terminations: bool = False) -> None:
        obs_space = spaces.Dict({
            "state": spaces.Box(-1.0, 1.0, (2,), np.float32),
            "instruction": spaces.Text(32),
        })
        super().__init__(num_envs, max_episode_steps, obs_space, spaces.Box(-1.0, 1.0, (1,), np.float32))
        self.radius = success_radius
        self.ignore_terminations = ignore_terminations
        self.pos = np.zeros(num_envs, np.float32)
        self.goal = np.zeros(num_envs, np.float32)
        self.t = np.zeros(num_envs, np.int64)
        self.ret = np.zeros(num_envs, np.float32)
        self.rngs = [np.random.default_rng(i) for i in range(num_envs)]

    def _obs(self) -> Obs:
        return {"state": np.stack([self.pos, self.goal], 1).astype(np.float32),
                "instruction": np.array(["reach the target"] * self.num_envs, dtype=object)}

    def _start(self, i: int) -> None:
        self.pos[i], self.goal[i] = self.rngs[i].uniform(-1, 1, 2)
        self.t[i], self.ret[i] = 0, 0.0

    def reset(self, *, seed: Seed = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        if seed is not None:
            self.rngs = [np.random.default_rng(s) for s in self._seeds(seed)]
        for i in range(self.num_envs):
            self._start(i)
        return self._obs(), {}

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        before = np.abs(self.goal - self.pos)
        self.pos = np.clip(self.pos + 0.25 * np.clip(np.asarray(actions, np.float32).reshape(-1), -1, 1), -1, 1)
        dist = np.abs(self.goal - self.pos)
        success = dist < self.radius
        reward = (before - dist + success).astype(np.float32)
        self.t += 1
        self.ret += reward
        terminated = success & (not self.ignore_terminations)
        truncated = ~terminated & (self.t >= self.max_episode_steps)
        done = terminated | truncated
        info = step_info(success, done, self.ret, self.t, self._obs())
        for i in np.flatnonzero(done):
            self._start(i)
        return self._obs(), reward, terminated, truncated, info

    def get_state(self) -> dict[str, Any]:
        return {"pos": self.pos.copy(), "goal": self.goal.copy(), "t": self.t.copy(), "ret": self.ret.copy(),
                "rngs": [r.bit_generator.state for r in self.rngs]}

    def set_state(self, state: dict[str, Any]) -> None:
        self.pos, self.goal = state["pos"].copy(), state["goal"].copy()
        self.t, self.ret = state["t"].copy(), state["ret"].copy()
        for rng, s in zip(self.rngs, state["rngs"], strict=True):
            rng.bit_generator.state = s

    def render(self, index: int = 0) -> np.ndarray:
        frame = np.full((8, 64, 3), 255, np.uint8)
        frame[:, int((self.goal[index] + 1) * 31.5)] = (0, 160, 0)
        frame[:, int((self.pos[index] + 1) * 31.5)] = (0, 0, 0)
        return frame


# --------------------------------------------------------------------------- policy


@dataclass
class LinearPolicyConfig:
    """A linear Gaussian actor and a linear critic on the state."""

    # Initial log standard deviation of the actions.
    init_log_std: float = -0.5


@register("policy", "linear", LinearPolicyConfig)
class LinearGaussian(ActionPolicy):
    def __init__(self, observation_space: spaces.Dict, action_space: spaces.Box, init_log_std: float = -0.5) -> None:
        super().__init__()
        state_dim, action_dim = observation_space["state"].shape[0], action_space.shape[0]
        self.mean = nn.Linear(state_dim, action_dim)
        self.critic = nn.Linear(state_dim, 1)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def _dist(self, obs: Observation) -> tuple[Normal, torch.Tensor]:
        state = torch.as_tensor(obs["state"], dtype=torch.float32)
        return Normal(self.mean(state), self.log_std.exp()), self.critic(state).squeeze(-1)

    def act(self, obs: Observation, deterministic: bool = False) -> ActOutput:
        dist, value = self._dist(obs)
        actions = dist.mean if deterministic else dist.sample()
        return ActOutput(actions, dist.log_prob(actions).sum(-1), value)

    def evaluate_actions(self, obs: Observation, actions: torch.Tensor,
                 extras: Mapping[str, torch.Tensor] | None = None) -> EvalOutput:
        dist, value = self._dist(obs)
        return EvalOutput(dist.log_prob(actions).sum(-1), dist.entropy().sum(-1), value)

    def value(self, obs: Observation) -> torch.Tensor:
        return self._dist(obs)[1]


# --------------------------------------------------------------------------- algorithm


@dataclass
class VPGConfig:
    """Vanilla policy gradient: log pi(a|s) times the normalised discounted return-to-go."""

    # Env steps per env per iteration.
    rollout_steps: int = 40
    # Discount factor.
    gamma: float = 0.9
    # Minibatches per epoch.
    num_minibatches: int = 1
    # Passes over each rollout.
    update_epochs: int = 1
    # Optimizer.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-2))


@register("algo", "vpg", VPGConfig)
class VPG(Algorithm):
    needs_value = False
    needs_final_values = False

    def rollout_steps(self, max_episode_steps: int) -> int:
        return int(self.cfg["rollout_steps"])

    def compute_advantages(self, batch: Batch, num_steps: int, num_envs: int) -> Batch:
        rewards = batch["rewards"].view(num_steps, num_envs)
        dones = (batch["terminated"] | batch["truncated"]).view(num_steps, num_envs)
        returns, running = torch.zeros_like(rewards), torch.zeros(num_envs)
        for t in reversed(range(num_steps)):
            running = rewards[t] + self.cfg["gamma"] * running * (~dones[t])
            returns[t] = running
        batch["returns"] = returns.reshape(-1)
        batch["advantages"] = ((returns - returns.mean()) / (returns.std() + 1e-8)).reshape(-1)
        return batch

    def loss(self, mb: Batch, out: EvalOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = -(out.logprobs * mb["advantages"]).mean()
        return loss, {"approx_kl": (mb["logprobs"] - out.logprobs).mean().detach(),
                      "entropy": out.entropy.mean().detach()}
