"""ToyReachEnv: a fast batched numpy reach task where the language instruction decides the goal."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gymnasium import spaces

from rlplat.envs.base import Obs, Seed, VectorEnv, check_arg, step_info
from rlplat.registry import checked, register

# RGB of every colour name an env may use. Gray and near-black are left out on purpose: they are
# the background and the gripper, and an object of that colour would be invisible in the image.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "magenta": (220, 60, 180),
    "white": (245, 245, 245),
    "brown": (140, 90, 40),
    "pink": (250, 160, 190),
}
BACKGROUND_RGB = (128, 128, 128)
GRIPPER_RGB = (25, 25, 25)

# Phrasings of the instruction; only the colour word carries the goal, the verb varies so a
# language-conditioned policy cannot key on one fixed string.
INSTRUCTION_TEMPLATES = (
    "reach the {color} square",
    "move to the {color} square",
    "touch the {color} square",
)

OBS_MODES = ("state", "rgb", "state+rgb")
REWARD_MODES = ("dense", "sparse")

# Scene geometry, in arena units (the arena is [-1, 1]^2).
OBJECT_HALF_SIZE = 0.08
GRIPPER_RADIUS = 0.06
# Object centres stay inside this box so squares never touch the arena border.
OBJECT_BOUND = 0.85
GRIPPER_BOUND = 0.9
# Minimum centre distances: objects never overlap (the squares' diagonal is 0.23) and the
# gripper never starts close enough to succeed or to sit on a distractor.
MIN_OBJECT_DIST = 0.35
MIN_GRIPPER_DIST = 0.3
# Dense progress reward for a full-speed step along an axis (a diagonal step at the corner of
# the action box covers sqrt(2) times more and earns up to 0.14).
PROGRESS_SCALE = 0.1
SUCCESS_BONUS = 1.0
# Rejection sampling: candidates drawn per try and tries before giving up on a scene.
_CANDIDATES = 16
_MAX_LAYOUT_TRIES = 100
_INSTRUCTION_MAX_CHARS = 64


@dataclass
class ToyEnvConfig:
    """Constructor arguments of envs/toy.py's ToyReachEnv (see its docstring)."""

    # Parallel training envs in total, split evenly over the env workers.
    num_envs: int = checked(64, ge=1)
    # Coloured squares per scene; one of them is named by the instruction.
    num_objects: int = checked(3, ge=1)
    # Colour vocabulary of the squares and instructions.
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    # Observation keys produced: state, rgb or state+rgb.
    obs_mode: str = "state"
    # Side of the square RGB image in pixels.
    image_size: int = checked(64, ge=8)
    # Episode limit; reaching it sets truncated.
    max_episode_steps: int = checked(50, ge=1)
    # dense (progress + success bonus) or sparse (1 on success).
    reward_mode: str = "dense"
    # Arena units moved per unit action.
    action_scale: float = checked(0.1, gt=0)
    # Distance to the target that counts as success.
    success_radius: float = checked(0.1, gt=0)
    # Success does not end the episode (episodes always run max_episode_steps).
    ignore_terminations: bool = False


@register("env", "toy", ToyEnvConfig)
class ToyReachEnv(VectorEnv):
    """Move a point gripper onto the coloured square named by the instruction.

    **Task Description:**
    A 2D arena [-1, 1]^2 holds ``num_objects`` coloured squares and a point gripper. The
    instruction (e.g. "reach the blue square") names one square, the target; the others are
    distractors. The agent moves the gripper until it is on the target. Only the instruction
    tells target from distractors, so a policy that ignores language succeeds about
    1 / ``num_objects`` of the time at best.

    **Randomizations:**
    - the squares' colours: ``num_objects`` distinct colours drawn from ``colors``;
    - the squares' centres: uniform in [-0.85, 0.85]^2, at least 0.35 apart;
    - the target: one of the squares, uniformly;
    - the gripper's start: uniform in [-0.9, 0.9]^2, at least 0.3 from every square;
    - the instruction's phrasing: "reach / move to / touch the {color} square".

    **Success Conditions:**
    The gripper is closer than ``success_radius`` to the target's centre. The episode then
    terminates. Touching a distractor does nothing. Episodes without success are truncated
    after ``max_episode_steps`` steps.

    **Observations** (dict, leading dim N; see ``rlplat.envs.base``):
    - ``state`` float32 [N, S], S = 2 + K * (2 + C) + C + 2 with K = ``num_objects`` and
      C = ``len(colors)``: gripper xy; then for each square k: its xy minus the gripper xy,
      and a one-hot of its colour over ``colors``; then a one-hot of the instructed colour;
      then the target's xy minus the gripper xy. Like ManiSkill's state observations it is
      privileged (it names the goal), so state baselines learn fast without grounding the
      language; image and instruction policies (``rgb`` + ``instruction``) must ground it.
    - ``proprio`` float32 [N, 3]: gripper xy and the episode's elapsed fraction t / T.
    - ``image`` uint8 [N, image_size, image_size, 3] (obs modes with rgb): gray background,
      coloured squares, the gripper as a dark disc. Row 0 is y = +1, column 0 is x = -1.
    - ``instruction`` object [N] of str.

    **Actions:** float [N, 2] in [-1, 1] (clipped): gripper += ``action_scale`` * action, then
    the gripper is clipped to the arena.

    **Rewards:** "sparse": 1 on the success step, else 0. "dense": the progress
    (d_prev - d) / ``action_scale`` * 0.1 (0.1 for a full-speed step along an axis, at most
    0.1 * sqrt(2) on the diagonal; it telescopes to the net distance closed) plus 1 on the
    success step.
    """

    #: One-line summary for logs and config listings; the per-env goal is in ``instruction``.
    task_description = "Move the gripper onto the square whose colour the instruction names."

    def __init__(
        self,
        *,
        num_envs: int = 16,
        num_objects: int = 3,
        colors: Sequence[str] = ("red", "green", "blue", "yellow"),
        obs_mode: str = "state",
        image_size: int = 64,
        max_episode_steps: int = 50,
        reward_mode: str = "dense",
        action_scale: float = 0.1,
        success_radius: float = 0.1,
        ignore_terminations: bool = False,
    ) -> None:
        """Builds N toy reach envs; call ``reset`` before ``step``.

        Args:
            num_envs: Number of sub-envs N, >= 1.
            num_objects: Squares per scene, 1 <= num_objects <= len(colors).
            colors: Distinct colour names from ``PALETTE``; the state one-hots follow this order.
            obs_mode: "state", "rgb" or "state+rgb". ``state``, ``proprio`` and ``instruction``
                are always returned; rgb modes add ``image``.
            image_size: Side of the square image in pixels, >= 8.
            max_episode_steps: Steps before truncation, >= 1.
            reward_mode: "dense" or "sparse".
            action_scale: Gripper displacement per unit action, > 0.
            success_radius: Gripper-to-target distance below which the task is solved, > 0.
            ignore_terminations: Success does not end the episode; every episode runs
                ``max_episode_steps`` (the gripper may leave the target again).

        Raises:
            ValueError: If an argument is out of range; the message names it.
        """
        colors = tuple(colors)
        check_arg(
            _is_int(num_envs) and num_envs >= 1,
            "num_envs",
            f"must be an int >= 1, got {num_envs!r}",
        )
        check_arg(len(colors) >= 1, "colors", "must name at least one colour")
        unknown = [c for c in colors if c not in PALETTE]
        check_arg(not unknown, "colors", f"unknown colour(s) {unknown}; allowed: {sorted(PALETTE)}")
        check_arg(len(set(colors)) == len(colors), "colors", f"must be distinct, got {list(colors)}")
        check_arg(
            _is_int(num_objects) and 1 <= num_objects <= len(colors),
            "num_objects",
            f"must be an int in [1, len(colors)={len(colors)}], got {num_objects!r}",
        )
        check_arg(obs_mode in OBS_MODES, "obs_mode", f"must be one of {OBS_MODES}, got {obs_mode!r}")
        check_arg(
            reward_mode in REWARD_MODES,
            "reward_mode",
            f"must be one of {REWARD_MODES}, got {reward_mode!r}",
        )
        check_arg(
            _is_int(image_size) and image_size >= 8,
            "image_size",
            f"must be an int >= 8, got {image_size!r}",
        )
        check_arg(
            _is_int(max_episode_steps) and max_episode_steps >= 1,
            "max_episode_steps",
            f"must be an int >= 1, got {max_episode_steps!r}",
        )
        check_arg(action_scale > 0, "action_scale", f"must be > 0, got {action_scale!r}")
        check_arg(success_radius > 0, "success_radius", f"must be > 0, got {success_radius!r}")

        self.num_objects = int(num_objects)
        self.obs_mode = obs_mode
        self.image_size = int(image_size)
        self.reward_mode = reward_mode
        self.action_scale = float(action_scale)
        self.success_radius = float(success_radius)
        self.ignore_terminations = bool(ignore_terminations)
        self._colors = colors
        n, k, c = int(num_envs), self.num_objects, len(colors)

        state_dim = 2 + k * (2 + c) + c + 2
        side = self.image_size
        obs_spaces: dict[str, spaces.Space] = {
            "state": spaces.Box(-2.0, 2.0, (state_dim,), np.float32),
            "proprio": spaces.Box(
                np.array([-1, -1, 0], np.float32), np.array([1, 1, 1], np.float32), dtype=np.float32
            ),
            "instruction": spaces.Text(
                _INSTRUCTION_MAX_CHARS, charset=string.ascii_lowercase + " "
            ),
        }
        if "rgb" in obs_mode:
            obs_spaces["image"] = spaces.Box(0, 255, (side, side, 3), np.uint8)
        super().__init__(
            num_envs=n,
            max_episode_steps=int(max_episode_steps),
            single_observation_space=spaces.Dict(obs_spaces),
            single_action_space=spaces.Box(-1.0, 1.0, (2,), np.float32),
        )

        # Columns of the state vector, computed once so observe() is a few fancy assignments.
        block = 2 + c
        starts = 2 + block * np.arange(k)
        self._rel_cols = (starts[:, None] + np.arange(2)).ravel()
        self._onehot_cols = (starts[:, None] + 2 + np.arange(c)).ravel()
        self._instr_cols = 2 + block * k + np.arange(c)
        self._goal_cols = 2 + block * k + c + np.arange(2)
        self._eye = np.eye(c, dtype=np.float32)
        self._color_rgb = np.array([PALETTE[name] for name in colors], np.uint8)
        # Pixel-centre coordinates: column j is x, row i is y with row 0 at the top (y = +1).
        self._pix_x = -1.0 + (np.arange(side) + 0.5) * (2.0 / side)
        self._pix_y = 1.0 - (np.arange(side) + 0.5) * (2.0 / side)
        self._all = np.arange(n)

        # Per-env simulation state (float64 so trajectories do not drift with float32 rounding).
        self._gripper = np.zeros((n, 2))
        self._obj_pos = np.zeros((n, k, 2))
        self._obj_color = np.zeros((n, k), np.int64)  # index into colors
        self._target = np.zeros(n, np.int64)  # index into the scene's objects
        self._target_pos = np.zeros((n, 2))  # cache of obj_pos[i, target[i]]
        self._t = np.zeros(n, np.int64)
        self._prev_dist = np.zeros(n)
        self._ep_return = np.zeros(n)
        self._instructions = np.full(n, "", dtype=object)
        # state obs with the per-episode constant one-hots filled at reset.
        self._state_template = np.zeros((n, state_dim), np.float32)
        # One generator per env for scenes and one for expert noise, so sharding never changes
        # results and drawing expert noise never changes which scenes come next.
        self._rngs: list[np.random.Generator] | None = None
        self._noise_rngs: list[np.random.Generator] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def colors(self) -> tuple[str, ...]:
        """Colour names in the order of the state one-hots."""
        return self._colors

    @property
    def instructions(self) -> np.ndarray:
        """Current instruction per env, object array [N] of str."""
        return self._instructions.copy()

    @property
    def gripper_pos(self) -> np.ndarray:
        """Gripper xy per env, float64 [N, 2]."""
        return self._gripper.copy()

    @property
    def target_pos(self) -> np.ndarray:
        """Centre of the instructed square per env, float64 [N, 2]."""
        return self._target_pos.copy()

    @property
    def object_pos(self) -> np.ndarray:
        """Centres of all squares per env, float64 [N, K, 2]."""
        return self._obj_pos.copy()

    @property
    def object_colors(self) -> np.ndarray:
        """Colour index (into ``colors``) of every square, int64 [N, K]."""
        return self._obj_color.copy()

    @property
    def target_index(self) -> np.ndarray:
        """Which square (index into the K squares) is the target, int64 [N]."""
        return self._target.copy()

    @property
    def elapsed_steps(self) -> np.ndarray:
        """Steps taken in the current episode per env, int64 [N]."""
        return self._t.copy()

    def reset(
        self, *, seed: Seed = None, options: dict[str, Any] | None = None
    ) -> tuple[Obs, dict[str, Any]]:
        """Starts a new episode in every env.

        Args:
            seed: An int s seeds env i with s + i; a sequence gives one seed per env (repeat a
                seed to get identical scenes); None continues each env's generator, or seeds
                from OS entropy on the first reset.
            options: Must be None or empty; this env has no reset options.

        Returns:
            ``(obs, {})``.
        """
        if options:
            raise ValueError(
                f"options: ToyReachEnv takes no reset options, got keys {sorted(options)}"
            )
        if seed is not None or self._rngs is None:
            self._rngs, self._noise_rngs = [], []
            for s in self._seeds(seed):
                scene_seq, noise_seq = np.random.SeedSequence(s).spawn(2)
                self._rngs.append(np.random.default_rng(scene_seq))
                self._noise_rngs.append(np.random.default_rng(noise_seq))
        for i in range(self.num_envs):
            self._sample_episode(i)
        self._refresh_episode_constants(self._all)
        return self._observe(self._all), {}

    def step(
        self, actions: np.ndarray
    ) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Moves every gripper, scores the step and auto-resets envs that ended (SAME_STEP).

        Args:
            actions: float [N, 2]; values outside [-1, 1] are clipped.

        Returns:
            ``(obs, reward, terminated, truncated, info)``; ``info`` holds ``success``,
            ``done``, ``episode_return``, ``episode_length`` and ``final_obs``.
        """
        self._require_reset()
        a = np.asarray(actions, dtype=np.float64)
        if a.shape != (self.num_envs, 2):
            raise ValueError(f"actions: expected shape ({self.num_envs}, 2), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("actions: contains NaN or inf; check the policy output")
        np.clip(a, -1.0, 1.0, out=a)
        self._gripper += self.action_scale * a
        np.clip(self._gripper, -1.0, 1.0, out=self._gripper)
        self._t += 1

        dist = self._target_distance()
        success = dist < self.success_radius
        terminated = np.zeros_like(success) if self.ignore_terminations else success.copy()
        truncated = ~terminated & (self._t >= self.max_episode_steps)
        if self.reward_mode == "sparse":
            reward = success * SUCCESS_BONUS
        else:
            progress = (self._prev_dist - dist) * (PROGRESS_SCALE / self.action_scale)
            reward = progress + success * SUCCESS_BONUS
        self._prev_dist = dist
        self._ep_return += reward
        done = terminated | truncated

        final_obs = self._observe(self._all)
        info = step_info(success, done, self._ep_return, self._t, final_obs)
        # Copy so that final_obs keeps the terminal rows after the reset below overwrites them.
        obs = {key: value.copy() for key, value in final_obs.items()}
        ended = np.flatnonzero(done)
        if ended.size:
            # Per-env loop only here: each env draws its next scene from its own generator.
            for i in ended:
                self._sample_episode(int(i))
            self._refresh_episode_constants(ended)
            for key, value in self._observe(ended).items():
                obs[key][ended] = value
        return obs, reward.astype(np.float32), terminated, truncated, info

    def expert_actions(self, noise: float = 0.0) -> np.ndarray:
        """Scripted expert: heads straight for the instructed square at full speed.

        The action is the offset to the target in action units, scaled down (keeping its
        direction) so no component exceeds 1; near the target it lands exactly on the centre.

        Args:
            noise: Std of Gaussian noise added to each action component before clipping,
                >= 0. Drawn from each env's own expert-noise generator, so it is reproducible
                under the reset seed and does not change the scenes that follow.

        Returns:
            float32 [N, 2] actions in [-1, 1].
        """
        self._require_reset()
        if noise < 0:
            raise ValueError(f"noise: must be >= 0, got {noise!r}")
        a = (self._target_pos - self._gripper) / self.action_scale
        a /= np.maximum(np.abs(a).max(axis=1, keepdims=True), 1.0)
        if noise > 0:
            assert self._noise_rngs is not None
            a += noise * np.stack([rng.standard_normal(2) for rng in self._noise_rngs])
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def render(self, index: int = 0) -> np.ndarray:
        """Draws env ``index`` as uint8 [image_size, image_size, 3], in any obs mode."""
        self._require_reset()
        if not 0 <= index < self.num_envs:
            raise ValueError(f"index: must be in [0, {self.num_envs}), got {index}")
        return self._draw(np.array([index]))[0]

    def get_state(self) -> dict[str, Any]:
        """Returns a picklable snapshot (arrays, counters, generator states) for exact resume."""
        self._require_reset()
        assert self._rngs is not None and self._noise_rngs is not None
        return {
            "config": self._config(),
            "gripper": self._gripper.copy(),
            "obj_pos": self._obj_pos.copy(),
            "obj_color": self._obj_color.copy(),
            "target": self._target.copy(),
            "t": self._t.copy(),
            "prev_dist": self._prev_dist.copy(),
            "ep_return": self._ep_return.copy(),
            "instructions": self._instructions.copy(),
            "rng_states": [rng.bit_generator.state for rng in self._rngs],
            "noise_rng_states": [rng.bit_generator.state for rng in self._noise_rngs],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a ``get_state`` snapshot taken from an env with the same arguments.

        Raises:
            ValueError: If the snapshot comes from an env with a different num_envs,
                num_objects or colors.
        """
        if state["config"] != self._config():
            raise ValueError(
                f"state: snapshot config {state['config']} does not match this env's "
                f"{self._config()}; build the env with the same arguments"
            )
        self._gripper = np.array(state["gripper"], np.float64)
        self._obj_pos = np.array(state["obj_pos"], np.float64)
        self._obj_color = np.array(state["obj_color"], np.int64)
        self._target = np.array(state["target"], np.int64)
        self._t = np.array(state["t"], np.int64)
        self._prev_dist = np.array(state["prev_dist"], np.float64)
        self._ep_return = np.array(state["ep_return"], np.float64)
        self._instructions = np.array(state["instructions"], dtype=object)
        self._rngs = [_generator_from_state(s) for s in state["rng_states"]]
        self._noise_rngs = [_generator_from_state(s) for s in state["noise_rng_states"]]
        self._refresh_episode_constants(self._all)

    # ------------------------------------------------------------------ internals

    def _config(self) -> dict[str, Any]:
        return {
            "num_envs": self.num_envs,
            "num_objects": self.num_objects,
            "colors": list(self._colors),
        }

    def _require_reset(self) -> None:
        if self._rngs is None:
            raise RuntimeError(
                "ToyReachEnv: call reset() before step(), render(), expert_actions() or get_state()"
            )

    def _target_distance(self) -> np.ndarray:
        diff = self._target_pos - self._gripper
        return np.sqrt(diff[:, 0] ** 2 + diff[:, 1] ** 2)

    def _sample_episode(self, i: int) -> None:
        """Draws a new scene for env ``i`` from its own generator and zeroes its counters."""
        assert self._rngs is not None
        rng = self._rngs[i]
        k, c = self.num_objects, len(self._colors)
        # One draw for the discrete choices: colours by a random permutation, then target and
        # phrasing. Fewer generator calls keep auto-reset cheap inside step().
        u = rng.random(c + 2)
        colors = np.argsort(u[:c], kind="stable")[:k]
        target = int(u[c] * k)
        template = INSTRUCTION_TEMPLATES[int(u[c + 1] * len(INSTRUCTION_TEMPLATES))]
        objects, gripper = _sample_layout(rng, k)

        self._obj_pos[i] = objects
        self._obj_color[i] = colors
        self._target[i] = target
        self._gripper[i] = gripper
        self._t[i] = 0
        self._ep_return[i] = 0.0
        # Same float64 operations as _target_distance, so the dense reward telescopes exactly.
        dx, dy = objects[target][0] - gripper[0], objects[target][1] - gripper[1]
        self._prev_dist[i] = math.sqrt(dx * dx + dy * dy)
        self._instructions[i] = template.format(color=self._colors[colors[target]])

    def _refresh_episode_constants(self, rows: np.ndarray) -> None:
        """Recomputes the per-episode caches (target xy, state one-hots) of ``rows``."""
        n = len(rows)
        target = self._target[rows]
        self._target_pos[rows] = self._obj_pos[rows, target]
        onehots = self._eye[self._obj_color[rows]].reshape(n, -1)
        self._state_template[rows[:, None], self._onehot_cols] = onehots
        instructed = self._eye[self._obj_color[rows, target]]
        self._state_template[rows[:, None], self._instr_cols] = instructed

    def _observe(self, rows: np.ndarray) -> Obs:
        """Builds the observation dict for ``rows`` (fresh arrays, safe to keep)."""
        gripper = self._gripper[rows]
        state = self._state_template[rows]
        state[:, :2] = gripper
        relative = self._obj_pos[rows] - gripper[:, None, :]
        state[:, self._rel_cols] = relative.reshape(len(rows), -1)
        state[:, self._goal_cols] = self._target_pos[rows] - gripper
        proprio = np.empty((len(rows), 3), np.float32)
        proprio[:, :2] = gripper
        proprio[:, 2] = self._t[rows] / self.max_episode_steps
        obs = {"state": state, "proprio": proprio, "instruction": self._instructions[rows]}
        if "rgb" in self.obs_mode:
            obs["image"] = self._draw(rows)
        return obs

    def _draw(self, rows: np.ndarray) -> np.ndarray:
        """Renders ``rows`` as uint8 [n, H, W, 3], vectorised over envs and pixels.

        Every pixel gets a label (0 background, 1..K squares, K + 1 gripper), then one gather
        through a per-env palette turns labels into colours.
        """
        n, k = len(rows), self.num_objects
        obj = self._obj_pos[rows]
        # [n, K, W] and [n, K, H]: which pixel columns / rows each square covers.
        in_x = np.abs(self._pix_x[None, None, :] - obj[:, :, 0, None]) <= OBJECT_HALF_SIZE
        in_y = np.abs(self._pix_y[None, None, :] - obj[:, :, 1, None]) <= OBJECT_HALF_SIZE
        labels = np.zeros((n, self.image_size, self.image_size), np.uint8)
        for j in range(k):  # K is small; squares never overlap, so order does not matter
            labels[in_y[:, j, :, None] & in_x[:, j, None, :]] = j + 1
        gripper = self._gripper[rows]
        dx2 = (self._pix_x[None, :] - gripper[:, 0, None]) ** 2
        dy2 = (self._pix_y[None, :] - gripper[:, 1, None]) ** 2
        labels[dy2[:, :, None] + dx2[:, None, :] <= GRIPPER_RADIUS**2] = k + 1  # drawn on top

        palette = np.empty((n, k + 2, 3), np.uint8)
        palette[:, 0] = BACKGROUND_RGB
        palette[:, 1 : k + 1] = self._color_rgb[self._obj_color[rows]]
        palette[:, k + 1] = GRIPPER_RGB
        flat = labels + (np.arange(n, dtype=np.intp) * (k + 2))[:, None, None]
        # np.take along axis 0 is ~4x faster than the equivalent fancy index palette[flat].
        return np.take(palette.reshape(-1, 3), flat, axis=0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)



def _sample_layout(
    rng: np.random.Generator, num_objects: int
) -> tuple[list[list[float]], list[float]]:
    """Samples K square centres and a gripper start (xy pairs) at the minimum distances apart.

    Sequential rejection sampling over one block of candidates drawn per try, so the number of
    generator calls is fixed and the result depends only on the generator. The acceptance test
    runs on Python floats: for a handful of points that is several times faster than numpy.
    """
    for _ in range(_MAX_LAYOUT_TRIES):
        block = rng.uniform(-1.0, 1.0, size=(num_objects + 1, _CANDIDATES, 2)).tolist()
        placed: list[list[float]] = []
        for j, candidates in enumerate(block):
            is_gripper = j == num_objects
            bound = GRIPPER_BOUND if is_gripper else OBJECT_BOUND
            min_d2 = (MIN_GRIPPER_DIST if is_gripper else MIN_OBJECT_DIST) ** 2
            for u, v in candidates:
                x, y = u * bound, v * bound
                if all((x - px) ** 2 + (y - py) ** 2 >= min_d2 for px, py in placed):
                    break
            else:
                break  # no candidate fits: start the scene again
            if is_gripper:
                return placed, [x, y]
            placed.append([x, y])
    raise RuntimeError(
        f"ToyReachEnv: could not place {num_objects} squares {MIN_OBJECT_DIST} apart in "
        f"{_MAX_LAYOUT_TRIES} tries; use fewer num_objects."
    )


def _generator_from_state(state: dict[str, Any]) -> np.random.Generator:
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)
