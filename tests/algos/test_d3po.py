"""d3po_loss on hand-computed numbers."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from rlplat.algos.d3po import d3po_loss


def test_equal_to_reference_gives_log_2():
    logp = torch.tensor([-3.0, 0.5, 10.0])
    loss = d3po_loss(logp, logp.clone(), logp - 1.0, logp - 1.0)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2.0)))


def test_inside_the_band_matches_hand_computation():
    # rho_w = exp(0.05), rho_l = exp(-0.02): both inside [0.9, 1.1].
    logp_w = torch.tensor([0.05], requires_grad=True)
    logp_l = torch.tensor([-0.02], requires_grad=True)
    loss = d3po_loss(logp_w, torch.zeros(1), logp_l, torch.zeros(1), beta=0.1, clip_coef=0.1)
    z = 0.1 * (0.05 - (-0.02))
    expected = -math.log(1 / (1 + math.exp(-z)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()
    # d/dlogp_w = -beta * sigmoid(-z); d/dlogp_l = +beta * sigmoid(-z).
    s = 1 / (1 + math.exp(z))
    assert logp_w.grad.item() == pytest.approx(-0.1 * s, rel=1e-5)
    assert logp_l.grad.item() == pytest.approx(0.1 * s, rel=1e-5)


def test_outside_the_band_is_clipped_and_has_zero_gradient():
    # rho_w = exp(0.5) > 1.1 -> 1.1; rho_l = exp(-0.5) < 0.9 -> 0.9.
    logp_w = torch.tensor([0.5], requires_grad=True)
    logp_l = torch.tensor([-0.5], requires_grad=True)
    loss = d3po_loss(logp_w, torch.zeros(1), logp_l, torch.zeros(1), beta=0.1, clip_coef=0.1)
    z = 0.1 * (math.log(1.1) - math.log(0.9))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)), rel=1e-6)
    loss.sum().backward()
    assert logp_w.grad.item() == 0.0 and logp_l.grad.item() == 0.0


def test_one_side_clipped_keeps_the_other_gradient_and_reference_gets_none():
    logp_w = torch.tensor([0.5], requires_grad=True)  # clipped
    logp_l = torch.tensor([0.01], requires_grad=True)  # inside
    ref = torch.zeros(1, requires_grad=True)
    d3po_loss(logp_w, ref, logp_l, ref, beta=1.0).sum().backward()
    assert logp_w.grad.item() == 0.0 and logp_l.grad.item() > 0
    assert ref.grad is None


def test_clip_coef_must_be_a_fraction():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="clip_coef"):
        d3po_loss(x, x, x, x, clip_coef=1.5)


def test_d3po_update_on_tiny_model_raises_preferred_likelihood(tmp_path):
    import numpy as np

    from rlplat.algos.d3po import d3po_step_loss, order_pairs
    from rlplat.envs.preference.proxy import JpegCompressibility, preference_labels
    from rlplat.policies.diffusion.pipeline import TextToImagePolicy

    torch.manual_seed(0)
    policy = TextToImagePolicy(tiny={"image_size": 16, "fold": 2, "block_out_channels": [16, 32],
                                     "text_hidden_size": 16}, cache_dir=str(tmp_path), device="cpu",
                               num_steps=3, guidance_scale=1.0, lora={"r": 4})
    prompts = ["a red circle", "two blue squares", "a green triangle", "three yellow squares"]
    generator = torch.Generator().manual_seed(1)
    x_T = torch.randn((len(prompts), *policy.latent_shape), generator=generator)
    first, second = (policy.sample_trajectory(prompts, generator=generator, latents=x_T) for _ in range(2))
    assert torch.equal(first["latents"][:, 0], second["latents"][:, 0])  # shared x_T
    size = JpegCompressibility()
    a_preferred, keep = preference_labels(size(first["images"].numpy(), prompts), size(second["images"].numpy(), prompts))
    pairs = order_pairs(first, second, a_preferred, keep)
    assert len(pairs) == 4 and keep.all()
    # Preferred = smaller JPEG: check the ordering against the scores directly.
    w_images = np.where(size(first["images"].numpy(), prompts)[:, None, None, None] >=
                        size(second["images"].numpy(), prompts)[:, None, None, None],
                        first["images"].numpy(), second["images"].numpy())
    assert np.array_equal(policy.latents_to_images(pairs["w_next_latents"][:, -1]), w_images)

    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    policy.train()
    first_losses = []
    for epoch in range(4):
        total = 0.0
        for k in range(3):
            loss, m = d3po_step_loss(policy, pairs, k, beta=1.0, clip_coef=0.5)
            if epoch == 0 and k == 0:
                assert loss.item() == pytest.approx(math.log(2.0), abs=1e-5)  # policy == reference
                assert m["kl"].item() == pytest.approx(0.0, abs=1e-8)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        first_losses.append(total / 3)
    assert first_losses[-1] < first_losses[0] - 1e-3, first_losses
    _, m = d3po_step_loss(policy, pairs, 0, beta=1.0, clip_coef=0.5)
    assert m["implicit_acc"].item() > 0.5


class PairPolicy:
    """A stand-in policy whose step log-probs are fixed: the preferred rows' first, then the others'."""

    def __init__(self, logp: dict[str, list[float]], base: dict[str, list[float]]) -> None:
        self.logp = {k: torch.tensor(v, requires_grad=True) for k, v in logp.items()}
        self.base = {k: torch.tensor(v) for k, v in base.items()}
        self.disabled = False

    def step_logprob(self, latents, next_latents, t, prompts):
        side = "w" if latents[0, 0].item() == 1.0 else "l"
        return (self.base if self.disabled else self.logp)[side]

    @contextlib.contextmanager
    def adapter_disabled(self):
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False


def test_kl_to_base_is_half_the_mean_squared_log_ratio_with_the_adapter_reference():
    from rlplat.algos.d3po import d3po_step_loss
    from rlplat.batch import Batch

    rows = 2
    pairs = Batch({"w_latents": torch.ones(rows, 1, 2), "w_next_latents": torch.ones(rows, 1, 2),
                   "l_latents": torch.zeros(rows, 1, 2), "l_next_latents": torch.zeros(rows, 1, 2),
                   "w_logprobs": torch.zeros(rows, 1), "l_logprobs": torch.zeros(rows, 1),
                   "timesteps": torch.zeros(rows, 1, dtype=torch.long)}, extras={"prompts": ["p"] * rows},
                  batch_size=rows)
    policy = PairPolicy({"w": [0.1, 0.3], "l": [-0.2, 0.0]}, {"w": [0.0, 0.0], "l": [0.0, 0.4]})
    _, metrics = d3po_step_loss(policy, pairs, 0, reference="adapter")
    squares = [0.1**2, 0.3**2, 0.2**2, 0.4**2]
    assert metrics["kl_to_base"].item() == pytest.approx(0.5 * sum(squares) / 4)
    # The sampled reference is the sampling-time policy, not the base: no kl_to_base.
    _, metrics = d3po_step_loss(policy, pairs, 0, reference="sampled")
    assert "kl_to_base" not in metrics
