"""rlplat-train's start-up checks: bad configs fail fast, naming the key or the numbers."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlplat.config import compose
from rlplat.runtime.cluster import STARTED_MESSAGE


def _train(*args: str, cwd) -> tuple[int, str, bool]:
    """Exit code, output, and whether the run got as far as starting Ray (bad configs must not)."""
    proc = subprocess.run([sys.executable, "-m", "rlplat.train", *args], cwd=cwd, capture_output=True, check=False,
                          text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    out = proc.stdout + proc.stderr
    return proc.returncode, out, STARTED_MESSAGE in out


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algo.clip_coef=abc", "clip_coef"),
        ("algo.no_such_key=1", "no_such_key"),
        ("env.num_envs=lots", "num_envs"),
        ("algo=nope", "nope"),
    ],
)
def test_bad_override_fails_fast_naming_the_key(tmp_path, override, expected):
    code, out, ray_started = _train(override, cwd=tmp_path)
    assert code != 0 and expected in out, out
    assert not ray_started
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("metrics.jsonl"))


def test_batch_arithmetic_mismatch_names_the_numbers(tmp_path):
    code, out, ray_started = _train("env.num_envs=60", "algo.num_minibatches=16", cwd=tmp_path)
    assert code != 0
    assert "env.num_envs=60" in out and "3000 rows" in out and "num_minibatches=16" in out, out
    assert not ray_started


def test_grpo_group_size_mismatch(tmp_path):
    code, out, _ = _train("algo=grpo", "algo.group_size=5", cwd=tmp_path)
    assert code != 0 and "group_size=5" in out and "num_envs=64" in out, out


def test_default_config_is_the_quickstart():
    cfg = compose()
    assert cfg.name == "quickstart"
    # GRPO fine-tunes the tiny OpenVLA from the SFT checkpoint shipped with the package.
    assert cfg.algo._target_.endswith("GRPO") and cfg.env._target_.endswith("ToyReachEnv")
    assert cfg.policy._target_.endswith("OpenVLAPolicy") and cfg.env.obs_mode == "rgb"
    assert (Path(cfg.policy.init_from) / "config.json").is_file()
    assert (Path(cfg.policy.init_from) / "dataset_statistics.json").is_file()
    assert cfg.trainer.eval_at_start and cfg.placement.name == "colocated"
    # A group given on the command line wins over the experiment's choice.
    ppo = compose(["algo=ppo"])
    assert ppo.algo._target_.endswith("PPO") and ppo.policy._target_.endswith("OpenVLAPolicy")
    assert ppo.policy.value_detach  # a fresh critic must not reshape the SFT trunk
    mlp = compose(["experiment=toy_mlp"])
    assert mlp.name == "toy_mlp" and mlp.algo._target_.endswith("PPO") and mlp.policy._target_.endswith("ActorCritic")
    assert mlp.env.obs_mode == "state" and mlp.env.num_objects == 3


def test_missing_shipped_file_is_named():
    from rlplat.config import package_file

    with pytest.raises(FileNotFoundError, match="no_such_asset.*rlplat.policies.openvla"):
        package_file("rlplat.policies.openvla", "assets/no_such_asset")


def test_missing_7b_weights_fail_before_ray_naming_where_to_put_them(tmp_path):
    code, out, _ = _train("policy=openvla_7b", f"policy.path={tmp_path / 'no-weights-here'}", cwd=tmp_path)
    assert code != 0 and "no-weights-here" in out and "OPENVLA_7B_PATH" in out, out
    assert STARTED_MESSAGE not in out


def test_missing_init_from_fails_before_ray(tmp_path):
    code, out, _ = _train(f"policy.init_from={tmp_path / 'nothing'}", cwd=tmp_path)
    assert code != 0 and "policy.init_from=" in out and "nothing" in out, out
    assert STARTED_MESSAGE not in out


def test_help_lists_every_groups_options_with_their_comment_and_no_schema_entries(tmp_path):
    from rlplat.options import GROUPS, group_options

    code, out, ray_started = _train("--help", cwd=tmp_path)
    assert code == 0 and not ray_started, out
    assert "_schema" not in out
    options = group_options()
    assert set(options) == set(GROUPS) and {"ppo", "grpo", "d3po", "dpo"} <= set(options["algo"])
    for group, by_name in options.items():
        assert f"\n{group}:\n" in out
        for option, comment in by_name.items():
            # Every shipped option says what it is, on its own line of --help.
            assert comment, f"{group}={option} has no comment"
            assert re.search(rf"^  {re.escape(option)} +{re.escape(comment)}$", out, re.MULTILINE), (option, comment)
    assert max(len(line) for line in out.splitlines()) <= 140


@pytest.mark.parametrize("args, wrong", [(["algo=grpp"], "algo=grpp"), (["-m", "seed=0,1", "policy=mlp,mpl"], "policy=mpl")])
def test_a_wrong_group_option_names_the_options_without_schema_entries(tmp_path, args, wrong):
    code, out, ray_started = _train(*args, cwd=tmp_path)
    assert code == 1 and not ray_started, out
    assert f"config error: {wrong}: no such option in group" in out, out
    assert "did you mean" in out and "_schema" not in out and "Traceback" not in out, out
