"""The denoising loss trains the tiny text-to-image model."""

from __future__ import annotations

import pytest
import torch

from rlplat.algos.diffusion_sft import denoising_loss
from rlplat.envs.preference.shapes import sample_dataset
from rlplat.policies.diffusion.pipeline import TextToImagePolicy


def test_denoising_loss_decreases_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    policy = TextToImagePolicy(tiny={"image_size": 16, "fold": 2, "block_out_channels": [16, 32],
                                     "text_hidden_size": 16}, cache_dir=str(tmp_path), device="cpu", num_steps=2)
    images, captions = sample_dataset(8, size=16, seed=0)
    params = [p for p in policy.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for p in policy.text_encoder.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    policy.train()
    losses = []
    for _ in range(40):
        # The same noise and timesteps every step: the loss must fall as the UNet fits them.
        loss = denoising_loss(policy, images, captions, generator=torch.Generator().manual_seed(1), cond_dropout=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5 and losses[-1] < 0.5 * losses[0], losses[::8]


def test_prompt_dropout_and_bad_arguments():
    with pytest.raises(ValueError, match="cond_dropout"):
        denoising_loss(None, [], [], cond_dropout=1.0)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        denoising_loss(None, [0, 0], ["a"])
