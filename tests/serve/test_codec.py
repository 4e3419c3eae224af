"""The msgpack-numpy codec speaks openpi-client's format and refuses what is not plain data."""

from __future__ import annotations

from tests.serve.helpers import require_serve_packages

require_serve_packages()

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy

from rlplat.serve import codec


def test_arrays_round_trip_with_openpi_client_both_ways():
    message = {"observation/image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
               "observation/state": np.array([0.5, -1.25], np.float32), "prompt": "reach", "step": np.int64(3)}
    decoded = codec.unpackb(msgpack_numpy.packb(message))
    assert decoded["prompt"] == "reach" and decoded["step"] == 3 and decoded["step"].dtype == np.int64
    np.testing.assert_array_equal(decoded["observation/image"], message["observation/image"])
    assert decoded["observation/state"].dtype == np.float32
    reply = msgpack_numpy.unpackb(codec.packb({"actions": np.ones((1, 7), np.float32), "server_timing": {"a": 1.0}}))
    assert reply["actions"].shape == (1, 7) and reply["actions"].dtype == np.float32


def test_object_arrays_and_lying_shapes_are_refused():
    with pytest.raises(TypeError, match="dtype object"):
        codec.packb({"x": np.array([{}], dtype=object)})
    object_array = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]})
    with pytest.raises(codec.DecodeError, match="dtype object"):
        codec.unpackb(object_array)
    short = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [2]})
    with pytest.raises(codec.DecodeError, match=r"shape \(2,\).*carries 3 bytes"):
        codec.unpackb(short)
    with pytest.raises(codec.DecodeError, match="not msgpack"):
        codec.unpackb(b"\xc1 not msgpack")
