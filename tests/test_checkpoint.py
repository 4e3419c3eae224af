import json
import random

import numpy as np
import pytest
import torch

from rlplat import checkpoint


def _make(run_dir, step, keep=2, parts=None):
    tmp = checkpoint.begin(run_dir, step)
    checkpoint.save_trainer_state(tmp, {"step": step})
    (tmp / "policy").mkdir()
    (tmp / "policy" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return checkpoint.commit(tmp, keep=keep, parts=parts)


def test_commit_publishes_atomically_and_prunes(tmp_path):
    for step in (3, 6, 9):
        _make(tmp_path, step)
    # A half-written checkpoint (killed mid-write) is never listed.
    checkpoint.begin(tmp_path, 12)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [6, 9]
    assert checkpoint.load_trainer_state(tmp_path / "checkpoints" / "step_9")["step"] == 9


def test_find_resume_checkpoint_resumes_only_this_run(tmp_path):
    old, new = tmp_path / "run_a", tmp_path / "run_b"
    _make(old, 5)
    new.mkdir()
    assert checkpoint.find_resume_checkpoint(False, new) is None
    # resume=true never loads another run's checkpoint; the message names the newest sibling to pass.
    with pytest.raises(FileNotFoundError, match=f"continues this run dir .*resume={old}"):
        checkpoint.find_resume_checkpoint(True, new)
    _make(new, 2)
    assert checkpoint.find_resume_checkpoint(True, new) == new / "checkpoints" / "step_2"
    assert checkpoint.find_resume_checkpoint(str(old), new) == old / "checkpoints" / "step_5"
    assert checkpoint.find_resume_checkpoint(str(old / "checkpoints" / "step_5"), new).name == "step_5"
    with pytest.raises(FileNotFoundError, match="resume="):
        checkpoint.find_resume_checkpoint(str(tmp_path / "nowhere"), new)


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    folder = _make(tmp_path, 1, parts={"algo": "rlplat.algos.ppo.PPO"})
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    assert set(manifest["files"]) == {"trainer_state.pt", "policy/model.safetensors"}
    assert manifest["files"]["policy/model.safetensors"]["size"] == 256 * 64
    assert len(manifest["files"]["policy/model.safetensors"]["sha256"]) == 64
    assert checkpoint.parts_of(folder) == {"algo": "rlplat.algos.ppo.PPO"}
    assert checkpoint.verify(folder) is None


@pytest.mark.parametrize("damage", ["truncate", "zero_bytes", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, capsys, damage):
    _make(tmp_path, 1, keep=3)
    newest = _make(tmp_path, 2, keep=3)
    weights = newest / "policy" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "zero_bytes":
        data = bytearray(weights.read_bytes())
        data[1000:3000] = bytes(2000)
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    assert checkpoint.verify(newest) is not None and str(weights) in checkpoint.verify(newest)
    assert checkpoint.find_resume_checkpoint(True, tmp_path) == tmp_path / "checkpoints" / "step_1"
    assert f"checkpoint step 2 is damaged and skipped: {weights}" in capsys.readouterr().out
    # Naming the damaged folder itself is refused, naming the file and the run dir to pass instead.
    with pytest.raises(FileNotFoundError, match=f"damaged: {weights}.*resume={tmp_path}"):
        checkpoint.find_resume_checkpoint(str(newest), tmp_path / "other")


def test_a_checkpoint_of_another_algorithm_or_policy_is_refused_by_name(tmp_path):
    from omegaconf import OmegaConf

    folder = _make(tmp_path, 1, parts={"algo": "rlplat.algos.d3po.D3PO", "policy": "rlplat.policies.mlp.MLPPolicy"})
    cfg = OmegaConf.create({"algo": {"_target_": "rlplat.algos.ppo.PPO"},
                            "policy": {"_target_": "rlplat.policies.mlp.MLPPolicy"}})
    with pytest.raises(ValueError, match="written by algo D3PO, but this run's algo is PPO"):
        checkpoint.check_same_parts(folder, cfg)
    cfg.algo._target_ = "rlplat.algos.d3po.D3PO"
    checkpoint.check_same_parts(folder, cfg)  # same parts: accepted


def test_disk_full_message_names_the_folder_and_free_space(tmp_path):
    import errno

    assert checkpoint.disk_full_message(ValueError("other"), tmp_path) is None
    message = checkpoint.disk_full_message(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "step_3.tmp")
    assert str(tmp_path / "step_3.tmp") in message and "MiB free" in message
    # safetensors reports it as text, inside Ray's error wrapper.
    assert checkpoint.disk_full_message(RuntimeError("SafetensorError: ... os error 28"), tmp_path) is not None


def test_find_resume_true_without_any_checkpoint_says_what_to_do(tmp_path):
    (tmp_path / "only").mkdir()
    with pytest.raises(FileNotFoundError, match="pass resume="):
        checkpoint.find_resume_checkpoint(True, tmp_path / "only")


def test_rng_capture_restore_round_trip():
    state = checkpoint.capture_rng()
    a = (np.random.rand(), torch.rand(1).item(), random.random())
    checkpoint.restore_rng(state)
    assert (np.random.rand(), torch.rand(1).item(), random.random()) == a
