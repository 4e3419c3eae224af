"""Loads what ``rlplat-serve`` serves: a run's checkpoint, an export, or an untrained policy.

A run dir or ``checkpoints/step_N`` goes the way ``rlplat-eval`` goes: the newest intact
checkpoint (``rlplat.checkpoint``, damaged ones skipped with a warning), the run's own
``config.yaml`` validated by ``rlplat.validate``, the policy built by a ``PolicyWorker`` and its
weights and action statistics loaded by ``PolicyWorker.load``. An export (a folder written by
``save_pretrained``, with its ``dataset_statistics.json``) is built by the policy group's class
with ``init_from`` pointing at it. Normalisation and unnormalisation stay inside the policy: the
server sends actions in robot units.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rlplat import checkpoint, registry
from rlplat.policies.base import ActionPolicy
from rlplat.serve.config import ServeConfigError, to_plain

#: Observation keys whose values are images (uint8 [H, W, 3]).
IMAGE_KEYS = ("image", "wrist_image")
#: Observation keys whose values are flat float vectors.
VECTOR_KEYS = ("state", "proprio")


@dataclass
class ServedPolicy:
    """A policy ready to act, and what clients are told about it."""

    policy: ActionPolicy
    # Policy observation keys the policy reads, and the space of each.
    inputs: dict[str, gym.Space]
    # Actions per reply (the action chunk; 1 for single-step policies) and action dims.
    action_horizon: int
    action_dim: int
    # The bounds actions lie in (robot units), or None when unbounded.
    action_low: list[float] | None
    action_high: list[float] | None
    # Where the weights came from and what to call them.
    model_id: str
    source: str
    control_hz: float | None = None
    # The action statistics the policy unnormalises with (None: it acts in robot units directly).
    action_stats: dict[str, Any] | None = None
    unnorm_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stats_hash(self) -> str | None:
        """sha256 of the action statistics (canonical JSON), so a client can tell two servers apart."""
        if self.action_stats is None:
            return None
        text = json.dumps({"key": self.unnorm_key, "stats": self.action_stats}, sort_keys=True, default=float)
        return hashlib.sha256(text.encode()).hexdigest()

    @torch.no_grad()
    def act(self, obs: dict[str, Any], deterministic: bool) -> np.ndarray:
        """Actions float32 [B, H, D] for a batch of B observations (policy keys, batched)."""
        self.policy.eval()
        actions = self.policy.act(obs, deterministic=deterministic).actions
        actions = actions.detach().to("cpu", torch.float32).numpy()
        return actions.reshape(actions.shape[0], self.action_horizon, self.action_dim)


def load(cfg: DictConfig) -> ServedPolicy:
    """The policy ``cfg`` (a checked serve config) names, built and loaded.

    Raises:
        ServeConfigError: the checkpoint is missing or damaged, its run config no longer validates,
            or the weights it needs are not on this machine (naming what to pass).
    """
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    torch.manual_seed(int(cfg.seed))
    if cfg.get("checkpoint") is None:
        return _untrained(cfg)
    path = Path(str(cfg.checkpoint)).expanduser()
    if not path.exists():
        raise ServeConfigError(f"checkpoint={path}: no such file or folder; pass a run dir, a checkpoints/step_N "
                               f"folder or an export folder")
    if path.name == checkpoint.POLICY and (path.parent / checkpoint.MANIFEST).exists():
        path = path.parent  # step_N/policy: its checkpoint
    if (path / "config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file():
        return _export(cfg, path)
    return _run_checkpoint(cfg, path)


# --------------------------------------------------------------------------- run checkpoints


def _run_checkpoint(cfg: DictConfig, path: Path) -> ServedPolicy:
    from rlplat.validate import ConfigError, validate
    from rlplat.workers.policy import PolicyWorker

    try:
        folder = checkpoint.find_resume_checkpoint(str(path), path)
    except FileNotFoundError:
        raise ServeConfigError(
            f"checkpoint={path} is neither a run dir (config.yaml + an intact checkpoints/step_N), a checkpoint "
            f"folder (trainer_state.pt), nor an export (config.json); pass one of those") from None
    run_dir = folder.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise ServeConfigError(f"{config_file} is missing: the server rebuilds the policy from the run's saved "
                               f"config; pass a checkpoint inside a run dir written by rlplat-train")
    run_cfg = OmegaConf.load(config_file)
    run_cfg.resume, run_cfg.warm_start.steps = False, 0
    if cfg.get("policy") is not None:
        raise ServeConfigError(f"checkpoint={path} is a run's checkpoint, which names its own policy; drop "
                               f"policy={cfg.policy._target_.rsplit('.', 1)[-1]} (policy= is for exports)")
    scratch = Path(tempfile.mkdtemp(prefix="rlplat-serve-"))
    try:
        validate(run_cfg, scratch)
    except ConfigError as err:
        raise ServeConfigError(f"the run's config ({config_file}) no longer validates: {err}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if run_cfg.get("env") is None:
        raise ServeConfigError(f"{run_dir} is a text-to-image run; the server serves policies that act (env runs)")
    # The spaces the run saved (no simulator needed); runs older than env_spec.json build one env.
    spaces = checkpoint.read_env_spec(run_dir) or _env_spaces(run_cfg.env)
    worker = PolicyWorker(policy_cfg=to_plain(run_cfg.policy), algo_cfg=to_plain(run_cfg.algo),
                          observation_space=spaces["observation_space"], action_space=spaces["action_space"],
                          roles=[], seed=int(run_cfg.seed), torch_threads=torch.get_num_threads())
    worker.load(str(folder / checkpoint.POLICY), rng=False)
    return _served(cfg, worker.policy, spaces, source=str(folder), default_id=f"{run_dir.name}/{folder.name}",
                   policy_cfg=run_cfg.policy)


# --------------------------------------------------------------------------- exports


def _export(cfg: DictConfig, folder: Path) -> ServedPolicy:
    policy_cfg = cfg.get("policy")
    if policy_cfg is None:
        policy_cfg = OmegaConf.structured(registry.get("policy", "openvla").node())
    policy_cfg = copy.deepcopy(policy_cfg)
    if "init_from" not in policy_cfg:
        raise ServeConfigError(f"checkpoint={folder} is an export, which policy={policy_cfg._target_} cannot load "
                               f"(it has no init_from); serve an OpenVLA policy group or a run dir")
    with open_dict(policy_cfg):
        policy_cfg.init_from = str(folder)
    try:
        registry.preflight("policy", policy_cfg)
    except (ValueError, FileNotFoundError) as err:
        raise ServeConfigError(str(err)) from None
    spaces = _export_spaces(folder)
    policy = instantiate(policy_cfg, observation_space=spaces["observation_space"],
                         action_space=spaces["action_space"], _convert_="all")
    return _served(cfg, policy, spaces, source=str(folder), default_id=folder.name, policy_cfg=policy_cfg)


def _export_spaces(folder: Path) -> dict[str, Any]:
    """Spaces of an exported vision-language-action model, from its HF ``config.json`` (the base
    model's, for an adapter-only export): ``action_dim`` (else the statistics' width) and the
    vision tower's input size."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        config_file = Path(adapter.get("base_model_name_or_path") or "") / "config.json"
    if not config_file.is_file():
        raise ServeConfigError(f"{folder} holds a LoRA adapter whose base model ({config_file.parent}) is missing; "
                               f"put the base weights there (see policy.path) or re-export with export_base=true")
    config = json.loads(config_file.read_text())
    dim = config.get("action_dim")
    stats_file = folder / "dataset_statistics.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else config.get("norm_stats") or {}
    if dim is None and stats:
        dim = len(next(iter(stats.values()))["action"]["q01"])
    if dim is None:
        raise ServeConfigError(f"{config_file} names no action_dim and {folder} has no dataset_statistics.json; pass "
                               f"env=<the env it was trained on> so the server knows the action space")
    size = int((config.get("image_sizes") or [224])[0])
    observation = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (size, size, 3), np.uint8),
                                   "instruction": gym.spaces.Text(max_length=512)})
    return {"observation_space": observation,
            "action_space": gym.spaces.Box(-np.inf, np.inf, (int(dim),), np.float32), "control_hz": None}


# --------------------------------------------------------------------------- untrained


def _untrained(cfg: DictConfig) -> ServedPolicy:
    if cfg.get("env") is None:
        raise ServeConfigError(f"policy={cfg.policy._target_.rsplit('.', 1)[-1]} without a checkpoint is built "
                               f"for an env's spaces: set env=NAME (e.g. env=toy_camera)")
    spaces = _env_spaces(cfg.env)
    policy = instantiate(cfg.policy, observation_space=spaces["observation_space"],
                         action_space=spaces["action_space"], _convert_="all")
    name = cfg.policy._target_.rsplit(".", 1)[-1]
    return _served(cfg, policy, spaces, source="untrained", default_id=f"untrained {name}", policy_cfg=cfg.policy)


# --------------------------------------------------------------------------- shared


def _env_spaces(env_cfg: Any) -> dict[str, Any]:
    """The single observation/action spaces and control rate of one env of ``env_cfg``."""
    env = instantiate(env_cfg, num_envs=1)
    try:
        return {"observation_space": env.single_observation_space, "action_space": env.single_action_space,
                "control_hz": getattr(env, "control_hz", None)}
    finally:
        env.close()


def input_keys(policy: ActionPolicy, policy_cfg: Any, observation_space: gym.spaces.Dict) -> list[str]:
    """The observation keys ``policy`` reads: its ``input_keys`` if it declares them, else its
    config's ``obs_keys``, else the keys one warm-up ``act`` on a blank observation reads."""
    declared = getattr(policy, "input_keys", None) or (policy_cfg or {}).get("obs_keys")
    if declared:
        return [str(k) for k in declared]
    blank = RecordingObs(_blank(observation_space))
    with torch.no_grad():
        policy.act(blank, deterministic=True)
    return [k for k in observation_space.spaces if k in blank.read]


class RecordingObs(dict):
    """A batch of observations that records which keys are read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def _blank(space: gym.spaces.Dict) -> dict[str, Any]:
    blank: dict[str, Any] = {}
    for key, sub in space.spaces.items():
        if isinstance(sub, gym.spaces.Text):
            blank[key] = np.array(["reach the square"], dtype=object)
        else:
            blank[key] = np.zeros((1, *sub.shape), dtype=sub.dtype)
    return blank


def _served(cfg: DictConfig, policy: ActionPolicy, spaces: dict[str, Any], source: str, default_id: str,
            policy_cfg: Any) -> ServedPolicy:
    observation_space, action_space = spaces["observation_space"], spaces["action_space"]
    keys = input_keys(policy, to_plain(policy_cfg), observation_space)
    inputs = {k: observation_space[k] for k in keys}
    dim = int(np.prod(action_space.shape))
    low, high = _bounds(policy, action_space)
    stats = getattr(policy, "norm_stats", None) or None
    unnorm_key = getattr(policy, "unnorm_key", None)
    return ServedPolicy(
        # ActionPolicy.act gives one action per observation; a chunking policy declares its horizon.
        policy=policy, inputs=inputs, action_horizon=int(getattr(policy, "action_horizon", 1)), action_dim=dim,
        action_low=low, action_high=high,
        model_id=str(cfg.get("model_id") or default_id), source=source,
        control_hz=cfg.get("control_hz") or spaces.get("control_hz"),
        action_stats=dict(stats[unnorm_key]) if stats and unnorm_key in stats else None, unnorm_key=unnorm_key,
        extra={"policy": type(policy).__name__},
    )


def _bounds(policy: ActionPolicy, action_space: gym.spaces.Box) -> tuple[list[float] | None, list[float] | None]:
    """Where the policy's actions lie: the unnormalisation range of its statistics (q01..q99 on the
    normalised dims, -1..1 on the others), else the env's action space, else None."""
    stats, key = getattr(policy, "norm_stats", None), getattr(policy, "unnorm_key", None)
    if stats and key in stats:
        entry = stats[key]["action"]
        lo, hi = np.asarray(entry["q01"], float), np.asarray(entry["q99"], float)
        mask = np.asarray(entry.get("mask", [True] * len(lo)), bool)
        return np.where(mask, lo, -1.0).tolist(), np.where(mask, hi, 1.0).tolist()
    low, high = np.asarray(action_space.low, float).ravel(), np.asarray(action_space.high, float).ravel()
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return None, None
    return low.tolist(), high.tolist()
