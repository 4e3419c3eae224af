"""The robot's side of the policy server's websocket protocol: ``PolicyClient``.

The same protocol ``openpi_client.WebsocketClientPolicy`` speaks (``rlplat/serve/app.py``): on
connect the server sends a msgpack metadata frame (action dim / horizon, bounds, control rate,
the hash of the normalisation statistics, the observation keys it expects); each observation
frame is answered with ``{"actions": float32 [H, D], "server_timing": {...}}``, or with a text
frame naming the problem.

Unlike openpi's client this one never blocks forever: connecting and each reply have timeouts,
a dropped connection is re-opened on the next call, and a server that comes back with another
model (different action shape or normalisation statistics) is refused (``ModelChanged``), so a
robot never executes actions meant for another robot.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from rlplat.serve import codec

#: Metadata fields that must not change when the client reconnects.
IDENTITY_KEYS = ("model_id", "action_dim", "action_horizon", "norm_stats_hash", "schema_version")


class ServerError(RuntimeError):
    """The server answered a request with an error frame (the text says why)."""


class ServerUnavailable(ConnectionError):
    """The server cannot be reached, refused the key, or dropped the connection."""


class ModelChanged(RuntimeError):
    """The server came back serving another model than the one this run started with."""


class PolicyClient:
    """A reconnecting websocket client of ``rlplat-serve`` (module docstring).

    Args:
        url: ``ws://host:port`` (or ``wss://``).
        api_key: sent as ``Authorization: Api-Key <key>`` when set.
        connect_timeout: seconds to open the connection and read the metadata frame.
        request_timeout: seconds to wait for one reply; then the connection is dropped (the reply
            of a stalled server is never matched to a later request) and re-opened next call.
        max_message_bytes: largest reply accepted.
    """

    def __init__(self, url: str, *, api_key: str | None = None, connect_timeout: float = 5.0,
                 request_timeout: float = 5.0, max_message_bytes: int = 16 * 2**20) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"server={url!r}: give the server's websocket address, ws://HOST:PORT")
        self.url = url
        self.api_key = api_key
        self.connect_timeout = float(connect_timeout)
        self.request_timeout = float(request_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.metadata: dict[str, Any] | None = None
        self.connects = 0
        self.last_timing: dict[str, float] = {}
        self._ws: ClientConnection | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ connection
    def connect(self) -> dict[str, Any]:
        """Opens the connection (if closed) and returns the server's metadata."""
        with self._lock:
            return self._connect()

    def _connect(self) -> dict[str, Any]:
        if self._ws is not None:
            return self.metadata
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        try:
            ws = connect(self.url, additional_headers=headers, open_timeout=self.connect_timeout,
                         max_size=self.max_message_bytes, compression=None, proxy=None, ping_interval=None)
        except InvalidStatus as err:
            status = err.response.status_code
            hint = " (missing or wrong API key: pass api_key= or set RLPLAT_API_KEY)" if status in (401, 403) else ""
            raise ServerUnavailable(f"{self.url} refused the connection: HTTP {status}{hint}") from None
        except (OSError, TimeoutError, WebSocketException) as err:
            raise ServerUnavailable(f"cannot reach {self.url}: {type(err).__name__}: {err}") from None
        try:
            first = ws.recv(timeout=self.connect_timeout)
        except (TimeoutError, WebSocketException, OSError) as err:
            ws.close()
            raise ServerUnavailable(f"{self.url} sent no metadata frame ({type(err).__name__})") from None
        if isinstance(first, str):
            ws.close()
            raise ServerUnavailable(f"{self.url} answered the connection with an error: {first}")
        metadata = codec.unpackb(first)
        if not isinstance(metadata, dict) or "action_dim" not in metadata:
            ws.close()
            raise ServerUnavailable(f"{self.url} is not an rlplat policy server (its first frame has no action_dim)")
        if self.metadata is not None:
            changed = [k for k in IDENTITY_KEYS if metadata.get(k) != self.metadata.get(k)]
            if changed:
                ws.close()
                raise ModelChanged(f"the server at {self.url} came back with another model (changed: "
                                   f"{', '.join(changed)}); restart the deployment to accept it")
        self.metadata = metadata
        self._ws = ws
        self.connects += 1
        return metadata

    def close(self) -> None:
        """Closes the connection (the next ``infer`` opens a new one)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):  # closing a broken socket may fail in many ways; it is gone either way
                self._ws.close()
            self._ws = None

    # ------------------------------------------------------------------ requests
    def infer(self, observation: Mapping[str, Any]) -> np.ndarray:
        """Actions float32 [H, D] for one observation (client keys, unbatched).

        Raises:
            ServerUnavailable: not reachable, or no reply within ``request_timeout`` (the
                connection is then dropped; the next call reconnects).
            ServerError: the server refused this observation (the connection stays open).
            ModelChanged: on reconnect, another model answered.
        """
        with self._lock:
            self._connect()
            start = time.perf_counter()
            try:
                self._ws.send(codec.packb(dict(observation)))
                reply = self._ws.recv(timeout=self.request_timeout)
            except TimeoutError:
                self._drop()
                raise ServerUnavailable(f"no reply from {self.url} within {self.request_timeout} s "
                                        f"(request_timeout)") from None
            except (WebSocketException, OSError) as err:
                self._drop()
                raise ServerUnavailable(f"the connection to {self.url} was lost: {type(err).__name__}: {err}") from None
            if isinstance(reply, str):
                raise ServerError(reply)
            message = codec.unpackb(reply)
            actions = np.asarray(message["actions"], np.float32)
            self.last_timing = {**message.get("server_timing", {}), "round_trip_ms": (time.perf_counter() - start) * 1e3}
        horizon, dim = int(self.metadata["action_horizon"]), int(self.metadata["action_dim"])
        if actions.shape != (horizon, dim):
            raise ServerError(f"the server sent actions of shape {list(actions.shape)}; its metadata announced "
                              f"[{horizon}, {dim}]")
        return actions


def wire_observation(observation: Mapping[str, Any], expected: Mapping[str, Mapping[str, Any]],
                     rename: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The message for one robot observation: every key the server expects, under its client name.

    ``expected`` is the metadata frame's ``observation`` (client key -> ``{"policy_key", ...}``);
    a robot may name a value by the client key (``observation/image``), by the policy key
    (``image``), or by any name mapped with ``rename`` (client key -> robot key).

    Raises:
        KeyError: naming the key the robot does not provide and the names that were tried.
    """
    rename = dict(rename or {})
    message = {}
    for client_key, spec in expected.items():
        names = [rename[client_key]] if client_key in rename else [client_key, spec.get("policy_key", client_key)]
        name = next((n for n in names if n in observation), None)
        if name is None:
            raise KeyError(f"the server needs {client_key!r} but the robot's observation has none of {names} "
                           f"(it has {sorted(observation)}); map it with observation_keys.{client_key}=<robot key>")
        value = observation[name]
        message[client_key] = value if isinstance(value, str) else np.asarray(value)
    return message
