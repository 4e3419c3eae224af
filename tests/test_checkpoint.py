import random

import numpy as np
import pytest
import torch

from rlplat import checkpoint


def _make(run_dir, step):
    tmp = checkpoint.begin(run_dir, step)
    checkpoint.save_trainer_state(tmp, {"step": step})
    return checkpoint.commit(tmp, keep=2)


def test_commit_publishes_atomically_and_prunes(tmp_path):
    for step in (3, 6, 9):
        _make(tmp_path, step)
    # A half-written checkpoint (killed mid-write) is never listed.
    checkpoint.begin(tmp_path, 12)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [6, 9]
    assert checkpoint.load_trainer_state(tmp_path / "checkpoints" / "step_9")["step"] == 9


def test_find_resume_checkpoint(tmp_path):
    old, new = tmp_path / "run_a", tmp_path / "run_b"
    _make(old, 5)
    new.mkdir()
    assert checkpoint.find_resume_checkpoint(False, new) is None
    # resume=true in a fresh run dir falls back to the newest sibling run with a checkpoint.
    assert checkpoint.find_resume_checkpoint(True, new) == old / "checkpoints" / "step_5"
    _make(new, 2)
    assert checkpoint.find_resume_checkpoint(True, new) == new / "checkpoints" / "step_2"
    assert checkpoint.find_resume_checkpoint(str(old), new) == old / "checkpoints" / "step_5"
    assert checkpoint.find_resume_checkpoint(str(old / "checkpoints" / "step_5"), new).name == "step_5"
    with pytest.raises(FileNotFoundError, match="resume="):
        checkpoint.find_resume_checkpoint(str(tmp_path / "nowhere"), new)


def test_find_resume_true_without_any_checkpoint_says_what_to_do(tmp_path):
    (tmp_path / "only").mkdir()
    with pytest.raises(FileNotFoundError, match="pass resume="):
        checkpoint.find_resume_checkpoint(True, tmp_path / "only")


def test_rng_capture_restore_round_trip():
    state = checkpoint.capture_rng()
    a = (np.random.rand(), torch.rand(1).item(), random.random())
    checkpoint.restore_rng(state)
    assert (np.random.rand(), torch.rand(1).item(), random.random()) == a
