"""OpenVLAPolicy: the ActionPolicy contract on the tiny preset, LoRA, value head, exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlplat.batch import Batch
from rlplat.envs.toy import ToyReachEnv
from rlplat.policies.openvla import ActionTokenizer, compute_stats, load_stats
from rlplat.policies.openvla.config import ADAPTER_DIR, resolve_pretrained
from rlplat.policies.openvla.policy import TOKENS_KEY, OpenVLAPolicy, ensure_tiny, load, tiny_cache_dir

TINY = {"image_size": 16, "vision_hidden_size": 16, "llm_hidden_size": 32, "llm_layers": 1, "vision_layers": 1}


@pytest.fixture(scope="module")
def env() -> ToyReachEnv:
    env = ToyReachEnv(num_envs=6, obs_mode="rgb", image_size=32)
    env.reset(seed=3)
    return env


@pytest.fixture(scope="module")
def obs(env: ToyReachEnv) -> Batch:
    o, _ = env.reset(seed=3)
    return Batch.from_numpy_dict(o)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def make(env: ToyReachEnv, cache: Path, **kwargs) -> OpenVLAPolicy:
    torch.manual_seed(0)
    return OpenVLAPolicy(env.single_observation_space, env.single_action_space, tiny=TINY, cache_dir=str(cache), **kwargs)


def test_tiny_preset_is_built_once_and_loaded_through_from_pretrained(env, cache) -> None:
    folder = ensure_tiny(str(cache), action_dim=2, **TINY)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny(str(cache), action_dim=2, **TINY) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # Another shape gets another folder.
    assert tiny_cache_dir(str(cache), {"action_dim": 2, **TINY, "llm_layers": 2}) != folder


def test_act_returns_tokens_that_decode_to_the_actions(env, cache, obs) -> None:
    policy = make(env, cache, value_head=True)
    with torch.no_grad():
        out = policy.act(obs)
    tokens = out.extras[TOKENS_KEY]
    assert out.actions.shape == (6, 2) and tokens.shape == (6, 2) and out.values.shape == (6,)
    # Tiny stats are the identity on [-1, 1]: actions are the tokenizer's bin centres.
    tok: ActionTokenizer = policy.action_tokenizer
    np.testing.assert_allclose(out.actions.numpy(), tok.decode(tokens.numpy()), atol=1e-6)
    low, high = tok.action_token_range
    assert bool(((tokens >= low) & (tokens <= high)).all())
    # Sampled log-probs are those evaluate_actions() recomputes with gradients.
    ev = policy.evaluate_actions(obs, out.actions, out.extras)
    torch.testing.assert_close(ev.logprobs, out.logprobs, atol=1e-5, rtol=0)
    assert ev.logprobs.requires_grad
    # Fresh value head starts at exactly 0.
    assert torch.equal(out.values, torch.zeros(6))


def test_evaluate_without_tokens_tokenises_the_actions(env, cache, obs) -> None:
    policy = make(env, cache)
    with torch.no_grad():
        out = policy.act(obs, deterministic=True)
        by_tokens = policy.evaluate_actions(obs, out.actions, out.extras).logprobs
        by_actions = policy.evaluate_actions(obs, out.actions, None).logprobs
    torch.testing.assert_close(by_actions, by_tokens)


def test_per_token_logprobs_sum_to_the_per_action_ones(env, cache, obs) -> None:
    per_action, per_token = make(env, cache), make(env, cache, logprob_per_token=True)
    with torch.no_grad():
        out = per_token.act(obs, deterministic=True)
        tokens = per_token.evaluate_actions(obs, out.actions, out.extras).logprobs
        actions = per_action.evaluate_actions(obs, out.actions, out.extras).logprobs
    assert out.logprobs.shape == tokens.shape == (6, 2) and actions.shape == (6,)
    torch.testing.assert_close(out.logprobs, tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.sum(-1), actions, atol=1e-5, rtol=0)


def test_action_stats_unnormalise_decoded_actions(env, cache, obs) -> None:
    policy = make(env, cache)
    demos = np.stack([np.linspace(-0.5, 0.5, 200), np.linspace(0.0, 0.2, 200)], axis=1)
    policy.set_action_stats(compute_stats(demos), "toy")
    with torch.no_grad():
        actions = policy.act(obs, deterministic=True).actions.numpy()
    q01, q99 = np.quantile(demos, 0.01, axis=0), np.quantile(demos, 0.99, axis=0)
    assert np.all(actions >= q01 - 1e-6) and np.all(actions <= q99 + 1e-6)
    # Actions inside [q01, q99] round-trip through tokens to within one bin.
    tokens = policy.actions_to_tokens(torch.as_tensor(actions))
    np.testing.assert_allclose(policy.tokens_to_actions(tokens).numpy(), actions, atol=(q99 - q01).max() / 128)


def test_lora_trains_only_adapter_and_value_head(env, cache, obs) -> None:
    policy = make(env, cache, value_head=True, lora={"r": 4})
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "value_head" in n for n in trainable)
    with torch.no_grad():
        out = policy.act(obs)
    ev = policy.evaluate_actions(obs, out.actions, out.extras)
    (ev.logprobs.sum() + ev.values.sum()).backward()
    for name, p in policy.named_parameters():
        if p.requires_grad:
            continue
        assert p.grad is None, f"frozen {name} got a gradient"
    grads = [n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("lora_B" in n for n in grads) and any("value_head" in n for n in grads)
    # Checkpoints and weight syncs carry only the trained weights.
    assert set(policy.trainable_state_dict()) == trainable


def test_reference_with_adapter_disabled_equals_the_base_model(env, cache, obs) -> None:
    base = make(env, cache)
    policy = make(env, cache, lora={"r": 4})
    with torch.no_grad():
        # Train-like adapter weights (B starts at 0, which would make the check vacuous).
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
        out = policy.act(obs)
        adapted = policy.evaluate_actions(obs, out.actions, out.extras).logprobs
        reference = policy.evaluate_actions_reference(obs, out.actions, out.extras).logprobs
        expected = base.evaluate_actions(obs, out.actions, out.extras).logprobs
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    # The adapter does change the policy, so the check above is not vacuous.
    assert (adapted - expected).abs().max() > 1e-4
    assert policy.reference_is_builtin and not base.reference_is_builtin


def test_value_head_gets_its_own_learning_rate(env, cache) -> None:
    policy = make(env, cache, value_head=True, value_lr=1e-2)
    groups = policy.param_groups(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 1e-2]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in policy.parameters() if p.requires_grad)
    assert all(p.shape[0] == 1 for p in groups[1]["params"])  # Linear(H, 1) weight and bias


@pytest.mark.parametrize("lora", [None, {"r": 4}])
def test_export_loads_back_with_load_and_init_from(env, cache, obs, tmp_path, lora) -> None:
    policy = make(env, cache, lora=lora, value_head=True)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name or "value_head" in name:
                p.normal_(0.0, 0.5)
    policy.set_action_stats(compute_stats(np.random.default_rng(0).uniform(-0.3, 0.3, (100, 2))), "toy")
    export = policy.save_pretrained(tmp_path / "policy" / "pretrained")
    assert (export / "dataset_statistics.json").is_file()
    assert (export / ADAPTER_DIR / "adapter_config.json").is_file() == bool(lora)
    assert load_stats(export)["toy"]["action"]["q99"] == policy.norm_stats["toy"]["action"]["q99"]
    assert resolve_pretrained(tmp_path) == export
    with torch.no_grad():
        out = policy.act(obs, deterministic=True)
        model, processor, tok, stats = load(export)
        inputs = processor(obs["image"], list(obs["instruction"]))
        tokens, _ = model.generate_actions(**inputs, action_tokenizer=tok)
    torch.testing.assert_close(tokens, out.extras[TOKENS_KEY])
    assert set(stats) == {"toy"}
    restored = make(env, cache, init_from=str(tmp_path), value_head=True)
    with torch.no_grad():
        again = restored.act(obs, deterministic=True)
    torch.testing.assert_close(again.actions, out.actions)
    torch.testing.assert_close(again.values, out.values)


def test_adapter_only_export_names_its_base(env, cache, tmp_path) -> None:
    policy = make(env, cache, lora={"r": 2}, export_base=False)
    export = policy.save_pretrained(tmp_path / "x")
    assert not (export / "config.json").exists()
    config = json.loads((export / ADAPTER_DIR / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == policy.base_source.resolve()
    load(export)  # finds the base through the adapter config


def test_bad_inputs_name_the_field(env, cache, tmp_path) -> None:
    state_env = ToyReachEnv(num_envs=2, obs_mode="state")
    with pytest.raises(ValueError, match="obs_mode"):
        OpenVLAPolicy(state_env.single_observation_space, state_env.single_action_space, tiny=TINY)
    with pytest.raises(FileNotFoundError, match="hf download openvla/openvla-7b"):
        make(env, cache, path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="init_from"):
        make(env, cache, init_from=str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        make(env, cache, dtype="fp8")
