import gymnasium as gym
import numpy as np
import torch

from rlplat.policies.constant import ConstantPolicy

OBS = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (3,), np.float32)})


def test_acts_the_constant_clipped_to_the_action_space():
    space = gym.spaces.Box(np.array([-1, -1, 0], np.float32), np.array([1, 1, 0.5], np.float32))
    policy = ConstantPolicy(OBS, space, value=0.8)
    out = policy.act({"state": torch.zeros(4, 3)})
    torch.testing.assert_close(out.actions, torch.tensor([[0.8, 0.8, 0.5]] * 4))
    assert out.logprobs.shape == (4,) and out.values is None and not policy.has_value
    zero = ConstantPolicy(OBS, gym.spaces.Box(-1, 1, (7,), np.float32)).act({"state": torch.zeros(2, 3)}, True)
    assert torch.equal(zero.actions, torch.zeros(2, 7))


def test_evaluate_gives_a_loss_an_optimizer_can_step():
    policy = ConstantPolicy(OBS, gym.spaces.Box(-1, 1, (2,), np.float32))
    ev = policy.evaluate_actions({"state": torch.zeros(3, 3)}, torch.zeros(3, 2))
    loss = -(ev.logprobs + ev.entropy).mean()
    loss.backward()
    assert policy.dummy.grad is not None and ev.logprobs.shape == (3,)
