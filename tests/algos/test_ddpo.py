"""DDPO's per-prompt stat tracking and the per-step PPO-clip update on the tiny model."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import numpy as np
import pytest
import torch

from rlplat.algos.ddpo import DDPO, DDPOConfig, PerPromptStatTracker, ddpo_step_loss
from rlplat.batch import Batch


def test_stat_tracker_uses_global_stats_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    adv = tracker.update(["a", "a", "b"], np.array([1.0, 3.0, 5.0]))
    g_mean, g_std = 3.0, np.std([1.0, 3.0, 5.0])
    np.testing.assert_allclose(adv, (np.array([1.0, 3.0, 5.0]) - g_mean) / (g_std + 1e-6))
    adv = tracker.update(["a", "b"], np.array([2.0, 0.0]))
    # "a" now has 3 scores (1, 3, 2): its own stats; "b" has 2: the batch's.
    np.testing.assert_allclose(adv[0], (2.0 - 2.0) / (np.std([1.0, 3.0, 2.0]) + 1e-6))
    np.testing.assert_allclose(adv[1], (0.0 - 1.0) / (np.std([2.0, 0.0]) + 1e-6))
    tracker.update(["a"] * 3, np.array([7.0, 8.0, 9.0]))
    assert tracker.state_dict()["a"] == [2.0, 7.0, 8.0, 9.0]  # buffer_size 4 keeps the newest
    fresh = PerPromptStatTracker(4, 3)
    fresh.load_state_dict(tracker.state_dict())
    assert fresh.state_dict() == tracker.state_dict()
    with pytest.raises(ValueError, match="2 rewards but 1 prompts"):
        tracker.update(["a"], np.array([1.0, 2.0]))


def test_ddpo_update_raises_logprob_of_positive_advantage_samples(tmp_path):
    from rlplat.policies.diffusion.pipeline import TextToImagePolicy

    torch.manual_seed(0)
    policy = TextToImagePolicy(tiny={"image_size": 16, "fold": 2, "block_out_channels": [16, 32],
                                     "text_hidden_size": 16}, cache_dir=str(tmp_path), device="cpu",
                               num_steps=2, guidance_scale=1.0, lora={"r": 4})
    traj = policy.sample_trajectory(["a red circle"] * 4, generator=torch.Generator().manual_seed(0))
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, metrics = ddpo_step_loss(policy, traj, 0, advantages, clip_coef=0.2, kl_coef=0.1)
    # On-policy start: ratio 1, loss = -mean(A) = 0, KL 0.
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and metrics["kl"].item() == pytest.approx(0.0, abs=1e-7)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    for _ in range(5):
        for k in range(2):
            loss, _ = ddpo_step_loss(policy, traj, k, advantages, clip_coef=0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        gain = torch.stack([
            policy.step_logprob(traj["latents"][:, k], traj["next_latents"][:, k], traj["timesteps"][:, k],
                                list(traj["prompts"])) - traj["logprobs"][:, k] for k in range(2)
        ]).sum(0)
    assert gain[advantages > 0].mean() > gain[advantages < 0].mean()


class ShiftedPolicy:
    """A stand-in policy: step log-probs are fixed numbers per row, the base's (adapter disabled) others."""

    def __init__(self, logp: list[float], base: list[float]) -> None:
        self.logp, self.base, self.disabled = torch.tensor(logp, requires_grad=True), torch.tensor(base), False
        self.reference_is_builtin = True

    def step_logprob(self, latents, next_latents, t, prompts):
        return (self.base if self.disabled else self.logp)[: len(prompts)]

    @contextlib.contextmanager
    def adapter_disabled(self):
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False


def _traj(rows: int) -> Batch:
    return Batch({"latents": torch.zeros(rows, 1, 2), "next_latents": torch.zeros(rows, 1, 2),
                  "timesteps": torch.zeros(rows, 1, dtype=torch.long), "logprobs": torch.zeros(rows, 1)},
                 extras={"prompts": ["p"] * rows}, batch_size=rows)


def test_kl_to_base_is_half_the_mean_squared_log_ratio_on_the_measured_rows():
    policy = ShiftedPolicy([0.0, 0.0, 0.0, 0.0], [0.2, -0.4, 1.0, 3.0])
    adv = torch.zeros(4)
    _, metrics = ddpo_step_loss(policy, _traj(4), 0, adv, kl_to_base_rows=2)
    assert metrics["kl_to_base"].item() == pytest.approx(0.5 * (0.2**2 + 0.4**2) / 2)  # the first 2 rows only
    _, metrics = ddpo_step_loss(policy, _traj(4), 0, adv, kl_to_base_rows=10)
    assert metrics["kl_to_base"].item() == pytest.approx(0.5 * (0.04 + 0.16 + 1.0 + 9.0) / 4)
    _, metrics = ddpo_step_loss(policy, _traj(4), 0, adv, kl_to_base_rows=0)
    assert "kl_to_base" not in metrics
    # With the KL penalty every row is measured, whatever kl_to_base_rows says.
    _, metrics = ddpo_step_loss(policy, _traj(4), 0, adv, kl_coef=0.1, kl_to_base_rows=0)
    assert metrics["kl_to_base"].item() == pytest.approx(0.5 * 10.2 / 4) and "kl" in metrics


def test_ddpo_skips_kl_to_base_without_an_adapter():
    policy = ShiftedPolicy([0.0, 0.0], [1.0, 1.0])
    policy.reference_is_builtin = False
    algo = DDPO(**{**asdict(DDPOConfig()), "kl_to_base_rows": 4})
    batch = _traj(2)
    batch["advantages"] = torch.zeros(2)
    _, metrics = algo.step_loss(policy, batch, 0)
    assert "kl_to_base" not in metrics
    policy.reference_is_builtin = True
    _, metrics = algo.step_loss(policy, batch, 0)
    assert metrics["kl_to_base"].item() == pytest.approx(0.5)


def test_trained_steps_cuts_every_per_step_field_and_keeps_the_rest():
    from rlplat.algos.base import trained_steps

    batch = Batch({"latents": torch.arange(12.0).reshape(2, 3, 2), "timesteps": torch.tensor([[9, 5, 1]] * 2),
                   "logprobs": torch.tensor([[0.1, 0.2, 0.3]] * 2), "advantages": torch.tensor([1.0, -1.0])},
                  extras={"prompts": ["a", "b"]})
    cut = trained_steps(batch, final=1)
    assert cut["timesteps"].tolist() == [[9, 5]] * 2 and cut["latents"].shape == (2, 2, 2)
    assert torch.equal(cut["latents"], batch["latents"][:, :2]) and torch.equal(cut["logprobs"], batch["logprobs"][:, :2])
    assert torch.equal(cut["advantages"], batch["advantages"]) and list(cut["prompts"]) == ["a", "b"]
    assert batch["latents"].shape == (2, 3, 2)  # the input is left as it was
    first = trained_steps(batch, initial=1)  # the layout steps (nearest the noise) cut instead
    assert first["timesteps"].tolist() == [[5, 1]] * 2 and torch.equal(first["latents"], batch["latents"][:, 1:])
    assert trained_steps(batch, initial=1, final=1)["timesteps"].tolist() == [[5]] * 2
    assert trained_steps(batch, 0, 0) is batch
    with pytest.raises(ValueError, match=r"algo.skip_initial_steps=0 \+ algo.skip_final_steps=3 leave none of the 3"):
        trained_steps(batch, final=3)
    with pytest.raises(ValueError, match=r"algo.skip_initial_steps=2 \+ algo.skip_final_steps=1 leave none"):
        trained_steps(batch, initial=2, final=1)
