"""The VectorEnv contract's shared pieces (envs/base.py): the step info, the expert default."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium import spaces

from rlplat.envs.base import VectorEnv, space_from_json, space_to_json, step_info


def test_step_info_reports_return_and_length_only_where_episodes_ended():
    done = np.array([True, False, True])
    info = step_info(np.array([True, False, False]), done, np.array([1.5, 2.0, -0.5]), np.array([3, 7, 50]),
                     {"state": np.zeros((3, 1))})
    np.testing.assert_array_equal(info["episode_return"], np.array([1.5, 0.0, -0.5], np.float32))
    np.testing.assert_array_equal(info["episode_length"], [3, 0, 50])
    assert info["episode_return"].dtype == np.float32 and info["done"] is done


class NoExpert(VectorEnv):
    def __init__(self) -> None:
        super().__init__(2, 5, spaces.Dict({"state": spaces.Box(-1, 1, (1,))}), spaces.Box(-1, 1, (1,)))

    reset = step = get_state = set_state = render = lambda self, *a, **k: None


def test_an_env_without_a_scripted_expert_says_sft_needs_one():
    with pytest.raises(NotImplementedError, match="NoExpert has no scripted expert.*algo=sft needs one"):
        NoExpert().expert_actions(noise=0.1)


def test_spaces_survive_their_json_description():
    import json
    import string

    space = spaces.Dict({
        "state": spaces.Box(-np.inf, np.inf, (5,), np.float32),
        "proprio": spaces.Box(np.array([-1, -1, 0], np.float32), np.array([1, 1, 1], np.float32), dtype=np.float32),
        "image": spaces.Box(0, 255, (8, 6, 3), np.uint8),
        "instruction": spaces.Text(40, min_length=2, charset=string.ascii_lowercase + " "),
    })
    back = space_from_json(json.loads(json.dumps(space_to_json(space))))
    assert back == space and list(back.spaces) == list(space.spaces)
    assert back["image"].dtype == np.uint8 and np.isinf(back["state"].high).all()
    assert back["instruction"].character_set == space["instruction"].character_set
    with pytest.raises(TypeError, match="cannot describe a Discrete space"):
        space_to_json(spaces.Discrete(3))
    with pytest.raises(ValueError, match="unknown space type 'tuple'"):
        space_from_json({"type": "tuple"})
