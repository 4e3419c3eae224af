"""rlplat-eval: evaluates env runs and text-to-image runs, checks its own arguments by their own
names, and leaves no temp folders behind."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from rlplat.config import compose
from rlplat.eval import evaluate_checkpoint
from rlplat.train import run

TOY = ["experiment=toy_mlp", "env.num_envs=8", "algo.rollout_steps=10", "algo.num_minibatches=2",
       "trainer.eval_episodes=4", "trainer.total_steps=1", "trainer.save_video=false", "logger.progress_bar=false",
       "policy.hidden_sizes=[32,32]"]
D3PO = ["experiment=diffusion_tiny_pretrain", "policy.tiny.image_size=16", "policy.tiny.block_out_channels=[16,32]",
        "policy.tiny.text_hidden_size=16", "policy.num_steps=3", "policy.guidance_scale=1.0", "trainer.eval_episodes=4",
        "logger.progress_bar=false", "preference=jpeg_compressibility", "algo=d3po", "algo.batch_size=4",
        "algo.num_minibatches=1", "policy.lora.r=4", "trainer.total_steps=1"]


def _eval_temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("rlplat-eval-*")}


@pytest.fixture()
def tiny_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPLAT_CACHE_DIR", str(tmp_path / "cache"))


def test_eval_of_an_env_run_matches_its_final_evaluation(ray_local, tmp_path):
    final = run(compose(TOY), tmp_path / "run")
    before = _eval_temp_dirs()
    metrics = evaluate_checkpoint([str(tmp_path / "run")])
    assert metrics["checkpoint"].endswith("step_1") and metrics["episodes"] == 4
    # Same weights, same fixed-seed episodes: the same success rate as the run's own final evaluation.
    assert metrics["eval/success_rate"] == final["eval/success_rate"]
    assert json.loads((tmp_path / "run/checkpoints/step_1/eval.json").read_text())["episodes"] == 4
    assert _eval_temp_dirs() == before


def test_eval_of_a_text_to_image_run_scores_the_held_out_prompts(ray_local, tiny_cache, tmp_path):
    final = run(compose(D3PO), tmp_path / "run")
    before = _eval_temp_dirs()
    metrics = evaluate_checkpoint([str(tmp_path / "run")])
    assert metrics["eval/reward"] == pytest.approx(final["eval/reward"], rel=1e-5)
    assert (tmp_path / "run/checkpoints/step_1/eval_samples.png").stat().st_size > 0
    assert _eval_temp_dirs() == before


@pytest.mark.parametrize("argv, expected", [
    (["{run}", "--episodes", "0"], "argument --episodes: 0 must be >= 1"),
    (["{tmp}/not_a_run"], "not_a_run is neither a run dir"),
    (["{tmp}"], "is neither a run dir"),
])
def test_eval_refuses_bad_arguments_by_their_own_names(tmp_path, capsys, argv, expected):
    (tmp_path / "run").mkdir()
    before = _eval_temp_dirs()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_checkpoint([a.format(run=tmp_path / "run", tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "resume=" not in err and "eval_num_envs" not in err, err
    assert _eval_temp_dirs() == before
