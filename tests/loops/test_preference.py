"""End-to-end preference runs (text-to-image) on a local CPU Ray, at tiny sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlplat.config import compose
from rlplat.logging import read_metrics
from rlplat.loops.preference import check_preference_config, preference_run
from rlplat.train import run

# The pretraining preset at 16 px, 3 DDIM steps, no guidance: seconds per iteration on one core.
TINY = [
    "experiment=diffusion_tiny_pretrain", "policy.tiny.image_size=16", "policy.tiny.block_out_channels=[16,32]",
    "policy.tiny.text_hidden_size=16", "policy.num_steps=3", "policy.guidance_scale=1.0",
    "trainer.eval_episodes=4", "trainer.torch_threads=1",
    "logger.progress_bar=false",
]


@pytest.fixture()
def tiny_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPLAT_CACHE_DIR", str(tmp_path / "cache"))


def test_sft_run_lowers_the_denoising_loss_and_exports_a_loadable_model(ray_local, tiny_cache, tmp_path):
    cfg = compose([*TINY, "preference=shapes_fidelity", "preference.prompts.image_size=16", "algo=diffusion_sft",
                   "algo.batch_size=16",
                   "algo.num_minibatches=10", "algo.optim.lr=3e-3", "trainer.total_steps=3", "trainer.eval_every=0",
                   "trainer.eval_at_start=true"])
    final = run(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["samples"] for r in rows] == [0, 160, 320, 480]
    assert rows[3]["train/loss"] < rows[1]["train/loss"]
    assert 0.0 <= final["eval/reward"] <= 1.0 and "eval/reward" in rows[0]
    assert (tmp_path / "run/media/eval_step_00000.png").stat().st_size > 1000
    assert (tmp_path / "run/media/eval_step_00003.png").exists()
    # The export loads through policy.path, the same way SD1.5 does.
    export = tmp_path / "run/checkpoints/step_3/policy/pretrained"
    from rlplat.policies.diffusion.pipeline import TextToImagePolicy

    loaded = TextToImagePolicy(path=str(export), device="cpu", num_steps=3, guidance_scale=1.0)
    from safetensors.torch import load_file

    trained = load_file(tmp_path / "run/checkpoints/step_3/policy/model.safetensors")
    assert all(torch.equal(loaded.trainable_state_dict()[k], v) for k, v in trained.items())


@pytest.mark.parametrize("algo", ["d3po", "ddpo"])
def test_online_run_labels_samples_and_updates_lora_only(ray_local, tiny_cache, tmp_path, algo):
    cfg = compose([*TINY, "preference=jpeg_compressibility", f"algo={algo}", "algo.batch_size=4",
                   "algo.num_minibatches=2", "policy.lora.r=4", "trainer.total_steps=2", "trainer.eval_every=1",
                   "trainer.checkpoint_every=0"])
    loop = preference_run(cfg, tmp_path, check_preference_config(cfg))
    try:
        base = {k: v for k, v in loop.actor.get_weights().items()}
        assert base and all("lora" in k for k in base)
        loop.run()
        after = loop.actor.get_weights()
    finally:
        loop.shutdown()
    assert any(not torch.equal(base[k], after[k]) for k in base)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    samples_per_iteration = 4 * (2 if algo == "d3po" else 4)
    assert [r["samples"] for r in rows] == [samples_per_iteration, 2 * samples_per_iteration]
    for row in rows:
        assert row["reward/mean"] < 0  # minus kB
        assert row["train/minibatches"] >= 1 and np.isfinite(row["train/loss"])
    if algo == "d3po":
        # Before the first update policy == reference: the loss is log 2 (up to the first step's move).
        assert rows[0]["train/loss"] == pytest.approx(np.log(2), abs=1e-3)
        assert 0.0 <= rows[0]["pairs/kept_fraction"] <= 1.0
    # The LoRA export holds the adapter next to the untouched base UNet.
    export = tmp_path / "checkpoints/step_2/policy/pretrained"
    assert (export / "unet_lora").is_dir() and (export / "unet/config.json").is_file()


def test_resume_continues_with_the_same_samples(ray_local, tiny_cache, tmp_path):
    args = [*TINY, "preference=shapes_fidelity", "algo=ddpo", "algo.advantage=per_prompt", "algo.group_size=2",
            "algo.batch_size=2", "algo.num_minibatches=1", "algo.tracker_min_count=2", "algo.optim.anneal_lr=false",
            "trainer.eval_every=0",
            "trainer.eval_episodes=2", "trainer.checkpoint_every=1", "trainer.keep_last=0"]
    run(compose([*args, "trainer.total_steps=3"]), tmp_path / "full")
    cut = tmp_path / "cut"
    run(compose([*args, "trainer.total_steps=2"]), cut)
    run(compose([*args, "trainer.total_steps=3", "resume=true"]), cut)
    full, resumed = read_metrics(tmp_path / "full/metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    keys = ("samples", "reward/mean", "train/grad_norm", "train/advantage_abs")
    assert len(resumed) == len(full) == 3
    for a, b in zip(resumed, full):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-5)


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="~env"):
        run(compose([*TINY, "env=toy", "preference=jpeg_compressibility", "algo=d3po", "policy.lora.r=4"]),
            tmp_path / "a")
    with pytest.raises(SystemExit, match="algo=d3po, ddpo, diffusion_sft or dpo"):
        run(compose([*TINY, "preference=jpeg_compressibility", "algo=ppo"]), tmp_path / "b")
    with pytest.raises(SystemExit, match="policy.lora.r>0"):
        run(compose([*TINY, "preference=jpeg_compressibility", "algo=d3po", "policy.lora.r=0"]), tmp_path / "c")
    with pytest.raises(SystemExit, match="hf download"):
        run(compose([*TINY, "policy=sd15", "policy.path=/nonexistent/sd15", "preference=pickscore", "algo=d3po"]),
            tmp_path / "d")
    prompts_only = compose([*TINY, "preference=jpeg_compressibility", "algo=diffusion_sft"])
    prompts_only.preference.prompts = {"_target_": "rlplat.envs.preference.online.PromptSet", "train": ["a red circle"]}
    with pytest.raises(SystemExit, match="ShapesPrompts"):
        run(prompts_only, tmp_path / "e")


@pytest.mark.parametrize("experiment,score", [("d3po_tiny", "ShapesFidelity"), ("ddpo_tiny", "ShapesFidelity"),
                                              ("d3po_tiny_jpeg", "JpegCompressibility")])
def test_tuning_presets_start_from_the_shipped_pretrained_model(experiment, score):
    from pathlib import Path

    cfg = compose([f"experiment={experiment}"])
    assert cfg.env is None and cfg.preference.score._target_.endswith(score)
    assert (Path(cfg.policy.path) / "unet/diffusion_pytorch_model.safetensors").is_file()
    assert cfg.policy.lora.r == 4 and cfg.trainer.eval_at_start
    assert check_preference_config(cfg).samples_per_prompt == (2 if experiment.startswith("d3po") else 4)
    if experiment == "d3po_tiny_jpeg":  # d3po_tiny with more pairs and Adam steps per iteration
        assert (cfg.algo.batch_size, cfg.algo.num_minibatches, cfg.algo.update_epochs) == (32, 4, 2)


# --------------------------------------------------------------------------- offline pairs (Diffusion-DPO)


@pytest.fixture(scope="module")
def shapes_pairs(tmp_path_factory):
    """A small Pick-a-Pic-format dataset made by rlplat-make-pairs (train and held-out captions)."""
    from rlplat.make_pairs import make_pairs

    folder = tmp_path_factory.mktemp("shapes_pairs")
    make_pairs(["--out", str(folder), "--pairs", "40", "--validation-pairs", "8", "--batch", "24",
                "--tie-margin", "0.01", "policy.num_steps=3"])
    return folder


def _dpo_args(pairs) -> list[str]:
    return ["experiment=dpo_tiny_shapes", "policy.path=null", "policy.tiny.image_size=16",
            "policy.tiny.block_out_channels=[16,32]", "policy.tiny.text_hidden_size=16", "policy.num_steps=3",
            "policy.guidance_scale=1.0", f"preference.path={pairs}", "preference.resolution=16",
            "algo.batch_size=4", "algo.micro_batch=2", "algo.num_minibatches=2", "trainer.eval_episodes=4",
            "trainer.torch_threads=1", "logger.progress_bar=false"]


def test_dpo_run_reads_pairs_in_order_reports_the_win_rate_and_resumes_exactly(ray_local, tiny_cache, tmp_path,
                                                                                shapes_pairs):
    args = [*_dpo_args(shapes_pairs), "trainer.checkpoint_every=1", "trainer.keep_last=0"]
    # The uninterrupted run evaluates at 0 and 3 (evaluation draws nothing from the training streams).
    final = run(compose([*args, "trainer.total_steps=3", "trainer.eval_every=3"]), tmp_path / "full")
    full = read_metrics(tmp_path / "full/metrics.jsonl")
    assert [r["pairs"] for r in full] == [0, 8, 16, 24]
    trained = [r for r in full if "train/loss" in r]
    assert len(trained) == 3 and all(r["train/minibatches"] == 2.0 for r in trained)
    assert full[0]["eval/win_rate_vs_base"] == 0.5  # step 0 is the base itself
    assert 0.0 <= final["eval/win_rate_vs_base"] <= 1.0 and np.isfinite(final["eval/reward"])
    # 24 pairs kept after the ties of the rows read so far; nothing corrupt.
    assert trained[-1]["data/kept"] == 24 and trained[-1]["data/corrupt"] == 0
    assert trained[-1]["data/rows"] == 24 + trained[-1]["data/ties"]
    # Stopped after 2 iterations and resumed: the same pairs, in the same order, the same updates.
    cut = tmp_path / "cut"
    run(compose([*args, "trainer.total_steps=2", "trainer.eval_every=0", "trainer.eval_at_start=false"]), cut)
    run(compose([*args, "trainer.total_steps=3", "trainer.eval_every=0", "trainer.eval_at_start=false",
                 "resume=true"]), cut)
    resumed = read_metrics(cut / "metrics.jsonl")
    keys = ("pairs", "train/loss", "train/grad_norm", "data/rows", "train/model_err_w")
    assert len(resumed) == len(trained) == 3
    for a, b in zip(resumed, trained):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-5)


def test_sd15_pickapic_preset_trains_through_its_real_loading_path(ray_local, tiny_cache, tmp_path, shapes_pairs):
    """experiment=dpo_sd15_pickapic as shipped, on tiny local copies: a diffusers folder exported by
    rlplat (for SD15_PATH) and pairs in the Pick-a-Pic v2 schema (for PICKAPIC_PATH)."""
    from rlplat.policies.diffusion.pipeline import TextToImagePolicy

    export = TextToImagePolicy(tiny={"image_size": 16, "fold": 2, "block_out_channels": [16, 32],
                                     "text_hidden_size": 16}, device="cpu").save_pretrained(tmp_path / "sd15")
    cfg = compose(["experiment=dpo_sd15_pickapic", f"policy.path={export}", "policy.dtype=float32",
                   "policy.num_steps=2", f"preference.path={shapes_pairs}", "preference.resolution=16",
                   "preference.eval_split=validation", "preference.score=null", "placement.use_gpu=false",
                   "algo.batch_size=4", "algo.micro_batch=2", "trainer.total_steps=1", "trainer.eval_episodes=2",
                   "trainer.torch_threads=1", "logger.progress_bar=false"])
    assert (cfg.algo.beta, cfg.policy.lora.r, cfg.preference.split) == (5000, 16, "train")
    run(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert rows[-1]["pairs"] == 4 and rows[-1]["train/loss"] == pytest.approx(np.log(2), abs=0.05)
    assert (tmp_path / "run/media/eval_step_00001.png").is_file()  # no score: the grids only


def test_offline_and_online_sources_and_algorithms_must_match(tmp_path, shapes_pairs):
    with pytest.raises(SystemExit, match="pick algo=dpo"):
        run(compose([*TINY, "preference=shapes_pairs", f"preference.path={shapes_pairs}", "algo=d3po"]), tmp_path / "a")
    with pytest.raises(SystemExit, match="preference=shapes_pairs or pickapic_v2"):
        run(compose([*TINY, "preference=shapes_fidelity", "algo=dpo"]), tmp_path / "b")
    with pytest.raises(SystemExit, match="rlplat-make-pairs --out data/shapes_pairs"):
        run(compose([*_dpo_args(tmp_path / "none")]), tmp_path / "c")
    with pytest.raises(SystemExit, match=r"PICKAPIC_PATH.*hf download yuvalkirstain/pickapic_v2"):
        run(compose(["experiment=dpo_tiny_shapes", "preference=pickapic_v2", "preference.path=null"]), tmp_path / "d")


# --------------------------------------------------------------------------- side metrics and trainer.stop_when


def test_image_diversity_is_the_mean_pairwise_pixel_distance_within_a_caption():
    from rlplat.loops.preference import image_diversity

    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    half = black.copy()
    half[:2] = 255  # half of the pixels differ from black: RMS distance sqrt(0.5)
    # "a": black, white, black -> pair distances 1, 0, 1 (mean 2/3); "b": two identical images -> 0;
    # "c" has one image and is left out.
    images = np.stack([black, white, black, half, half, white])
    prompts = ["a", "a", "a", "b", "b", "c"]
    assert image_diversity(images, prompts) == pytest.approx((2 / 3 + 0.0) / 2)
    assert image_diversity(np.stack([black, half]), ["a", "a"]) == pytest.approx(np.sqrt(0.5))
    assert np.isnan(image_diversity(np.stack([black, white]), ["a", "b"]))


def test_prompt_fidelity_scores_shapes_captions_only():
    from rlplat.envs.preference.shapes import parse_caption, prompt_fidelity, render

    captions = ["two blue squares", "a red circle"]
    drawn = np.stack([render(parse_caption(c), 32, np.random.default_rng(i)) for i, c in enumerate(captions)])
    right = prompt_fidelity(drawn, captions)
    swapped = prompt_fidelity(drawn, captions[::-1])
    assert right.shape == (2,) and (right > 0.9).all()  # the renderer draws what the caption says
    assert (swapped < right).all()  # the other caption's colour, count and shape do not match
    blank = prompt_fidelity(np.full((1, 32, 32, 3), 255, np.uint8), ["a red circle"])
    assert blank[0] < 0.5
    assert prompt_fidelity(drawn, ["a photo of a cat", "two blue squares"]) is None


def test_stop_when_parses_conditions_and_names_the_key_when_it_cannot():
    from rlplat.loops.skeleton import parse_stop_when

    assert parse_stop_when(None) == [] and parse_stop_when("") == []
    (fid,) = parse_stop_when("eval/fidelity<0.8")
    assert (fid.metric, fid.op, fid.threshold) == ("eval/fidelity", "<", 0.8)
    assert fid.met({"eval/fidelity": 0.79}) and not fid.met({"eval/fidelity": 0.8}) and not fid.met({})
    fid, wall = parse_stop_when("eval/fidelity <= 0.8 or perf/elapsed_s>1.8e3")
    assert fid.met({"eval/fidelity": 0.8}) and wall.threshold == 1800.0 and not wall.met({"perf/elapsed_s": 1800})
    for bad in ("eval/fidelity=0.8", "eval/fidelity<", "<0.8", "eval/fidelity<0.8 and perf/elapsed_s>1"):
        with pytest.raises(ValueError, match="trainer.stop_when"):
            parse_stop_when(bad)


def test_stop_when_is_checked_before_the_run_starts(tmp_path):
    base = [*TINY, "preference=jpeg_compressibility", "algo=ddpo", "policy.lora.r=4"]
    with pytest.raises(SystemExit, match=r"trainer.stop_when=eval/fidelity=0.8 must be '<metric><op><number>'"):
        run(compose([*base, "trainer.stop_when='eval/fidelity=0.8'"]), tmp_path / "a")
    with pytest.raises(SystemExit, match=r"trainer.stop_when='eval/fidelty<0.8' watches 'eval/fidelty'.*eval/fidelity"):
        run(compose([*base, "trainer.stop_when='eval/fidelty<0.8'"]), tmp_path / "b")
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def test_jpeg_run_logs_side_metrics_and_stop_when_ends_it_with_a_checkpoint(ray_local, tiny_cache, tmp_path):
    # 28 held-out images: every one of the 14 captions twice (two seeds), so diversity is defined.
    cfg = compose([*TINY, "preference=jpeg_compressibility", "algo=ddpo", "algo.batch_size=2", "algo.group_size=2",
                   "algo.num_minibatches=1", "policy.lora.r=4", "trainer.total_steps=5", "trainer.eval_every=2",
                   "trainer.eval_at_start=true", "trainer.eval_episodes=28", "trainer.checkpoint_every=0",
                   "trainer.stop_when='eval/fidelity<=1.0'"])
    final = run(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    # Step 0 evaluates without stopping; the first evaluation after an update (step 2) meets the condition.
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in (rows[0], rows[2]):
        assert 0.0 <= row["eval/fidelity"] <= 1.0 and row["eval/diversity"] > 0 and row["eval/reward"] < 0
    assert "eval/fidelity" not in rows[1]
    assert rows[2]["train/kl_to_base"] >= 0 and rows[1]["perf/elapsed_s"] < rows[2]["perf/elapsed_s"]
    assert final["eval/fidelity"] == rows[2]["eval/fidelity"]
    assert (tmp_path / "run/checkpoints/step_2").is_dir() and not (tmp_path / "run/checkpoints/step_5").exists()
    assert "trainer.stop_when eval/fidelity<=1 holds" in (tmp_path / "run/train.log").read_text()
    # A wall-clock condition met on a step without an evaluation still ends on one.
    cfg.trainer.stop_when, cfg.trainer.eval_every = "perf/elapsed_s>0", 0
    run(cfg, tmp_path / "wall")
    rows = read_metrics(tmp_path / "wall/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and "eval/reward" in rows[1]
    assert (tmp_path / "wall/checkpoints/step_1").is_dir()


@pytest.mark.parametrize("algo", ["d3po", "ddpo"])
def test_branch_runs_train_one_drawn_step_per_iteration(ray_local, tiny_cache, tmp_path, algo):
    cfg = compose([*TINY, "preference=jpeg_compressibility", f"algo={algo}", "algo.batch_size=2",
                   "algo.num_minibatches=1", "policy.lora.r=4", "policy.num_steps=4", "trainer.total_steps=3",
                   "trainer.eval_every=0", "trainer.checkpoint_every=0", "algo.branch=true",
                   "algo.skip_initial_steps=1", *(["algo.group_size=2"] if algo == "ddpo" else [])])
    run(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert len(rows) == 3 and all(1 <= r["branch/step"] <= 3 for r in rows)  # never the skipped first step
    assert all(np.isfinite(r["train/loss"]) and r["train/minibatches"] == 1 for r in rows)


@pytest.mark.parametrize("share", [False, True])
def test_ddpo_share_noise_starts_each_group_from_one_x_t(ray_local, tiny_cache, tmp_path, monkeypatch, share):
    from rlplat.loops.preference import OnlinePreferenceCollector

    seeds = []
    generate = OnlinePreferenceCollector.generate

    def recording(self, prompts, noise_seeds, seed, *args, **kwargs):
        seeds.append(np.asarray(noise_seeds))
        return generate(self, prompts, noise_seeds, seed, *args, **kwargs)

    monkeypatch.setattr(OnlinePreferenceCollector, "generate", recording)
    cfg = compose([*TINY, "preference=jpeg_compressibility", "algo=ddpo", "algo.batch_size=3", "algo.group_size=2",
                   "algo.num_minibatches=1", "policy.lora.r=4", "trainer.total_steps=1", "trainer.eval_every=0",
                   "trainer.checkpoint_every=0", f"algo.share_noise={str(share).lower()}"])
    run(cfg, tmp_path / "run")
    groups = seeds[0].reshape(3, 2)  # the iteration's 3 prompts x 2 samples
    assert (groups[:, 0] == groups[:, 1]).all() == share
    assert len(set(groups[:, 0].tolist())) == 3  # each group its own x_T
    assert np.isfinite(read_metrics(tmp_path / "run/metrics.jsonl")[-1]["train/loss"])


def test_d3po_groups_of_three_share_x_t_and_train_on_one_pair_per_prompt(ray_local, tiny_cache, tmp_path,
                                                                         monkeypatch):
    from rlplat.algos.d3po import D3PO
    from rlplat.loops.preference import OnlinePreferenceCollector

    seeds, trajs, pairs = [], [], []
    generate, prepare = OnlinePreferenceCollector.generate, D3PO.prepare

    def recording(self, prompts, noise_seeds, seed, *args, **kwargs):
        seeds.append(np.asarray(noise_seeds))
        trajs.append(generate(self, prompts, noise_seeds, seed, *args, **kwargs))
        return trajs[-1]

    def recording_prepare(self, traj, scores, source, rng):
        batch, metrics = prepare(self, traj, scores, source, rng)
        pairs.append((np.asarray(scores), batch, metrics))
        return batch, metrics

    monkeypatch.setattr(OnlinePreferenceCollector, "generate", recording)
    monkeypatch.setattr(D3PO, "prepare", recording_prepare)
    cfg = compose([*TINY, "preference=jpeg_compressibility", "algo=d3po", "algo.batch_size=2", "algo.group_size=3",
                   "algo.num_minibatches=1", "policy.lora.r=4", "trainer.total_steps=1", "trainer.eval_every=0",
                   "trainer.checkpoint_every=0"])
    run(cfg, tmp_path / "run")
    groups = seeds[0].reshape(2, 3)  # the iteration's 2 prompts x 3 samples, one x_T each
    assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
    scores, batch, metrics = pairs[0]
    x_t = trajs[0]["latents"][:, 0]  # rows come back in the prompts' order: a group's rows share x_T
    assert all(torch.equal(x_t[row], x_t[row - row % 3]) for row in range(6)) and not torch.equal(x_t[0], x_t[3])
    spread = scores.reshape(2, 3).max(axis=1) - scores.reshape(2, 3).min(axis=1)
    assert metrics["pairs/score_gap"] == pytest.approx(spread.mean())  # each prompt's best and worst
    assert len(batch) == int((spread > 0).sum())
    assert np.isfinite(read_metrics(tmp_path / "run/metrics.jsonl")[-1]["train/loss"])


@pytest.mark.parametrize("algo", ["d3po", "ddpo"])
def test_share_prefix_groups_share_the_untrained_steps_and_part_where_training_starts(
        ray_local, tiny_cache, tmp_path, monkeypatch, algo):
    from rlplat.loops.preference import OnlinePreferenceCollector

    trajectories = []
    generate = OnlinePreferenceCollector.generate

    def recording(self, *args, **kwargs):
        traj = generate(self, *args, **kwargs)
        trajectories.append(traj)
        return traj

    monkeypatch.setattr(OnlinePreferenceCollector, "generate", recording)
    group = ["algo.batch_size=3", "algo.group_size=2"] if algo == "ddpo" else ["algo.batch_size=3"]
    cfg = compose([*TINY, "preference=jpeg_compressibility", f"algo={algo}", *group, "algo.num_minibatches=1",
                   "policy.lora.r=4", "trainer.total_steps=1", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                   "algo.skip_initial_steps=2", "algo.share_prefix=true"])
    run(cfg, tmp_path / "run")
    after = trajectories[0]["next_latents"]  # the iteration's 3 prompts x 2 samples, [6, T, ...]
    for first in (0, 2, 4):
        # The group's two samples agree through the 2 untrained steps and part at the first trained one.
        assert torch.equal(after[first, :2], after[first + 1, :2])
        assert not torch.equal(after[first, 2], after[first + 1, 2])
    assert not torch.equal(after[0, 0], after[2, 0])  # each group its own prefix
    assert np.isfinite(read_metrics(tmp_path / "run/metrics.jsonl")[-1]["train/loss"])


@pytest.mark.parametrize("overrides, match", [
    (["algo.share_prefix=true"], "algo.skip_initial_steps=0 leaves none untrained"),
    (["algo.share_prefix=true", "algo.skip_initial_steps=1", "algo.branch=true"],
     "algo.share_prefix=true and algo.branch=true"),
])
def test_share_prefix_refuses_settings_it_cannot_serve(tmp_path, overrides, match):
    from rlplat.validate import ConfigError, validate

    with pytest.raises(ConfigError, match=match):
        validate(compose([*TINY, "preference=jpeg_compressibility", "algo=d3po", *overrides]), tmp_path / "run")


def test_time_budget_ends_the_run_on_a_final_evaluation_anneals_the_lr_over_it_and_spans_a_resume(
        ray_local, tiny_cache, tmp_path):
    budget = 2.0
    args = [*TINY, "preference=jpeg_compressibility", "algo=ddpo", "algo.batch_size=2", "algo.group_size=2",
            "algo.num_minibatches=1", "policy.lora.r=4", "trainer.total_steps=100000", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", "algo.optim.anneal_lr=true", "algo.optim.lr=1e-3"]
    run(compose([*args, f"trainer.time_budget_s={budget}"]), tmp_path / "run")
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    last = rows[-1]["step"]
    # Ended at the first iteration past the budget, long before total_steps, with an evaluation and a checkpoint.
    assert 1 <= last < 100000 and rows[-1]["perf/elapsed_s"] >= budget > rows[-2]["perf/elapsed_s"]
    assert "eval/reward" in rows[-1] and all("eval/reward" not in r for r in rows[:-1])
    assert (tmp_path / f"run/checkpoints/step_{last}").is_dir()
    assert "trainer.time_budget_s=2 spent after step" in (tmp_path / "run/train.log").read_text()
    # The lr falls with the share of the budget spent when the update starts (between the previous
    # row's clock and this row's), not with the step count (~0 of 100000).
    clock = [0.0] + [r["perf/elapsed_s"] for r in rows]
    for row, before, after in zip(rows, clock, clock[1:]):
        assert 1e-3 * (1 - after / budget) <= row["train/lr"] <= 1e-3 * (1 - before / budget)
    # A resume with a larger budget continues the clock (and the annealing) where the checkpoint left it.
    run(compose([*args, f"trainer.time_budget_s={2 * budget}", "resume=true"]), tmp_path / "run")
    resumed = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if r["step"] > last]
    assert resumed and resumed[0]["perf/elapsed_s"] > rows[-1]["perf/elapsed_s"]
    assert resumed[0]["train/lr"] <= 1e-3 * (1 - rows[-1]["perf/elapsed_s"] / (2 * budget))
    assert resumed[-1]["perf/elapsed_s"] >= 2 * budget


@pytest.mark.parametrize("experiment", ["d3po_tiny_jpeg_long", "ddpo_tiny_jpeg_long", "d3po_tiny_shapes_early",
                                        "ddpo_tiny_shapes_early"])
def test_long_bench_presets_compose_and_pass_the_checks(experiment):
    from pathlib import Path

    cfg = compose([f"experiment={experiment}"])
    jpeg = "jpeg" in experiment
    assert cfg.preference.score._target_.endswith("JpegCompressibility" if jpeg else "ShapesFidelity")
    assert Path(cfg.policy.path).name == ("shapes_base" if jpeg else "shapes_early")
    # DDPO's JPEG preset takes both cores of the 2-core machine (one run at a time); the others one
    # thread each, two side by side.
    assert cfg.trainer.torch_threads == (2 if experiment == "ddpo_tiny_jpeg_long" else 1) and cfg.trainer.eval_at_start
    check_preference_config(cfg)  # the batch arithmetic and trainer.stop_when's metric names
    if jpeg:  # the JPEG shortcut (drawing nothing) is stopped by the fidelity floor
        assert cfg.trainer.stop_when == "eval/fidelity<0.8"


def test_score_settings_must_be_arguments_of_the_score():
    # A misspelt setting (added with '+', Hydra's hint) is refused before Ray starts, naming the real ones.
    for args, expected in ((["experiment=d3po_tiny_shapes_early", "+preference.score.weigths={shape: 2}"],
                            r"preference.score \(rlplat.envs.preference.shapes.ShapesFidelity\) does not take these "
                            r"settings \(.*'weigths'\): remove or rename them \(its settings: weights\)"),
                           (["experiment=d3po_tiny_jpeg_long", "+preference.score.qualty=90"],
                            r"JpegCompressibility\) does not take .*'qualty'.*its settings: quality")):
        with pytest.raises(ValueError, match=expected):
            check_preference_config(compose(args))
    check_preference_config(compose(["experiment=d3po_tiny_shapes_early", "preference.score.weights.shape=3"]))
    # A score that is cheap to build is built by the check, so its values are refused there too.
    with pytest.raises(ValueError, match=r"preference.score.weights=.*'shape': -1.0.*each weight must be >= 0"):
        check_preference_config(compose(["experiment=d3po_tiny_shapes_early", "preference.score.weights.shape=-1"]))


def test_stop_when_on_fidelity_needs_shapes_captions_and_train_metrics_pass():
    from rlplat.envs.preference.online import PromptSet
    from rlplat.envs.preference.shapes import ShapesPrompts
    from rlplat.loops.preference import check_stop_when

    cfg = compose([*TINY, "preference=jpeg_compressibility", "algo=ddpo", "trainer.stop_when='eval/fidelity<0.8'"])
    check_stop_when(cfg, ShapesPrompts())
    with pytest.raises(ValueError, match=r"stop_when='eval/fidelity<0.8' watches eval/fidelity.*PromptSet.*"
                                         r"'a photo of a cat'.*has no fidelity score"):
        check_stop_when(cfg, PromptSet(["a photo of a cat"]))
    cfg.trainer.stop_when = "train/loss>10 or perf/elapsed_s>60"  # an algorithm's own train/ metric is accepted
    check_stop_when(cfg, None)
