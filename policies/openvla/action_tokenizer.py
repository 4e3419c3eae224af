"""OpenVLA's action tokenizer and its ``dataset_statistics.json`` normalisation, bit-compatible.

A released OpenVLA checkpoint emits one token per action dimension; turning those ids into robot
commands takes two steps that must match training exactly:

1. ``ActionTokenizer.decode``: token id -> normalised action in [-1, 1] (a bin centre).
2. ``unnormalize``: normalised action -> dataset units with the q01/q99 statistics of the
   dataset the checkpoint was trained on (``dataset_statistics.json``, also ``config.norm_stats``).

Reference (behaviour reproduced, code written independently), openvla/openvla:

- ``prismatic/vla/action_tokenizer.py``: ``ActionTokenizer.__init__`` / ``__call__`` /
  ``decode_token_ids_to_actions``.
- ``prismatic/extern/hf/modeling_prismatic.py``: ``OpenVLAForActionPrediction.__init__``
  (bins, ``vocab_size = text_config.vocab_size - pad_to_multiple_of`` = 32064 - 64 = 32000),
  ``predict_action`` (decode + unnormalise), ``_check_unnorm_key``, ``get_action_stats``.
- ``prismatic/vla/datasets/rlds/utils/data_utils.py``: ``normalize_action_and_proprio``
  (BOUNDS_Q99), ``get_dataset_statistics``, ``save_dataset_statistics``.

This module needs only numpy (torch is imported lazily by the ``*_torch`` methods), so it can
run in a robot-side process.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlplat.policies.base import compute_stats  # noqa: F401  (the statistics format lives with the contract)

if TYPE_CHECKING:
    import torch

STATS_FILENAME = "dataset_statistics.json"

# OpenVLA's BOUNDS_Q99 normalisation divides by (q99 - q01 + 1e-8); kept for bit-compatibility.
_NORM_EPS = 1e-8


class ActionTokenizer:
    """Uniform binning of actions in [min_action, max_action] onto the last ids of a vocabulary.

    The contract (identical to OpenVLA's, so a 7B checkpoint's tokens decode identically):
    ``n_bins`` bin *edges* ``linspace(min_action, max_action, n_bins)`` and ``n_bins - 1`` bin
    centres. An action is clipped, digitised against the edges (``np.digitize``, values
    ``1..n_bins``) and becomes token ``vocab_size - digitized``; so actions occupy ids
    ``[vocab_size - n_bins, vocab_size - 1]``, with ``min_action`` at the highest id.

    Args:
        vocab_size: Size of the base LLM vocabulary the action ids count down from (OpenVLA:
            32000, the Llama-2 vocabulary without the padding added for ``pad_to_multiple_of``).
        n_bins: Number of bin edges (OpenVLA: 256, giving 255 distinct decoded values).
        min_action: Lower clip bound and first edge (OpenVLA: -1).
        max_action: Upper clip bound and last edge (OpenVLA: 1).
    """

    def __init__(
        self,
        vocab_size: int = 32000,
        n_bins: int = 256,
        min_action: float = -1.0,
        max_action: float = 1.0,
    ) -> None:
        if int(n_bins) != n_bins or n_bins < 2:
            raise ValueError(f"n_bins must be an integer >= 2 (bin edges), got {n_bins!r}")
        if not (math.isfinite(min_action) and math.isfinite(max_action)) or not min_action < max_action:
            raise ValueError(
                f"min_action must be < max_action and both finite, got min_action={min_action!r}, "
                f"max_action={max_action!r}"
            )
        if int(vocab_size) != vocab_size or vocab_size <= n_bins:
            raise ValueError(
                f"vocab_size must be an integer > n_bins={n_bins} so the action ids fit below it, "
                f"got vocab_size={vocab_size!r}"
            )
        self._vocab_size = int(vocab_size)
        self._n_bins = int(n_bins)
        self.min_action = float(min_action)
        self.max_action = float(max_action)
        # OpenVLA: bins = np.linspace(min_action, max_action, n_bins) -- n_bins *edges*.
        self.bins = np.linspace(self.min_action, self.max_action, self._n_bins)
        # OpenVLA: bin_centers = (bins[:-1] + bins[1:]) / 2 -- n_bins - 1 centres.
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def vocab_size(self) -> int:
        """Base vocabulary size the action ids count down from."""
        return self._vocab_size

    @property
    def n_bins(self) -> int:
        """Number of bin edges (the decoded values number ``n_bins - 1``)."""
        return self._n_bins

    @property
    def action_token_begin_idx(self) -> int:
        """OpenVLA's ``action_token_begin_idx = vocab_size - (n_bins + 1)``.

        Note this is one *below* the smallest id ``encode`` can produce (``vocab_size - n_bins``):
        OpenVLA's training code selects action positions with ``labels > action_token_begin_idx``
        (strictly greater). Use ``action_token_range`` for inclusive bounds.
        """
        return self._vocab_size - (self._n_bins + 1)

    @property
    def action_token_range(self) -> tuple[int, int]:
        """Inclusive ``(lowest, highest)`` ids ``encode`` can produce, e.g. for logit masking."""
        # digitize returns n_bins for max_action and 1 for min_action.
        return self._vocab_size - self._n_bins, self._vocab_size - 1

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Token ids (int64, same shape) for actions in normalised units [..., D]."""
        # OpenVLA __call__: np.clip(action, float(min_action), float(max_action)); this also
        # sends out-of-range values to the same ids as the bounds.
        clipped = np.clip(np.asarray(actions, dtype=np.float64), self.min_action, self.max_action)
        # OpenVLA __call__: np.digitize(action, bins) (right=False: bins[i-1] <= x < bins[i]),
        # so min_action -> 1, an internal edge bins[k] -> k + 1, and max_action -> n_bins.
        digitized = np.digitize(clipped, self.bins)
        # OpenVLA __call__: token id = tokenizer.vocab_size - discretized_action.
        return (self._vocab_size - digitized).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Normalised actions (float64 bin centres, same shape) for token ids.

        Any id decodes: ids above the action range give the first centre and ids below it the
        last centre (OpenVLA's clipping, so a checkpoint that emits a non-action token still
        yields a bounded action).
        """
        # OpenVLA decode_token_ids_to_actions / predict_action: discretized = vocab_size - ids.
        digitized = self._vocab_size - np.asarray(token_ids, dtype=np.int64)
        # OpenVLA: np.clip(discretized - 1, 0, bin_centers.shape[0] - 1). digitized = n_bins
        # (max_action) would index one past the last centre, so it shares the last centre.
        index = np.clip(digitized - 1, 0, self.bin_centers.shape[0] - 1)
        # OpenVLA: normalized_actions = bin_centers[index].
        return self.bin_centers[index]

    def encode_torch(self, actions: torch.Tensor) -> torch.Tensor:
        """``encode`` for tensors (int64, on the input's device); equal to the numpy path."""
        import torch

        # float64 edges and values, as in numpy, so values on an edge bin identically.
        bins = torch.as_tensor(self.bins, dtype=torch.float64, device=actions.device)
        clipped = actions.to(torch.float64).clamp(self.min_action, self.max_action)
        # bucketize(right=True) gives i with bins[i-1] <= x < bins[i]: np.digitize(right=False).
        digitized = torch.bucketize(clipped, bins, right=True)
        return self._vocab_size - digitized

    def decode_torch(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``decode`` for tensors (float64, on the input's device); equal to the numpy path."""
        import torch

        centers = torch.as_tensor(self.bin_centers, dtype=torch.float64, device=token_ids.device)
        index = (self._vocab_size - token_ids.long() - 1).clamp(0, centers.shape[0] - 1)
        return centers[index]

    def __repr__(self) -> str:
        return (
            f"ActionTokenizer(vocab_size={self._vocab_size}, n_bins={self._n_bins}, "
            f"min_action={self.min_action}, max_action={self.max_action})"
        )


# --------------------------------------------------------------------------------------------
# dataset_statistics.json: {unnorm_key: {"action": {mean, std, max, min, q01, q99, mask},
#                                        "proprio": {...}, "num_transitions", "num_trajectories"}}
# --------------------------------------------------------------------------------------------


def load_stats(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Statistics keyed by dataset (``unnorm_key``), from a dict, a json file, or a directory.

    A directory means its ``dataset_statistics.json`` (where OpenVLA checkpoints keep it). The
    same structure is OpenVLA's ``config.norm_stats``, which can be passed as the dict.
    """
    if isinstance(path_or_dict, Mapping):
        stats = dict(path_or_dict)
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / STATS_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no statistics file at {path}; pass the path of a {STATS_FILENAME} (or its folder)"
            )
        with path.open() as f:
            stats = json.load(f)
    _check_stats(stats)
    return stats


def save_stats(stats: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write statistics keyed by dataset as json (indent 2, OpenVLA's layout); returns the file.

    ``path`` is the file to write, or an existing directory to write ``dataset_statistics.json``
    into. numpy arrays and scalars are written as lists and python numbers.
    """
    _check_stats(stats)
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(stats, f, indent=2, default=_to_json)
    return path


def resolve_unnorm_key(stats: Mapping[str, Any], key: str | None = None) -> str:
    """The dataset key to use: ``key``, or the only key when ``key`` is None.

    OpenVLA's ``_check_unnorm_key`` (it asserts; this raises ValueError with the valid keys).
    """
    keys = list(stats)
    if key is None:
        if len(keys) != 1:
            raise ValueError(
                f"the statistics hold {len(keys)} datasets, so unnorm_key must name one of {keys}"
            )
        return keys[0]
    if key not in stats:
        raise ValueError(f"unnorm_key={key!r} is not in the statistics; valid keys: {keys}")
    return key


def action_stats(stats: Mapping[str, Any], key: str | None = None) -> Mapping[str, Any]:
    """``stats[key]["action"]`` with the key resolved as ``resolve_unnorm_key`` does.

    OpenVLA's ``get_action_stats``; ``len(action_stats(...)["q01"])`` is the action dimension.
    """
    return stats[resolve_unnorm_key(stats, key)]["action"]


def unnormalize(actions: np.ndarray, stats: Mapping[str, Any], key: str | None = None) -> np.ndarray:
    """Actions in dataset units from normalised actions [..., D] (OpenVLA's ``predict_action``).

    Masked dims (``mask`` True, the default for all dims) map [-1, 1] linearly onto
    [q01, q99]; unmasked dims (e.g. an absolute gripper command) pass through unchanged.
    Values outside [-1, 1] extrapolate; bin centres never leave it.
    """
    a = np.asarray(actions)
    resolved = resolve_unnorm_key(stats, key)
    low, high, mask = _bounds(action_stats(stats, resolved), a.shape, resolved)
    # OpenVLA predict_action: np.where(mask, 0.5 * (a + 1) * (q99 - q01) + q01, a).
    return np.where(mask, 0.5 * (a + 1) * (high - low) + low, a)


def normalize(actions: np.ndarray, stats: Mapping[str, Any], key: str | None = None) -> np.ndarray:
    """Normalised actions [..., D] from actions in dataset units: the inverse of ``unnormalize``.

    OpenVLA's training-time BOUNDS_Q99 normalisation: masked dims become
    ``2 * (x - q01) / (q99 - q01 + 1e-8) - 1`` *clipped to [-1, 1]* (so values outside
    [q01, q99] saturate and only values inside round-trip), unmasked dims pass through, and
    dims the data never moved (``min == max``, when min/max are present) become 0.
    """
    a = np.asarray(actions)
    resolved = resolve_unnorm_key(stats, key)
    entry = action_stats(stats, resolved)
    low, high, mask = _bounds(entry, a.shape, resolved)
    out = np.where(mask, np.clip(2 * (a - low) / (high - low + _NORM_EPS) - 1, -1, 1), a)
    if "min" in entry and "max" in entry:
        # OpenVLA data_utils: "Map unused action dimensions (i.e., dimensions where min == max) to all 0s."
        out = np.where(np.asarray(entry["min"]) == np.asarray(entry["max"]), 0.0, out)
    return out


def _bounds(entry: Mapping[str, Any], shape: tuple[int, ...], key: str) -> tuple[np.ndarray, ...]:
    """q01, q99 and mask (default all True, as OpenVLA) checked against the action dim."""
    low, high = np.asarray(entry["q01"], dtype=np.float64), np.asarray(entry["q99"], dtype=np.float64)
    mask = np.asarray(entry.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    if not shape or shape[-1] != low.shape[0]:
        got = shape[-1] if shape else "no"
        raise ValueError(
            f"actions of shape {tuple(shape)} have {got} action dims but stats[{key!r}]['action'] "
            f"has {low.shape[0]} (len of q01); pass [..., {low.shape[0]}] actions or another unnorm_key"
        )
    if high.shape != low.shape or mask.shape != low.shape:
        raise ValueError(
            f"stats[{key!r}]['action'] has q01 of length {low.shape[0]}, q99 of length "
            f"{high.shape[0]} and mask of length {mask.shape[0]}; they must be equal"
        )
    return low, high, mask


def _check_stats(stats: Mapping[str, Any]) -> None:
    if not isinstance(stats, Mapping) or not stats:
        raise ValueError("statistics must be a non-empty dict {unnorm_key: {'action': {...}, ...}}")
    if "action" in stats and isinstance(stats["action"], Mapping) and "q01" in stats["action"]:
        raise ValueError(
            "these statistics are one dataset's entry, not keyed by dataset; "
            "wrap them as {unnorm_key: entry}"
        )
    for key, entry in stats.items():
        action = entry.get("action") if isinstance(entry, Mapping) else None
        if not isinstance(action, Mapping) or not {"q01", "q99"} <= set(action):
            raise ValueError(f"stats[{key!r}] needs an 'action' dict with 'q01' and 'q99' lists")


def _to_json(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
