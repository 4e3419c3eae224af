"""OpenVLA policy family.

The action tokenizer and normalisation import with numpy only (robot-side code needs nothing
more); the model, processor and checkpoint mapping pull in transformers and load lazily on
first attribute access.
"""

from importlib import import_module
from typing import Any

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

# Name -> submodule, imported on first use (transformers takes seconds to import).
_LAZY = {
    "OpenVLAConfig": "modeling",
    "OpenVLAForActionPrediction": "modeling",
    "build_tiny_openvla": "modeling",
    "load_openvla": "modeling",
    "OpenVLAProcessor": "processor",
    "ProcessorConfig": "processor",
    "build_prompt": "processor",
    "build_tiny_tokenizer": "processor",
    "processor_config_for": "processor",
    "map_openvla_state_dict": "checkpoint_mapping",
    "load_openvla_checkpoint": "checkpoint_mapping",
    "OpenVLAPolicy": "policy",
    "load": "policy",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    *_LAZY,
]
