"""The config of ``rlplat-serve`` (``conf/serve.yaml``) and its one validation pass.

Composed with Hydra from the same config tree as ``rlplat-train`` (so ``policy=openvla_tiny`` and
``env=toy_camera`` name the same groups), checked against ``ServeConfig`` with the same schema and
range checks (``rlplat.validate.schema_errors``) before any model loads or any port is bound.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlplat.registry import checked

#: The environment variable read when ``api_key`` is not set.
API_KEY_ENV = "RLPLAT_API_KEY"
#: Version of the metadata frame and reply layout; bumped on any incompatible change.
SCHEMA_VERSION = 1


@dataclass
class BatchingConfig:
    """How requests that arrive together share one forward pass."""

    # Most observations in one forward pass (1: no batching).
    max_batch: int = checked(8, ge=1)
    # After the first request of a batch arrives, wait at most this long for others (0: take only
    # what is already queued).
    wait_ms: float = checked(2.0, ge=0)


@dataclass
class ServeConfig:
    """Top-level config of rlplat-serve."""

    # What to serve: a run dir (its newest intact checkpoint), a checkpoints/step_N folder, or an
    # export (a folder written by save_pretrained, e.g. policies/openvla/assets/toy_sft).
    checkpoint: str | None = None
    # Policy group (conf/policy): alone, an untrained policy for smoke tests (policy=openvla_tiny);
    # with an export checkpoint, the family and settings to load it with (policy=openvla_7b).
    policy: Any = None
    # Env group (conf/env) whose spaces (action dim, image size) the policy is built for, when
    # neither a run's config.yaml nor an export's config.json says; only its spaces are used.
    env: Any = None
    # Address to bind. Anything but a loopback address needs an API key.
    host: str = "127.0.0.1"
    # TCP port (0: a free one, printed at start).
    port: int = checked(8000, ge=0, le=65535)
    # API key clients send as "Authorization: Api-Key <key>" (null: $RLPLAT_API_KEY; none: no key,
    # allowed on loopback only).
    api_key: str | None = None
    # Greedy actions (the mode); false samples at the policy's temperature.
    deterministic: bool = True
    # Largest websocket message or REST body accepted, in bytes (larger ones are refused).
    max_message_bytes: int = checked(4 * 2**20, ge=1024)
    # Policy observation key -> key in the client's observation dict (openpi's names by default).
    # Images of any size are resized to the policy's; a key the policy does not read is ignored.
    client_keys: dict[str, str] = field(default_factory=lambda: {
        "image": "observation/image",
        "wrist_image": "observation/wrist_image",
        "state": "observation/state",
        "proprio": "observation/state",
        "instruction": "prompt",
    })
    # Control rate announced to clients in Hz (null: the env's, when it declares one).
    control_hz: float | None = checked(None, gt=0)
    # Name announced to clients (null: the checkpoint path, or the policy's class).
    model_id: str | None = None
    # Batching of concurrent requests.
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # Torch intra-op threads of the forward pass (null: torch's default).
    torch_threads: int | None = checked(None, ge=1)
    # Seed of an untrained policy's weights and of sampled actions.
    seed: int = 0


class ServeConfigError(ValueError):
    """A serve setting that cannot run; the message names the key and the fix."""


def register_serve_config() -> None:
    """Makes ``serve_schema`` (and the train tree's part schemas and resolvers) known to Hydra."""
    from hydra.core.config_store import ConfigStore

    from rlplat.config import register_configs

    register_configs()
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``rlplat-serve <overrides>`` runs with (for the CLI, tests and benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_serve_config()
    GlobalHydra.instance().clear()
    with initialize_config_module("rlplat.conf", version_base="1.3"):
        return hydra_compose("serve", overrides=list(overrides))


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def api_key_of(cfg: DictConfig) -> str | None:
    """The API key in force: ``api_key``, else ``$RLPLAT_API_KEY``, else None."""
    key = cfg.get("api_key") or os.environ.get(API_KEY_ENV) or None
    return None if key is None else str(key)


def check(cfg: DictConfig) -> None:
    """Every check that needs no model: keys and ranges, what to serve, security, weights on disk.

    Raises:
        ServeConfigError: naming the key and the fix (several problems at once when there are).
    """
    from rlplat import registry
    from rlplat.validate import schema_errors

    errors = schema_errors(cfg, ServeConfig, "")
    if cfg.get("checkpoint") is None and cfg.get("policy") is None:
        errors.append("nothing to serve: set checkpoint=PATH (a run dir, a checkpoints/step_N folder or an "
                      "export) or policy=NAME for an untrained policy (e.g. policy=openvla_tiny)")
    if not is_loopback(str(cfg.host)) and api_key_of(cfg) is None:
        errors.append(f"host={cfg.host} accepts connections from other machines, which needs an API key: set "
                      f"api_key=<secret> or export {API_KEY_ENV}=<secret> (clients send "
                      f"'Authorization: Api-Key <secret>'), or serve on host=127.0.0.1")
    key = api_key_of(cfg)
    if key is not None and len(key) < 8:
        errors.append(f"the API key (api_key= or ${API_KEY_ENV}) has {len(key)} characters; use at least 8")
    unknown = sorted(set(cfg.client_keys) - {"image", "wrist_image", "state", "proprio", "instruction"})
    if unknown:
        errors.append(f"client_keys.{unknown[0]} is not an observation key of rlplat policies: map image, "
                      f"wrist_image, state, proprio or instruction")
    if errors:
        raise ServeConfigError("\n  ".join(errors))
    if cfg.get("policy") is not None and cfg.get("checkpoint") is None:
        try:
            registry.preflight("policy", cfg.policy)
        except (ValueError, FileNotFoundError) as err:
            raise ServeConfigError(str(err)) from None


def to_plain(node: Any) -> Any:
    """Plain dicts and lists of a config node (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
