"""Bad input, as a new user types it: each case is refused by ``rlplat-train`` before Ray starts,
with a non-zero exit, the key the user set, its value and the fix in the message, and no traceback.

One test per row of the run-lifecycle issue's table (config rows; the checkpoint rows are in
test_bad_checkpoints.py). Every case runs in-process (``train.run`` on the composed config, Ray
patched to fail if started); two run through the console script to check the exit status and the
absence of a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rlplat import checkpoint
from rlplat.runtime.cluster import STARTED_MESSAGE


def _train(*args: str, cwd) -> tuple[int, str, bool]:
    """Exit code, output, and whether the run got as far as starting Ray (bad configs must not)."""
    proc = subprocess.run([sys.executable, "-m", "rlplat.train", "experiment=toy_mlp", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=180, check=False,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    out = proc.stdout + proc.stderr
    return proc.returncode, out, STARTED_MESSAGE in out


@pytest.mark.parametrize("args, expected", [
    # Hydra's own hint for a misspelt key is to add it with '+': the schema still refuses it.
    (["+trainer.totl_steps=3"], ["trainer.totl_steps is not a setting of trainer", "did you mean trainer.total_steps?"]),
    (["+algo.no_such_key=1"], ["algo.no_such_key is not a setting of algo (PPOConfig)", "settings: bootstrap_at_done"]),
    (["+algo.optim.betas=1"], ["algo.optim.betas is not a setting of algo.optim (OptimConfig)"]),
    (["trainer.total_steps=0"], ["trainer.total_steps=0 must be >= 1", "set trainer.total_steps to a value >= 1"]),
    (["trainer.total_steps=-1"], ["trainer.total_steps=-1 must be >= 1"]),
    (["trainer.checkpoint_every=-1"], ["trainer.checkpoint_every=-1 must be >= 0"]),
    (["env.num_envs=0"], ["env.num_envs=0 must be >= 1"]),
    (["trainer.eval_episodes=0"], ["trainer.eval_episodes=0 must be >= 1"]),
    (["algo.optim.lr=-1"], ["algo.optim.lr=-1.0 must be > 0"]),
    (["algo.gamma=1.5"], ["algo.gamma=1.5 must be <= 1"]),
    (["algo.bootstrap_at_done=sometimes"], ["algo.bootstrap_at_done=sometimes must be one of always, truncated"]),
    (["logger.backend=tensorboard"], ["logger.backend=tensorboard must be one of console, wandb"]),
    (["+trainer.keep_checkpoints=2"], ["trainer.keep_checkpoints was renamed to trainer.keep_last",
                                       "write trainer.keep_last=2"]),
    (["algo.clip_range=0.1"], None),  # PPO never had clip_range: Hydra refuses it as an unknown key
    (["placement.bundles=[{CPU: 0}]"], ["placement.bundles[0] reserves nothing", "give it CPUs"]),
    (["placement=disaggregated", "placement.bundles=[{CPU: 2}]"],
     ["placement.bundles has 1 entries but num_devices is 2", "one resource mapping per device"]),
    (["placement.roles.env=3"], ["placement role 'env' uses devices '3', but num_devices is 1"]),
    (["placement.strategy=PAK"], ["placement.strategy=PAK must be one of PACK, SPREAD"]),
    (["resume=/nonexistent"], ["resume=/nonexistent: neither a checkpoint folder", "resume=false"]),
    (["resume=true"], ["resume=true continues this run dir", "has no intact checkpoint",
                       "hydra.run.dir=<that dir> resume=true"]),
])
def test_config_refused_before_ray_naming_key_and_fix(tmp_path, monkeypatch, args, expected):
    import rlplat.runtime.cluster
    from rlplat.config import compose
    from rlplat.train import run

    def no_ray(*a, **kw):
        raise AssertionError("Ray was started for a config that validation should have refused")

    monkeypatch.setattr(rlplat.runtime.cluster, "ray_session", no_ray)
    try:
        cfg = compose(["experiment=toy_mlp", *args])
    except Exception as err:  # noqa: BLE001 (Hydra refuses some at composition: its message names the key)
        message = str(err)
    else:
        with pytest.raises(SystemExit) as exit_info:
            run(cfg, tmp_path / "run")
        message = str(exit_info.value.code)
        assert message.startswith("config error: "), message
    for text in expected or [args[0].split("=")[0].lstrip("+")]:
        assert text in message, message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("args, expected", [
    (["+trainer.totl_steps=3"], "did you mean trainer.total_steps?"),
    (["resume=true"], "resume=true continues this run dir"),
])
def test_console_script_exits_non_zero_without_traceback(tmp_path, args, expected):
    code, out, ray_started = _train(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code != 0 and not ray_started and "Traceback" not in out, out
    assert "config error: " in out and expected in out, out


def test_resume_true_never_loads_a_sibling_run(tmp_path):
    # An unrelated run with a checkpoint beside the new run dir: resume=true must not take it.
    sibling = tmp_path / "outputs" / "other_run"
    folder = checkpoint.begin(sibling, 60)
    checkpoint.save_trainer_state(folder, {"step": 60})
    checkpoint.commit(folder, keep=1)
    code, out, ray_started = _train("resume=true", f"hydra.run.dir={tmp_path / 'outputs' / 'new_run'}", cwd=tmp_path)
    assert code != 0 and not ray_started, out
    assert "resumed from" not in out
    assert f"(the newest run beside this one: resume={sibling}" in out, out
