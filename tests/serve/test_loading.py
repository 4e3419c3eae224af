"""What the server loads: a run's newest intact checkpoint (the MLP actor-critic of a toy run),
an OpenVLA export with its action statistics, and clear errors for what it cannot serve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.serve.helpers import require_serve_packages

require_serve_packages()

from hydra.utils import instantiate
from omegaconf import OmegaConf
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from rlplat import checkpoint
from rlplat.serve.config import ServeConfigError, compose
from rlplat.serve.loading import load


def _write_checkpoint(run_dir, cfg, worker, step: int) -> None:
    tmp = checkpoint.begin(run_dir, step)
    worker.save(str(tmp / checkpoint.POLICY))
    checkpoint.save_trainer_state(tmp, {"step": step})
    checkpoint.commit(tmp, keep=0, parts={"algo": cfg.algo._target_, "policy": cfg.policy._target_})


def _actor(cfg, run_dir):
    """The run's actor PolicyWorker built in-process (its config saved in ``run_dir`` as a run's is)."""
    from rlplat.workers.policy import PolicyWorker

    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    env = instantiate(cfg.env, num_envs=1)
    worker = PolicyWorker(policy_cfg=OmegaConf.to_container(cfg.policy, resolve=True),
                          algo_cfg=OmegaConf.to_container(cfg.algo, resolve=True),
                          observation_space=env.single_observation_space, action_space=env.single_action_space,
                          roles=["actor"], seed=int(cfg.seed))
    env.close()
    return worker

@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """A toy-env PPO run dir with an MLP checkpoint at step 5 (weights moved off their init) and a
    damaged newer one at step 10; returns (run dir, the trained policy)."""
    from rlplat.config import compose as compose_train
    run_dir = tmp_path_factory.mktemp("toy_mlp_run")
    cfg = compose_train(["experiment=toy_mlp"])
    worker = _actor(cfg, run_dir)
    with torch.no_grad():
        for p in worker.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _write_checkpoint(run_dir, cfg, worker, 5)
    _write_checkpoint(run_dir, cfg, worker, 10)
    with open(run_dir / "checkpoints" / "step_10" / "policy" / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"damaged!")
    return run_dir, worker.policy


def test_a_run_dir_serves_its_newest_intact_checkpoint(mlp_run, start_server, capsys):
    run_dir, trained = mlp_run
    served = load(compose([f"checkpoint={run_dir}"]))
    assert "checkpoint step 10 is damaged and skipped" in capsys.readouterr().out
    assert served.source.endswith("step_5") and list(served.inputs) == ["state"]
    assert served.action_low == [-1.0, -1.0] and served.stats_hash is None
    server = start_server(served)
    client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    assert client.get_server_metadata()["model_id"].endswith("step_5")
    (dim,) = served.inputs["state"].shape
    state = np.random.default_rng(0).uniform(-1, 1, dim).astype(np.float32)
    reply = client.infer({"observation/state": state, "prompt": "ignored by a state policy"})
    with torch.no_grad():
        want = trained.act({"state": state[None]}, deterministic=True).actions.numpy()
    np.testing.assert_allclose(reply["actions"], want, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match=rf"'observation/state' must have shape \[{dim}\], got \[3\]"):
        client.infer({"observation/state": state[:3]})


def test_an_openvla_export_serves_with_its_action_statistics():
    from rlplat.config import package_file

    export = package_file("rlplat.policies.openvla", "assets/toy_sft")
    served = load(compose([f"checkpoint={export}"]))
    assert served.unnorm_key == "toyreachenv" and served.action_dim == 2
    assert served.action_stats["action"]["q01"] == [-1.0, -1.0] and len(served.stats_hash) == 64
    assert list(served.inputs) == ["image", "instruction"] and served.inputs["image"].shape == (32, 32, 3)


def test_what_cannot_be_served_is_named(tmp_path):
    with pytest.raises(ServeConfigError, match="no such file or folder"):
        load(compose([f"checkpoint={tmp_path / 'nowhere'}"]))
    with pytest.raises(ServeConfigError, match="neither a run dir"):
        load(compose([f"checkpoint={tmp_path}"]))
    adapter = tmp_path / "lora_export" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "/data/openvla-7b-missing"}')
    with pytest.raises(ServeConfigError, match="openvla-7b-missing"):
        load(compose([f"checkpoint={adapter.parent}", "policy=openvla_7b"]))


def test_a_vla_run_serves_with_the_action_statistics_of_its_checkpoint(tmp_path, start_server):
    """A quickstart-shaped run (tiny OpenVLA, GRPO) whose checkpoint carries its own statistics:
    the server unnormalises with them, announces them, and matches the trained policy."""
    from rlplat.config import compose as compose_train
    from rlplat.policies.base import compute_stats
    from tests.serve.helpers import camera

    cfg = compose_train(["experiment=quickstart"])
    worker = _actor(cfg, tmp_path)
    demos = np.random.default_rng(0).uniform(-0.5, 0.25, (200, 2))
    worker.set_action_stats(compute_stats(demos), "my_robot")
    _write_checkpoint(tmp_path, cfg, worker, 3)

    served = load(compose([f"checkpoint={tmp_path}"]))
    assert served.unnorm_key == "my_robot" and served.action_low == pytest.approx(np.quantile(demos, 0.01, 0).tolist())
    server = start_server(served)
    client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    meta = client.get_server_metadata()
    assert meta["unnorm_key"] == "my_robot" and meta["norm_stats_hash"] == served.stats_hash
    image = camera(5)
    reply = client.infer({"observation/image": image, "prompt": "reach the blue square"})
    with torch.no_grad():
        want = worker.policy.act({"image": image[None], "instruction": np.array(["reach the blue square"], object)},
                                 deterministic=True).actions.numpy()
    np.testing.assert_array_equal(reply["actions"], want)
    assert np.all(reply["actions"] >= np.array(meta["action_low"]) - 1e-6)
    assert np.all(reply["actions"] <= np.array(meta["action_high"]) + 1e-6)


def test_a_run_with_saved_spaces_serves_without_building_its_env(mlp_run, tmp_path, monkeypatch):
    # Runs write env_spec.json: the server rebuilds the policy from it, so serving a run trained in
    # a simulator needs no simulator (the slim serve image).
    import shutil

    from rlplat.serve import loading

    run_dir, trained = mlp_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = OmegaConf.load(copy / "config.yaml")
    env = instantiate(cfg.env, num_envs=1)
    checkpoint.write_env_spec(copy, {"observation_space": env.single_observation_space,
                                     "action_space": env.single_action_space, "control_hz": 12.5,
                                     "max_episode_steps": env.max_episode_steps})
    env.close()

    def no_env(env_cfg):
        raise AssertionError("the server built the env although the run saved its spaces")

    monkeypatch.setattr(loading, "_env_spaces", no_env)
    served = load(compose([f"checkpoint={copy}"]))
    assert served.control_hz == 12.5 and list(served.inputs) == ["state"]
    state = np.random.default_rng(1).uniform(-1, 1, served.inputs["state"].shape).astype(np.float32)
    with torch.no_grad():
        want = trained.act({"state": state[None]}, deterministic=True).actions.numpy()
    np.testing.assert_allclose(served.act({"state": state[None]}, deterministic=True)[:, 0], want, atol=1e-6)
    # Without the file (runs written before it), the env is built as before.
    (copy / checkpoint.ENV_SPEC).unlink()
    with pytest.raises(AssertionError, match="built the env"):
        load(compose([f"checkpoint={copy}"]))
