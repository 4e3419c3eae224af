"""OpenVLA policy family: action tokenizer and normalisation (numpy only; models load lazily)."""

from rlplat.policies.openvla.action_tokenizer import (
    STATS_FILENAME,
    ActionTokenizer,
    action_stats,
    compute_stats,
    load_stats,
    normalize,
    resolve_unnorm_key,
    save_stats,
    unnormalize,
)

__all__ = [
    "STATS_FILENAME",
    "ActionTokenizer",
    "action_stats",
    "compute_stats",
    "load_stats",
    "normalize",
    "resolve_unnorm_key",
    "save_stats",
    "unnormalize",
]
