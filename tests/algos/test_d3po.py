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


class OutputPolicy(torch.nn.Module):
    """A stand-in policy whose model output at each denoising step is a free parameter, scored by
    the real DDIM step log-prob of the tiny model's schedule (zero terminal SNR, v-prediction)."""

    def __init__(self, num_steps: int = 10) -> None:
        super().__init__()
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                       rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                       timestep_spacing="trailing")
        self.scheduler.set_timesteps(num_steps)
        self.out = torch.nn.Parameter(torch.zeros(num_steps, 16))

    def step_logprob(self, latents, next_latents, t, prompts):
        from rlplat.policies.diffusion import ddim_step_with_logprob

        index = self.scheduler.timesteps.tolist().index(int(t[0]))
        out = self.out[index].expand_as(latents)
        return ddim_step_with_logprob(self.scheduler, out, t, latents, 1.0, prev_sample=next_latents)[1]

    def step_output_scale(self, t):
        from rlplat.policies.diffusion import ddim_output_scale

        return ddim_output_scale(self.scheduler, t, 1.0)


def _output_gradient_per_step(step_weight: str) -> torch.Tensor:
    """|change of the model output| per denoising step after one D3PO update (SGD, lr 1) on random pairs."""
    from rlplat.algos.d3po import D3PO
    from rlplat.algos.optim import OptimConfig
    from rlplat.batch import Batch
    from rlplat.policies.diffusion import ddim_step_with_logprob

    torch.manual_seed(0)
    policy, rows = OutputPolicy(), 64
    steps = len(policy.scheduler.timesteps)
    fields = {"timesteps": policy.scheduler.timesteps.repeat(rows, 1)}
    for side in "wl":
        latents = torch.randn(rows, steps, 16)
        nxt, logp = zip(*(ddim_step_with_logprob(policy.scheduler, torch.zeros(rows, 16), t, latents[:, s], 1.0)
                          for s, t in enumerate(policy.scheduler.timesteps.tolist())))
        fields |= {f"{side}_latents": latents, f"{side}_next_latents": torch.stack(nxt, 1),
                   f"{side}_logprobs": torch.stack(logp, 1)}
    pairs = Batch(fields, extras={"prompts": ["p"] * rows}, batch_size=rows)
    algo = D3PO(batch_size=rows, num_minibatches=1, update_epochs=1, timestep_fraction=1.0, beta=0.1, clip_coef=0.5,
                reference="sampled", step_weight=step_weight,
                optim=OptimConfig(lr=1.0, eps=1e-8, max_grad_norm=1e9).__dict__)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    algo.update(policy, optimizer, pairs, torch.Generator().manual_seed(0))
    return policy.out.detach().norm(dim=1)


def test_output_scale_weights_let_every_denoising_step_move_the_model():
    # Uniform weights (the papers'): the last, low-noise step's gradient is orders of magnitude
    # larger than the first steps', so an update only moves what the steps near the image do.
    uniform = _output_gradient_per_step("uniform")
    assert uniform[-1] / uniform[0] > 50
    # Weighted by 1 / (|d mu / d output| / sigma): every step moves the output by a comparable amount.
    weighted = _output_gradient_per_step("output_scale")
    assert weighted.max() / weighted.min() < 3


def test_unknown_step_weight_is_refused_naming_the_field():
    from rlplat.algos.base import step_weights

    with pytest.raises(ValueError, match="algo.step_weight"):
        step_weights(None, torch.arange(3), "snr")


def test_branch_draws_a_trainable_step_and_the_update_trains_that_step_only():
    from dataclasses import asdict

    import numpy as np

    from rlplat.algos.d3po import D3PO, D3POConfig, order_pairs
    from rlplat.algos.ddpo import DDPO, DDPOConfig
    from rlplat.batch import Batch

    def d3po(**cfg):
        return D3PO(**{**asdict(D3POConfig()), **cfg})

    rng = np.random.default_rng(0)
    assert d3po().branch_step(rng, 10) is None  # off: noise at every step
    branching = d3po(branch=True, skip_initial_steps=2, skip_final_steps=3)
    assert branching.share_noise
    assert sorted({branching.branch_step(rng, 10) for _ in range(200)}) == [2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="leave none of the 5 denoising steps"):
        branching.branch_step(rng, 5)
    # A GRPO group shares x_T when branching (its differences are then the branch step's) or when asked.
    assert not DDPO(**asdict(DDPOConfig())).share_noise
    assert DDPO(**{**asdict(DDPOConfig()), "branch": True}).share_noise
    assert DDPO(**{**asdict(DDPOConfig()), "share_noise": True}).share_noise

    # The pairs keep the branch step, and the update sees that step alone.
    traj = Batch({"latents": torch.arange(8.0).reshape(2, 4, 1), "next_latents": torch.arange(8.0).reshape(2, 4, 1) + 1,
                  "logprobs": torch.zeros(2, 4), "timesteps": torch.tensor([[999, 666, 333, 0]] * 2),
                  "sde_step": torch.tensor([1, 1])}, extras={"prompts": ["a", "a"]})
    pairs = order_pairs(traj[0::2], traj[1::2], np.array([True]), np.array([True]))
    assert pairs["sde_step"].tolist() == [1]
    part = branching.trained_part(pairs)
    assert part["timesteps"].tolist() == [[666]] and part["w_latents"].tolist() == [[[1.0]]]
    # Without a branch step the skip settings decide.
    unbranched = pairs.select(*(key for key in pairs.keys() if key != "sde_step"))
    assert d3po(skip_initial_steps=1).trained_part(unbranched)["timesteps"].tolist() == [[666, 333, 0]]


def test_a_larger_group_pairs_its_highest_and_lowest_scoring_samples():
    from dataclasses import asdict

    import numpy as np

    from rlplat.algos.d3po import D3PO, D3POConfig, pair_rows
    from rlplat.batch import Batch
    from rlplat.envs.preference.proxy import preference_labels

    # Pairs of two: the group's two rows, in order, whatever the scores.
    a, b = pair_rows(np.array([3.0, 1.0, 0.0, 5.0]), 2)
    assert a.tolist() == [0, 2] and b.tolist() == [1, 3]
    # Groups of three: the highest (first of equals) and the lowest; all equal: two different rows.
    a, b = pair_rows(np.array([0.2, 0.9, 0.1, 4.0, 4.0, 1.0, 7.0, 7.0, 7.0]), 3)
    assert a.tolist() == [1, 3, 6] and b.tolist() == [2, 5, 7]
    with pytest.raises(ValueError, match="algo.group_size=4"):
        pair_rows(np.zeros(6), 4)

    class Source:
        def labels(self, scores_a, scores_b, rng):
            return preference_labels(scores_a, scores_b, 0.0, "drop", rng)

    algo = D3PO(**{**asdict(D3POConfig()), "group_size": 3})
    assert algo.samples_per_prompt == 3 and algo.share_noise
    rows = 9
    traj = Batch({"latents": torch.arange(rows, dtype=torch.float32).reshape(rows, 1, 1).repeat(1, 2, 1),
                  "next_latents": torch.zeros(rows, 2, 1), "logprobs": torch.zeros(rows, 2),
                  "timesteps": torch.tensor([[999, 0]] * rows)},
                 extras={"prompts": [f"p{i // 3}" for i in range(rows)]})
    scores = np.array([0.2, 0.9, 0.1, 4.0, 4.0, 1.0, 7.0, 7.0, 7.0])
    pairs, metrics = algo.prepare(traj, scores, Source(), np.random.default_rng(0))
    # The third group is a tie and is dropped; the others pair best (w) with worst (l).
    assert pairs["w_latents"][:, 0, 0].tolist() == [1.0, 3.0] and pairs["l_latents"][:, 0, 0].tolist() == [2.0, 5.0]
    assert list(pairs["prompts"]) == ["p0", "p1"]
    assert metrics["pairs/kept_fraction"] == pytest.approx(2 / 3)
    assert metrics["pairs/score_gap"] == pytest.approx((0.8 + 3.0 + 0.0) / 3)


@pytest.mark.parametrize("mode", ["symmetric", "one_sided"])
def test_one_sided_clip_stops_only_the_push_the_label_asks_for(mode):
    from rlplat.algos.d3po import _clipped

    # Rows: (w moved the right way past the band, l inside), (w moved the wrong way past the band,
    # l moved the wrong way past the band), (both inside), (w inside, l moved the right way past).
    log_w = torch.tensor([0.5, -0.5, 0.02, 0.01], requires_grad=True)
    log_l = torch.tensor([0.01, 0.5, -0.03, -0.5], requires_grad=True)
    zeros = torch.zeros(4)
    loss = d3po_loss(log_w, zeros, log_l, zeros, beta=1.0, clip_coef=0.1, clip_mode=mode)
    loss.sum().backward()
    gw, gl = log_w.grad.tolist(), log_l.grad.tolist()
    # Past the band the right way: no gradient in either mode (the push is done).
    assert gw[0] == 0.0 and gl[3] == 0.0
    # Inside the band: w pushed up, l pushed down in either mode.
    assert gw[2] < 0 < gl[2] and gl[0] > 0 and gw[3] < 0
    if mode == "symmetric":  # the paper's clamp: a step that moved the wrong way is left there
        assert gw[1] == 0.0 and gl[1] == 0.0
        z = math.log(0.9) - math.log(1.1)
    else:  # PPO's pessimistic clip: it is pulled back, with the unclipped ratio in the loss
        assert gw[1] < 0 < gl[1]
        z = -0.5 - 0.5
        assert gw[1] == pytest.approx(-1 / (1 + math.exp(z)), rel=1e-5)
    assert loss[1].item() == pytest.approx(math.log(1 + math.exp(-z)), rel=1e-5)
    # The metric counts exactly the ratios whose gradient is zero.
    stopped = torch.cat([_clipped(log_w.detach(), 0.1, mode, "w"), _clipped(log_l.detach(), 0.1, mode, "l")])
    assert stopped.tolist() == [g == 0.0 for g in gw + gl]
    with pytest.raises(ValueError, match="algo.clip_mode"):
        d3po_loss(zeros, zeros, zeros, zeros, clip_mode="both")


@pytest.mark.parametrize("mode", ["symmetric", "one_sided"])
def test_the_algorithm_passes_its_clip_mode_to_the_loss(mode):
    from dataclasses import asdict

    from rlplat.algos.d3po import D3PO, D3POConfig
    from rlplat.batch import Batch

    pairs = Batch({"w_latents": torch.ones(1, 1, 2), "w_next_latents": torch.ones(1, 1, 2),
                   "l_latents": torch.zeros(1, 1, 2), "l_next_latents": torch.zeros(1, 1, 2),
                   "w_logprobs": torch.zeros(1, 1), "l_logprobs": torch.zeros(1, 1),
                   "timesteps": torch.zeros(1, 1, dtype=torch.long)}, extras={"prompts": ["p"]}, batch_size=1)
    # The preferred step has moved the wrong way, past the band.
    policy = PairPolicy({"w": [-0.5], "l": [0.0]}, {"w": [0.0], "l": [0.0]})
    loss, metrics = D3PO(**{**asdict(D3POConfig()), "clip_mode": mode}).step_loss(policy, pairs, 0)
    loss.backward()
    assert (policy.logp["w"].grad.item() < 0) == (mode == "one_sided")
    assert metrics["clip_stopped"].item() == (0.5 if mode == "symmetric" else 0.0)
