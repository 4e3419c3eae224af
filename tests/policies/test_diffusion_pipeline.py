"""The tiny text-to-image policy: build/load, trajectories, rescored log-probs, LoRA."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from rlplat.policies.diffusion.pipeline import TextToImagePolicy, ensure_tiny

TINY = {"image_size": 16, "fold": 2, "block_out_channels": [16, 32], "text_hidden_size": 16}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("diffusion-cache")


def make(cache, **kw) -> TextToImagePolicy:
    torch.manual_seed(0)
    return TextToImagePolicy(tiny=TINY, cache_dir=str(cache), device="cpu", num_steps=4, **kw)


def test_tiny_preset_is_saved_once_and_loaded_with_from_pretrained(cache):
    folder = ensure_tiny(cache, **TINY)
    assert ensure_tiny(cache, **TINY) == folder
    for part in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (folder / part).is_file(), part
    a, b = make(cache), make(cache)
    for (name, p), q in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.fold == 2 and a.latent_shape == (12, 8, 8)
    assert a.tokenizer("two red circles").input_ids[1:-1] != [a.tokenizer.unk_token_id] * 3


def test_trajectory_shapes_and_rescored_logprobs_match(cache):
    policy = make(cache, guidance_scale=2.0)
    traj = policy.sample_trajectory(["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0))
    assert traj["latents"].shape == (2, 4, 12, 8, 8) and traj["next_latents"].shape == (2, 4, 12, 8, 8)
    assert traj["timesteps"].shape == (2, 4) and traj["logprobs"].shape == (2, 4)
    assert traj["images"].dtype == torch.uint8 and traj["images"].shape == (2, 16, 16, 3)
    assert torch.equal(traj["latents"][:, 1:], traj["next_latents"][:, :-1])
    # Rescoring a recorded step under the same weights gives the recorded log-prob (ratio 1).
    for k in range(4):
        logp = policy.step_logprob(traj["latents"][:, k], traj["next_latents"][:, k], traj["timesteps"][:, k],
                                   list(traj["prompts"]))
        torch.testing.assert_close(logp, traj["logprobs"][:, k], rtol=1e-4, atol=1e-4)
    # Same generator, same samples; a shared x_T gives the same start for a pair.
    again = policy.sample_trajectory(["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["next_latents"], traj["next_latents"])
    x_T = torch.randn(1, 12, 8, 8).expand(2, -1, -1, -1)
    pair = policy.sample_trajectory(["a red circle"] * 2, latents=x_T, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pair["latents"][0, 0], pair["latents"][1, 0])
    assert not torch.equal(pair["next_latents"][0, -1], pair["next_latents"][1, -1])


def test_sde_step_draws_noise_at_that_step_only(cache):
    from diffusers import DDIMScheduler

    policy = make(cache, guidance_scale=2.0)
    x_T = torch.randn(1, 12, 8, 8).expand(3, -1, -1, -1)
    traj = policy.sample_trajectory(["a red circle"] * 3, latents=x_T, generator=torch.Generator().manual_seed(1),
                                    sde_step=2)
    assert traj["sde_step"].tolist() == [2, 2, 2]
    # One x_T: the three samples agree up to step 2's input and part at its noise.
    assert torch.equal(traj["latents"][0, :3], traj["latents"][1, :3]) and torch.equal(traj["latents"][0, :3],
                                                                                           traj["latents"][2, :3])
    assert not torch.equal(traj["next_latents"][0, 2], traj["next_latents"][1, 2])
    # Only the branch step has a log-prob, and it rescores to the recorded one; the others are the
    # deterministic DDIM step (diffusers' scheduler.step with eta=0).
    assert (traj["logprobs"][:, [0, 1, 3]] == 0).all() and (traj["logprobs"][:, 2] != 0).all()
    logp = policy.step_logprob(traj["latents"][:, 2], traj["next_latents"][:, 2], traj["timesteps"][:, 2],
                               list(traj["prompts"]))
    torch.testing.assert_close(logp, traj["logprobs"][:, 2], rtol=1e-4, atol=1e-4)
    reference = DDIMScheduler.from_config(policy.scheduler.config)
    reference.set_timesteps(4)
    with torch.no_grad():
        cond, uncond = policy.encode_prompts(["a red circle"]), policy.encode_prompts([""])
        for k in (0, 3):
            x, t = traj["latents"][:1, k], traj["timesteps"][0, k]
            out = policy.predict_noise(x, t, cond, uncond, 2.0)
            expected = reference.step(out, t, x, eta=0.0).prev_sample
            torch.testing.assert_close(traj["next_latents"][:1, k], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sde_step=4 is not a step index of the 4 steps"):
        policy.sample_trajectory(["a red circle"], sde_step=4)


def test_prefix_steps_draw_each_rows_noise_from_its_own_generator(cache):
    policy = make(cache, guidance_scale=2.0)
    x_T = torch.randn(1, 12, 8, 8).expand(3, -1, -1, -1)
    # Rows 0 and 1 share a prefix generator seed, row 2 has its own.
    gens = [torch.Generator().manual_seed(s) for s in (5, 5, 6)]
    traj = policy.sample_trajectory(["a red circle"] * 3, latents=x_T, generator=torch.Generator().manual_seed(1),
                                    prefix_steps=2, prefix_generators=gens)
    # Rows 0 and 1 agree through the two prefix steps (stochastic: eta 1, log-probs recorded) and part after them.
    assert torch.equal(traj["next_latents"][0, :2], traj["next_latents"][1, :2])
    assert not torch.equal(traj["next_latents"][0, 2], traj["next_latents"][1, 2])
    assert not torch.equal(traj["next_latents"][0, 0], traj["next_latents"][2, 0])
    assert (traj["logprobs"] != 0).all()
    logp = policy.step_logprob(traj["latents"][:, 1], traj["next_latents"][:, 1], traj["timesteps"][:, 1],
                               list(traj["prompts"]))
    torch.testing.assert_close(logp, traj["logprobs"][:, 1], rtol=1e-4, atol=1e-4)
    # Without the prefix every step draws from the one generator: the rows part at the first step.
    plain = policy.sample_trajectory(["a red circle"] * 2, latents=x_T[:2], generator=torch.Generator().manual_seed(1))
    assert not torch.equal(plain["next_latents"][0, 0], plain["next_latents"][1, 0])
    with pytest.raises(ValueError, match="needs one generator per row"):
        policy.sample_trajectory(["a red circle"] * 3, latents=x_T, prefix_steps=2, prefix_generators=gens[:2])
    with pytest.raises(ValueError, match="prefix_steps=2 and sde_step=3"):
        policy.sample_trajectory(["a red circle"] * 3, latents=x_T, prefix_steps=2, prefix_generators=gens, sde_step=3)


def test_step_logprob_has_gradients_and_images_round_trip(cache):
    policy = make(cache, guidance_scale=1.0)
    traj = policy.sample_trajectory(["a green triangle"], generator=torch.Generator().manual_seed(2))
    policy.train()
    logp = policy.step_logprob(traj["latents"][:, 0], traj["next_latents"][:, 0], traj["timesteps"][:, 0],
                               ["a green triangle"])
    logp.sum().backward()
    grads = [p.grad for p in policy.unet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in policy.text_encoder.parameters())
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    back = policy.latents_to_images(policy.images_to_latents(images))
    assert np.abs(back.astype(int) - images.astype(int)).max() <= 1


def test_lora_trains_only_the_adapter_and_disabling_it_gives_the_base(cache):
    base = make(cache)
    policy = make(cache, lora={"r": 4})
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():  # move the adapter away from its zero init
        for n, p in policy.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    traj = base.sample_trajectory(["a red square"], generator=torch.Generator().manual_seed(3))
    args = (traj["latents"][:, 1], traj["next_latents"][:, 1], traj["timesteps"][:, 1], ["a red square"])
    with policy.adapter_disabled():
        torch.testing.assert_close(policy.step_logprob(*args), base.step_logprob(*args), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy.step_logprob(*args), base.step_logprob(*args))


def test_missing_sd15_folder_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local diffusers model folder.*hf download.*policy.path=.*SD15_PATH"):
        TextToImagePolicy(path=str(tmp_path / "sd15"), device="cpu")
    with pytest.raises(ValueError, match="eta"):
        TextToImagePolicy(tiny=TINY, cache_dir=str(tmp_path), device="cpu", eta=0.0)


def test_prompt_encodings_are_cached_and_equal_a_fresh_encoding(cache):
    policy = make(cache)
    prompts = ["a red circle", "two blue squares", "a red circle", ""]
    cached = policy.encode_prompts(prompts)
    ids = policy.tokenizer(prompts, padding="max_length", truncation=True,
                           max_length=policy.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        fresh = policy.text_encoder(input_ids=ids.input_ids).last_hidden_state
    torch.testing.assert_close(cached, fresh)
    assert len(policy._prompt_cache) == 3 and torch.equal(cached[0], cached[2])


def _perturb_trainable(policy: TextToImagePolicy, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_state_dict().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rank", [0, 4])
def test_export_loads_back_through_path_with_the_same_samples(cache, tmp_path, rank):
    policy = make(cache, lora={"r": rank}, guidance_scale=1.0)
    _perturb_trainable(policy)
    export = policy.save_pretrained(tmp_path / "export")
    assert (export / "unet_lora").is_dir() == (rank > 0)
    loaded = TextToImagePolicy(path=str(export), device="cpu", num_steps=4, guidance_scale=1.0)
    prompts = ["a red circle", "three green triangles"]
    x_T = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    a = policy.sample_trajectory(prompts, torch.Generator().manual_seed(0), latents=x_T)
    b = loaded.sample_trajectory(prompts, torch.Generator().manual_seed(0), latents=x_T)
    # LoRA is fused into the base weights at load: equal up to float rounding.
    torch.testing.assert_close(a["next_latents"], b["next_latents"], rtol=1e-4, atol=1e-4)
    base = make(cache, guidance_scale=1.0).sample_trajectory(prompts, torch.Generator().manual_seed(0), latents=x_T)
    assert not torch.allclose(base["next_latents"], b["next_latents"], atol=1e-3)


def test_lora_export_drops_diffusers_noop_cast_warning(cache, tmp_path):
    # diffusers' save_lora_adapter casts with to(dtype=None) and logs a float32-modules warning on
    # every save (every checkpoint of a LoRA run); the export drops that message, and only it.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("diffusers.models.modeling_utils")
    log.addHandler(handler)
    try:
        policy = make(cache, lora={"r": 4})
        policy.unet.save_lora_adapter(tmp_path / "raw")
        assert [r for r in records if "should be kept in float32" in r.getMessage()], "diffusers no longer warns"
        records.clear()
        policy.save_pretrained(tmp_path / "export")
        log.warning("another warning")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another warning"]
    assert (tmp_path / "export" / "unet_lora").is_dir()


def test_trainable_state_round_trips_and_mismatches_are_named(cache):
    lora, full = make(cache, lora={"r": 4}), make(cache)
    _perturb_trainable(lora)
    state = {k: v.clone() for k, v in lora.trainable_state_dict().items()}
    fresh = make(cache, lora={"r": 4})
    fresh.load_trainable_state_dict(state)
    assert all(torch.equal(fresh.trainable_state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="policy.lora.r"):
        full.load_trainable_state_dict(state)


def test_shipped_base_model_draws_the_caption_on_a_white_background():
    # The pretrained base of the CPU preference presets, loaded through from_pretrained from the
    # installed package: a changed scheduler config, sampler or fold shows up here as noise.
    from rlplat.config import package_file
    from rlplat.envs.preference.shapes import BACKGROUND, ShapesFidelity, prompt_split

    policy = TextToImagePolicy(path=str(package_file("rlplat.policies.diffusion", "assets/shapes_base")),
                               device="cpu", num_steps=10, guidance_scale=3.0)
    prompts = prompt_split()[1][:8]  # held-out captions
    images = policy.sample_trajectory(prompts, generator=torch.Generator().manual_seed(0))["images"].numpy()
    background = np.linalg.norm(images.astype(np.float32) - np.asarray(BACKGROUND, np.float32), axis=-1) < 90
    assert np.median(background.mean(axis=(1, 2))) > 0.6  # mostly white, as the renders are
    assert float(ShapesFidelity().score(images, prompts).mean()) > 0.6
