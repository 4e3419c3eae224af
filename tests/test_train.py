"""rlplat-train's start-up checks: bad configs fail fast, naming the key or the numbers."""

import os
import subprocess
import sys
import time

import pytest

from rlplat.config import compose


def _train(*args: str, cwd) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlplat.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


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
    code, out, seconds = _train(override, cwd=tmp_path)
    assert code != 0 and expected in out, out
    assert seconds < 10
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("metrics.jsonl"))


def test_batch_arithmetic_mismatch_names_the_numbers(tmp_path):
    code, out, seconds = _train("env.num_envs=60", "algo.num_minibatches=16", cwd=tmp_path)
    assert code != 0
    assert "env.num_envs=60" in out and "3000 rows" in out and "num_minibatches=16" in out, out
    assert seconds < 10


def test_grpo_group_size_mismatch(tmp_path):
    code, out, _ = _train("algo=grpo", "algo.group_size=5", cwd=tmp_path)
    assert code != 0 and "group_size=5" in out and "num_envs=64" in out, out


def test_default_config_is_the_quickstart():
    cfg = compose()
    assert cfg.name == "quickstart"
    assert cfg.algo._target_.endswith("PPO") and cfg.env._target_.endswith("ToyReachEnv")
    assert cfg.placement.name == "colocated"
    grpo = compose(["algo=grpo"])
    assert grpo.algo._target_.endswith("GRPO") and grpo.algo.group_size == 4
