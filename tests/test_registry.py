"""The registries: parts declare themselves beside their code; new parts need no edit under rlplat/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlplat import registry
from rlplat.config import compose

PLUGINS = Path(__file__).parent / "plugins"
PLUGIN_MODULE = "rlplat_example_parts"


def write_plugin_yamls(conf: Path) -> None:
    """One small YAML per new part, in the user's own config folder."""
    for group, name in (("env", "line"), ("policy", "linear"), ("algo", "vpg")):
        (conf / group).mkdir(parents=True, exist_ok=True)
        (conf / group / f"{name}.yaml").write_text(f"defaults:\n  - {name}_schema\n  - _self_\n")


def test_builtin_parts_are_registered_with_their_classes():
    compose([])
    names = {(p.kind, p.name) for p in registry.parts()}
    assert {("algo", "ppo"), ("algo", "grpo"), ("algo", "d3po"), ("env", "toy"), ("env", "maniskill"),
            ("policy", "openvla"), ("policy", "diffusion"), ("preference", "online")} <= names
    assert registry.get("algo", "ppo").target == "rlplat.algos.ppo.PPO"
    # Heavy families register by path: composing a config did not import their model code.
    assert registry.get("policy", "openvla").target == "rlplat.policies.openvla.policy.OpenVLAPolicy"
    with pytest.raises(KeyError, match=r"no algo named 'ppp' is registered \(registered: .*ppo"):
        registry.get("algo", "ppp")


def test_register_refuses_bad_declarations():
    @dataclass
    class Cfg:
        x: int = 1

    with pytest.raises(ValueError, match="kind 'algorithm' must be one of"):
        registry.register("algorithm", "x", Cfg)
    with pytest.raises(ValueError, match="must be a dataclass"):
        registry.register("algo", "x", dict)

    @dataclass
    class WithTarget:
        _target_: str = "a.B"

    with pytest.raises(ValueError, match="must not declare _target_"):
        registry.register("algo", "x", WithTarget)
    with pytest.raises(ValueError, match="algo 'ppo' is registered twice: rlplat.algos.ppo.PPO and elsewhere.PPO"):
        registry.register("algo", "ppo", Cfg, target="elsewhere.PPO")


def test_plugin_schema_checks_keys(tmp_path, monkeypatch):
    write_plugin_yamls(tmp_path)
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv(registry.PLUGINS_ENV, PLUGIN_MODULE)
    base = [f"hydra.searchpath=[file://{tmp_path}]", "~experiment", "name=line", "env=line", "policy=linear",
            "algo=vpg"]
    cfg = compose(base)
    assert cfg.env._target_ == f"{PLUGIN_MODULE}.LineReachEnv" and cfg.env.success_radius == 0.1
    assert cfg.algo.optim.lr == 3e-2  # the plugin's own default, from its dataclass
    with pytest.raises(Exception, match="succes_radius"):
        compose([*base, "env.succes_radius=0.2"])


def test_plugin_module_that_does_not_import_is_named(monkeypatch):
    monkeypatch.setenv(registry.PLUGINS_ENV, "no_such_rlplat_plugin")
    with pytest.raises(ImportError, match="RLPLAT_PLUGINS names module 'no_such_rlplat_plugin'"):
        registry.load_parts()


def test_new_env_policy_and_algorithm_train_through_rlplat_train(tmp_path):
    """A new env, policy and algorithm, registered in a test module with one YAML each, train
    through the console script without any file under rlplat/, envs/ or policies/ changing."""
    write_plugin_yamls(tmp_path / "conf")
    run_dir = tmp_path / "run"
    env = {**os.environ, registry.PLUGINS_ENV: PLUGIN_MODULE,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "rlplat.train", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "~experiment",
           "name=line_vpg", "env=line", "policy=linear", "algo=vpg", "trainer.total_steps=20",
           "trainer.eval_every=10", "trainer.eval_at_start=true", "trainer.eval_episodes=32",
           "trainer.save_video=false", "logger.progress_bar=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = (run_dir / "config.yaml").read_text()
    for cls in ("LineReachEnv", "LinearGaussian", "VPG"):
        assert f"_target_: {PLUGIN_MODULE}.{cls}" in saved
    evals = [(r["step"], r["eval/success_rate"]) for r in map(json.loads, (run_dir / "metrics.jsonl").open())
             if r.get("eval/success_rate") is not None]
    assert [s for s, _ in evals] == [0, 10, 20]
    # Measured: 0.44 at the start, 0.84 after 20 iterations (seed 0).
    assert evals[-1][1] >= evals[0][1] + 0.2, evals


@pytest.mark.parametrize(("experiment", "old", "new"), [("ddpo_tiny", "clip_range", "clip_coef"),
                                                         ("d3po_tiny", "clip_eps", "clip_coef")])
def test_renamed_settings_are_refused_with_the_new_name(tmp_path, experiment, old, new):
    from rlplat.train import run

    cfg = compose([f"experiment={experiment}", f"algo.{old}=0.01"])
    with pytest.raises(SystemExit, match=rf"algo.{old} was renamed to algo.{new}: write algo.{new}=0.01"):
        run(cfg, tmp_path)
    assert not (tmp_path / "config.yaml").exists()  # refused before anything is written
    # Unset, the placeholder is dropped: the saved config holds only the current name.
    cfg = compose([f"experiment={experiment}"])
    registry.refuse_renamed(cfg)
    assert old not in cfg.algo and new in cfg.algo
