"""Diffusion-DPO loss on hand-computed numbers."""

import math

import pytest
import torch

from rlplat.algos.dpo import diffusion_dpo_loss


def test_loss_and_implicit_accuracy_on_hand_numbers():
    # Pair 0: the model improves w by 0.02 and worsens l by 0.01 against the reference:
    # inside = -(10 / 2) * ((0.10 - 0.12) - (0.31 - 0.30)) = -5 * (-0.03) = 0.15.
    # Pair 1: the opposite: inside = -5 * ((0.14 - 0.12) - (0.29 - 0.30)) = -5 * 0.03 = -0.15.
    m_w, m_l = torch.tensor([0.10, 0.14]), torch.tensor([0.31, 0.29])
    r_w, r_l = torch.tensor([0.12, 0.12]), torch.tensor([0.30, 0.30])
    loss, acc = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=10.0)
    expected = [-math.log(1 / (1 + math.exp(-0.15))), -math.log(1 / (1 + math.exp(0.15)))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert acc.item() == 0.5


def test_model_equal_to_reference_gives_log_2_and_zero_accuracy():
    err = torch.rand(5)
    loss, acc = diffusion_dpo_loss(err, err + 0.1, err, err + 0.1, beta=5000.0)
    assert loss.tolist() == pytest.approx([math.log(2)] * 5) and acc.item() == 0.0


def test_gradient_lowers_the_preferred_error_and_raises_the_other():
    m_w, m_l = torch.tensor([0.2], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    loss, _ = diffusion_dpo_loss(m_w, m_l, torch.tensor([0.2]), torch.tensor([0.2]), beta=100.0)
    loss.sum().backward()
    assert m_w.grad.item() > 0 > m_l.grad.item()  # gradient descent lowers err_w, raises err_l


def test_shapes_must_match():
    with pytest.raises(ValueError, match="equal"):
        diffusion_dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)


# --------------------------------------------------------------------------- the algorithm on the tiny model

TINY = {"image_size": 16, "fold": 2, "block_out_channels": [16, 32], "text_hidden_size": 16}
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three yellow squares"]


def _policy(cache, lora_r: int):
    from rlplat.policies.diffusion.pipeline import TextToImagePolicy

    torch.manual_seed(0)
    return TextToImagePolicy(tiny=TINY, cache_dir=str(cache), device="cpu", num_steps=3, guidance_scale=1.0,
                             lora={"r": lora_r})


def _pairs(n: int = 4):
    import numpy as np

    from rlplat.batch import Batch
    from rlplat.envs.preference.shapes import parse_caption, render

    rng = np.random.default_rng(0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    images_w = np.stack([render(parse_caption(p), 16, rng) for p in prompts])
    images_l = rng.integers(0, 256, images_w.shape, dtype=np.uint8)  # noise: the dispreferred image
    return Batch({"images_w": torch.as_tensor(images_w), "images_l": torch.as_tensor(images_l)},
                 extras={"prompts": prompts})


def _dpo(**cfg):
    from rlplat.algos.dpo import DiffusionDPO

    base = {"beta": 500.0, "batch_size": 4, "micro_batch": 2, "num_minibatches": 1, "reference": "auto",
            "optim": {"lr": 1e-2, "eps": 1e-8, "max_grad_norm": 1.0, "anneal_lr": False, "weight_decay": 0.0}}
    return DiffusionDPO(**{**base, **cfg})


def test_pair_errors_share_noise_and_start_at_log_2(tmp_path):
    from rlplat.algos.dpo import pair_errors

    policy = _policy(tmp_path, lora_r=4)
    batch = _pairs()
    w = batch["images_w"].numpy()
    err_w, err_l, ref_w, ref_l = pair_errors(policy, w, w.copy(), PROMPTS, torch.Generator().manual_seed(0))
    assert torch.equal(err_w, err_l)  # the same image, the same noise and timestep: the same error
    assert torch.allclose(err_w, ref_w)  # a fresh LoRA adapter is the identity
    err_w, err_l, ref_w, ref_l = pair_errors(policy, w, batch["images_l"].numpy(), PROMPTS,
                                             torch.Generator().manual_seed(0))
    loss, acc = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=5000.0)
    assert loss.tolist() == pytest.approx([math.log(2)] * 4, abs=1e-5) and acc.item() == 0.0


def test_update_with_lora_moves_the_adapter_only_and_the_reference_stays(tmp_path):
    from rlplat.algos.optim import build_optimizer

    policy = _policy(tmp_path, lora_r=4)
    algo = _dpo()
    algo.attach(policy)
    assert algo.reference_model is None  # the reference is the adapter disabled
    frozen = {k: v.clone() for k, v in policy.unet.named_parameters() if "lora" not in k}
    lora = {k: v.clone() for k, v in policy.unet.named_parameters() if "lora_B" in k}
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([100, 700])
    with torch.no_grad(), policy.adapter_disabled():
        before = policy.predict(x, t, PROMPTS[:2])
    optimizer = build_optimizer(policy.param_groups(1e-2), algo.optim)
    batch = _pairs(8)
    policy.train()
    metrics = [algo.update(policy, optimizer, batch, torch.Generator().manual_seed(k)) for k in range(4)]
    assert metrics[0]["train/minibatches"] == 2.0  # 8 pairs / 4 per step; 2 passes of 2 per step
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] and metrics[-1]["train/implicit_acc"] > 0.5
    after = dict(policy.unet.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, after[k]) for k, v in lora.items())
    with torch.no_grad(), policy.adapter_disabled():
        assert torch.equal(policy.predict(x, t, PROMPTS[:2]), before)


def test_full_fine_tuning_keeps_a_frozen_copy_as_the_reference(tmp_path):
    from rlplat.algos.optim import build_optimizer

    policy = _policy(tmp_path, lora_r=0)
    algo = _dpo()
    algo.attach(policy)
    reference = algo.reference_model
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    start = {k: v.clone() for k, v in policy.unet.named_parameters()}
    optimizer = build_optimizer(policy.param_groups(1e-3), algo.optim)
    policy.train()
    algo.update(policy, optimizer, _pairs(4), torch.Generator().manual_seed(0))
    moved = dict(policy.unet.named_parameters())
    assert any(not torch.equal(v, moved[k]) for k, v in start.items())
    assert all(torch.equal(v, dict(reference.unet.named_parameters())[k]) for k, v in start.items())


def test_batch_arithmetic_and_reference_are_checked():
    from rlplat.algos.base import BatchArithmeticError

    with pytest.raises(BatchArithmeticError, match=r"algo.batch_size=6 .* algo.micro_batch=4"):
        _dpo(batch_size=6, micro_batch=4).check(lora_rank=4)
    with pytest.raises(ValueError, match="algo.reference=adapter needs a LoRA adapter"):
        _dpo(reference="adapter").check(lora_rank=0)
    _dpo(batch_size=8, micro_batch=4).check(lora_rank=0)
