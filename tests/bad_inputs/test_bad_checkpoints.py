"""Checkpoint faults while a run writes: a full disk is reported with the path and the free
space, nothing half-written stays, and the run stops with the resume command."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from rlplat import checkpoint
from rlplat.loops.skeleton import Run


class _FullDiskGroup:
    """A policy group whose save fills the disk halfway through (as safetensors reports it)."""

    def save(self, folder: str) -> None:
        from pathlib import Path

        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_names_path_and_free_space_and_leaves_nothing(tmp_path, capsys):
    run = Run.__new__(Run)  # the checkpoint path of a run, without workers
    run.run_dir, run.policy_groups = tmp_path, [_FullDiskGroup()]
    run.collector = SimpleNamespace(state_dict=dict)
    run.cfg = OmegaConf.create({"trainer": {"keep_last": 3}, "algo": {"_target_": "a.A"}, "policy": {"_target_": "p.P"}})
    with pytest.raises(SystemExit) as exit_info:
        run.save_checkpoint(7)
    message = str(exit_info.value.code)
    assert "the disk is full" in message and str(tmp_path / "checkpoints" / "step_7.tmp") in message
    assert "MiB free" in message and "resume with: rlplat-train" in message
    assert not (tmp_path / "checkpoints" / "step_7.tmp").exists() and checkpoint.list_checkpoints(tmp_path) == []


SMALL = ["experiment=toy_mlp", "env.num_envs=8", "algo.rollout_steps=10", "algo.num_minibatches=2",
         "trainer.eval_episodes=4", "trainer.save_video=false", "logger.progress_bar=false", "policy.hidden_sizes=[32,32]",
         "trainer.checkpoint_every=1", "trainer.eval_every=0"]


@pytest.mark.parametrize("damaged", ["policy/model.safetensors", "trainer_state.pt", "policy/optimizer.pt"])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous(
        ray_local, tmp_path, capsys, damaged):
    from rlplat.config import compose
    from rlplat.logging import read_metrics
    from rlplat.train import run

    run(compose([*SMALL, "trainer.total_steps=3"]), tmp_path)
    path = tmp_path / "checkpoints" / "step_3" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a crash mid-copy
    capsys.readouterr()
    run(compose([*SMALL, "trainer.total_steps=4", "resume=true"]), tmp_path)
    out = capsys.readouterr().out
    assert f"checkpoint step 3 is damaged and skipped: {path} has" in out and "(truncated)" in out, out
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_2'} (step 2)" in out, out
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
