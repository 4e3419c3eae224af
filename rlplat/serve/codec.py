"""msgpack with numpy arrays, in the wire format openpi-client speaks (no pickle, ever).

An array travels as the map ``{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": <dtype.str>,
b"shape": [...]}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": <item>, b"dtype": ...}``,
which is what ``openpi_client.msgpack_numpy`` packs and unpacks. Only plain numeric, bool and
fixed-width string dtypes are accepted: object, void and complex dtypes are refused on both sides,
and a decoded array must hold exactly ``prod(shape) * itemsize`` bytes.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

#: dtype kinds that may cross the wire: bool, signed/unsigned int, float, bytes, unicode.
ALLOWED_KINDS = frozenset("biufSU")


class DecodeError(ValueError):
    """A frame that is not a valid msgpack-numpy message; the message says what is wrong."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind not in ALLOWED_KINDS:
        raise TypeError(f"cannot send an array of dtype {obj.dtype} (only numeric, bool and string arrays)")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            shape = tuple(int(s) for s in obj[b"shape"])
            data = obj[b"data"]
        except (KeyError, TypeError, ValueError) as err:
            raise DecodeError(f"an array in the frame is malformed ({err}); pack arrays with "
                              f"openpi_client.msgpack_numpy") from None
        if dtype.kind not in ALLOWED_KINDS:
            raise DecodeError(f"arrays of dtype {dtype} are not accepted (only numeric, bool and string arrays)")
        if any(s < 0 for s in shape) or not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
            raise DecodeError(f"an array in the frame declares shape {shape} and dtype {dtype} "
                              f"but carries {len(data) if isinstance(data, bytes) else 'no'} bytes")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
        except (KeyError, TypeError) as err:
            raise DecodeError(f"a scalar in the frame is malformed ({err})") from None
        if dtype.kind not in ALLOWED_KINDS:
            raise DecodeError(f"scalars of dtype {dtype} are not accepted")
        return dtype.type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (dicts, lists, str, numbers, numpy arrays and scalars)."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """The object in a msgpack-numpy frame; raises ``DecodeError`` naming what is wrong."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except DecodeError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as err:
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise DecodeError(f"the frame is not msgpack ({detail}); send observation dicts packed with "
                          f"openpi_client.msgpack_numpy") from None
