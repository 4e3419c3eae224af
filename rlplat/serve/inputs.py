"""Client observations -> policy observations: key mapping, checks and image resizing.

A client sends one observation per request (openpi's layout: ``observation/image`` uint8
[H, W, 3], ``observation/state`` float [S], ``prompt`` str). Each key the policy reads is looked
up under its client name (``client_keys``), checked (dtype, shape), and images of any size are
resized to the size the policy was trained on. Problems raise ``RequestError`` naming the
client's key, what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from PIL import Image

from rlplat.serve.loading import IMAGE_KEYS

#: Longest instruction accepted, in characters.
MAX_INSTRUCTION_CHARS = 2000


class RequestError(ValueError):
    """An observation the server cannot act on; the message names the key and the fix."""


class ObservationAdapter:
    """Checks and converts one client observation into the policy's keys.

    Args:
        inputs: policy observation key -> its single (unbatched) space, for the keys the policy reads.
        client_keys: policy observation key -> the client's key for it.
    """

    def __init__(self, inputs: Mapping[str, gym.Space], client_keys: Mapping[str, str]) -> None:
        self.inputs = dict(inputs)
        self.client_keys = {k: str(client_keys.get(k, k)) for k in self.inputs}

    def describe(self) -> dict[str, Any]:
        """What each expected client key must hold (for the metadata frame)."""
        out = {}
        for key, space in self.inputs.items():
            if isinstance(space, gym.spaces.Text):
                out[self.client_keys[key]] = {"policy_key": key, "type": "str"}
            else:
                out[self.client_keys[key]] = {"policy_key": key, "dtype": str(space.dtype), "shape": list(space.shape),
                                              **({"resized": True} if key in IMAGE_KEYS else {})}
        return out

    def convert(self, message: Any, aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One policy observation (unbatched) from a client message; raises ``RequestError``.

        ``aliases``: extra client names accepted per policy key (REST clients send ``image`` and
        ``instruction``).
        """
        if not isinstance(message, Mapping):
            raise RequestError(f"expected a map of observation keys, got {type(message).__name__}; send a dict "
                               f"with {sorted(self.client_keys.values())}")
        obs = {}
        for key, space in self.inputs.items():
            names = [self.client_keys[key], *([aliases[key]] if aliases and key in aliases else [])]
            name = next((n for n in names if n in message), None)
            if name is None:
                raise RequestError(f"missing key {names[0]!r} (the policy's {key}); send it, or map another key "
                                   f"with client_keys.{key}=<your key> when starting the server")
            value = message[name]
            if isinstance(space, gym.spaces.Text):
                obs[key] = _text(name, value)
            elif key in IMAGE_KEYS:
                obs[key] = _image(name, value, space.shape)
            else:
                obs[key] = _vector(name, value, space)
        return obs


def stack(observations: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """A batch (leading dim B) of converted observations; instructions as an object array."""
    batch = {}
    for key in observations[0]:
        values = [o[key] for o in observations]
        batch[key] = np.array(values, dtype=object) if isinstance(values[0], str) else np.stack(values)
    return batch


def _text(name: str, value: Any) -> str:
    if isinstance(value, np.ndarray) and value.dtype.kind in "US" and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise RequestError(f"{name!r} must be UTF-8 text") from None
    if not isinstance(value, str):
        raise RequestError(f"{name!r} must be a string (the instruction), got {type(value).__name__}")
    if len(value) > MAX_INSTRUCTION_CHARS:
        raise RequestError(f"{name!r} has {len(value)} characters; the limit is {MAX_INSTRUCTION_CHARS}")
    return value


def _image(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{name!r} must be a uint8 array [H, W, 3], got {type(value).__name__}")
    if value.ndim == 4 and value.shape[0] == 1:
        value = value[0]
    if value.dtype != np.uint8:
        raise RequestError(f"{name!r} must be uint8 (0..255) [H, W, 3], got dtype {value.dtype}; convert with "
                           f"openpi_client.image_tools.convert_to_uint8")
    if value.ndim != 3 or value.shape[-1] != 3 or min(value.shape[:2]) < 1:
        hint = " (channels first? send [H, W, 3])" if value.ndim == 3 and value.shape[0] == 3 else ""
        raise RequestError(f"{name!r} must have shape [H, W, 3], got {list(value.shape)}{hint}")
    height, width = int(shape[0]), int(shape[1])
    if value.shape[:2] != (height, width):
        value = np.asarray(Image.fromarray(np.ascontiguousarray(value)).resize((width, height), Image.BILINEAR))
    return np.ascontiguousarray(value)


def _vector(name: str, value: Any, space: gym.Space) -> np.ndarray:
    array = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if array is None or array.dtype.kind not in "biuf":
        raise RequestError(f"{name!r} must be a numeric array of shape {list(space.shape)}, got "
                           f"{type(value).__name__}{f' of dtype {array.dtype}' if array is not None else ''}")
    want = tuple(space.shape)
    if array.shape != want and array.shape == (1, *want):
        array = array[0]
    if array.shape != want:
        raise RequestError(f"{name!r} must have shape {list(want)}, got {list(array.shape)}")
    array = array.astype(space.dtype if space.dtype is not None else np.float32)
    if not np.isfinite(array).all():
        raise RequestError(f"{name!r} holds NaN or infinite values")
    return array
