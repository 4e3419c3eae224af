import gymnasium as gym
import numpy as np
import pytest
import torch

from rlplat.policies.base import ActionPolicy
from rlplat.policies.mlp import ActorCritic, hash_words


def _spaces(image: bool = False) -> tuple[gym.spaces.Dict, gym.spaces.Box]:
    spaces = {
        "state": gym.spaces.Box(-1, 1, (6,), np.float32),
        "proprio": gym.spaces.Box(-1, 1, (2,), np.float32),
        "instruction": gym.spaces.Text(64),
    }
    if image:
        spaces["image"] = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    return gym.spaces.Dict(spaces), gym.spaces.Box(-1, 1, (2,), np.float32)


def _obs(b: int, image: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    obs = {
        "state": torch.randn(b, 6, generator=g),
        "proprio": torch.randn(b, 2, generator=g),
        "instruction": np.array(["reach the red square", "reach the blue square"] * (b // 2), dtype=object),
    }
    if image:
        obs["image"] = torch.randint(0, 256, (b, 64, 64, 3), dtype=torch.uint8, generator=g)
    return obs


def test_state_policy_shapes_and_logprob_consistency():
    torch.manual_seed(0)
    policy = ActorCritic(*_spaces(), obs_keys=["state"], hidden_sizes=[32, 32])
    assert isinstance(policy, ActionPolicy)
    obs = _obs(8)
    out = policy.act(obs)
    assert out.actions.shape == (8, 2) and out.logprobs.shape == (8,) and out.values.shape == (8,)
    ev = policy.evaluate_actions(obs, out.actions)
    torch.testing.assert_close(ev.logprobs, out.logprobs)
    # Diagonal Gaussian entropy: sum over dims of 0.5 * log(2 pi e sigma^2).
    expected = (0.5 * np.log(2 * np.pi * np.e) + policy.log_std).sum().expand(8)
    torch.testing.assert_close(ev.entropy, expected)


def test_deterministic_act_is_the_mean_and_uses_no_randomness():
    torch.manual_seed(0)
    policy = ActorCritic(*_spaces(), obs_keys=["state"], hidden_sizes=[16])
    state = torch.get_rng_state()
    a1 = policy.act(_obs(4), deterministic=True).actions
    assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(a1, policy.actor(_obs(4)))


def test_image_and_instruction_policy_reads_the_instruction():
    torch.manual_seed(0)
    policy = ActorCritic(*_spaces(image=True), obs_keys=["image", "proprio", "instruction"], hidden_sizes=[32])
    obs = _obs(4, image=True)
    out = policy.act(obs, deterministic=True)
    assert out.actions.shape == (4, 2)
    # Same images, other instruction: the features must change.
    other = dict(obs, instruction=np.array(["reach the green square"] * 4, dtype=object))
    assert not torch.allclose(policy.actor.encoder(obs), policy.actor.encoder(other))


def test_hash_words_is_stable_across_processes():
    ids, offsets = hash_words(["reach the red square", "go"], 256)
    # crc32 values, fixed forever (Python's hash() would change per process).
    assert ids.tolist()[:1] == [__import__("zlib").crc32(b"reach") % 256]
    assert offsets.tolist() == [0, 4]


def test_missing_obs_key_names_the_fix():
    with pytest.raises(ValueError, match="policy.obs_keys.*image"):
        ActorCritic(*_spaces(), obs_keys=["image"])


def test_gradients_flow_to_actor_critic_and_log_std():
    torch.manual_seed(0)
    policy = ActorCritic(*_spaces(), obs_keys=["state", "instruction"], hidden_sizes=[16])
    obs = _obs(4)
    ev = policy.evaluate_actions(obs, torch.zeros(4, 2))
    (ev.logprobs.sum() + ev.values.sum()).backward()
    grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters()}
    assert grads["log_std"] and grads["actor.mlp.0.weight"] and grads["critic.mlp.0.weight"]
    assert grads["actor.encoder.words.weight"]


def test_running_norm_merges_batches_like_one_batch():
    from rlplat.policies.mlp import RunningNorm

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 3, generator=g) * 3 + 1, torch.randn(24, 3, generator=g) * 0.5 - 2
    norm = RunningNorm((3,))
    for x in (a, b):
        norm.update(x.mean(0), x.var(0, unbiased=False), len(x))
    both = torch.cat([a, b])
    torch.testing.assert_close(norm.mean, both.mean(0))
    torch.testing.assert_close(norm.var, both.var(0, unbiased=False))
    assert float(norm.count) == 64
    z = norm(both)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_normalize_obs_standardises_vector_keys_only_after_observe():
    obs_space, act_space = _spaces()
    torch.manual_seed(0)
    plain = ActorCritic(obs_space, act_space, obs_keys=("state", "proprio", "instruction"), hidden_sizes=(16,))
    torch.manual_seed(0)
    normed = ActorCritic(obs_space, act_space, obs_keys=("state", "proprio", "instruction"), hidden_sizes=(16,),
                         normalize_obs=True)
    assert set(normed.obs_norm) == {"state", "proprio"}
    obs = _obs(8)
    # Before any statistics (mean 0, var 1) the two policies agree exactly.
    torch.testing.assert_close(plain.value(obs), normed.value(obs))
    scaled = {**obs, "state": obs["state"] * 100 + 5}
    normed.observe(scaled)
    # Now the network sees the standardised state: what the plain policy sees for z-scores.
    z = {k: (scaled[k] - scaled[k].mean(0)) / scaled[k].std(0, unbiased=False) for k in ("state", "proprio")}
    torch.testing.assert_close(normed.value(scaled), plain.value({**scaled, **z}), atol=1e-4, rtol=0)
    # The statistics are buffers: checkpoints and weight syncs carry them.
    assert "obs_norm.state.mean" in normed.trainable_state_dict()
