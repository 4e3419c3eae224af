"""The policy server: one port, three doors.

- ``ws://host:port/``: websocket + msgpack-numpy, as ``openpi_client.WebsocketClientPolicy``
  speaks it: the server sends a metadata frame first, then answers each observation frame with
  ``{"actions": float32 [H, D], "server_timing": {...}}``. A request it cannot serve is answered
  with a text frame naming the problem (openpi-client raises it as the server's error) and the
  connection stays open for the next request.
- ``POST /act``: OpenVLA ``deploy.py``'s REST call (json-numpy ``{"image", "instruction",
  "unnorm_key"}`` -> the action, also with ``{"encoded": ...}`` double encoding).
- ``GET /healthz`` (no key needed, tells nothing about the model) and ``GET /metadata``.

With an API key set, the websocket handshake and every call but ``/healthz`` need
``Authorization: Api-Key <key>`` (or ``Bearer <key>``), compared in constant time; anything else is
refused with HTTP 401 before any frame is read. Messages over ``max_message_bytes`` are refused.
Concurrent requests share forward passes (``rlplat.serve.batcher``).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Self

import json_numpy
import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.websockets import WebSocketDisconnect

from rlplat.serve import codec
from rlplat.serve.batcher import Batcher
from rlplat.serve.config import SCHEMA_VERSION
from rlplat.serve.inputs import ObservationAdapter, RequestError, stack
from rlplat.serve.loading import ServedPolicy

log = logging.getLogger(__name__)
#: What REST clients (OpenVLA deploy.py) call the policy keys.
REST_ALIASES = {"image": "image", "instruction": "instruction", "state": "state", "proprio": "proprio",
                "wrist_image": "wrist_image"}


class PolicyApp:
    """The ASGI app around one served policy (see the module docstring).

    Args:
        served: the loaded policy.
        api_key: the key clients must send (None: none needed).
        client_keys: policy observation key -> client key.
        deterministic: greedy actions.
        max_message_bytes: largest websocket message / REST body accepted.
        max_batch, wait_ms: batching of concurrent requests.
    """

    def __init__(self, served: ServedPolicy, *, api_key: str | None, client_keys: Mapping[str, str],
                 deterministic: bool = True, max_message_bytes: int = 4 * 2**20, max_batch: int = 8,
                 wait_ms: float = 2.0) -> None:
        self.served = served
        self.api_key = api_key
        self.deterministic = bool(deterministic)
        self.max_message_bytes = int(max_message_bytes)
        self.adapter = ObservationAdapter(served.inputs, client_keys)
        self.batcher = Batcher(self._forward, max_batch=max_batch, wait_s=wait_ms / 1e3)
        self.clients = 0
        self.metadata = self._metadata(max_batch)
        self._metadata_frame = codec.packb(self.metadata)
        self.app = FastAPI(title="rlplat policy server", lifespan=self._lifespan, docs_url=None, redoc_url=None,
                           openapi_url=None)
        self.app.add_api_websocket_route("/", self._websocket)
        self.app.add_api_route("/act", self._act, methods=["POST"])
        self.app.add_api_route("/healthz", self._healthz, methods=["GET"])
        self.app.add_api_route("/metadata", self._metadata_route, methods=["GET"])

    # ------------------------------------------------------------------ the model
    def _forward(self, observations: list[dict[str, Any]]) -> np.ndarray:
        return self.served.act(stack(observations), deterministic=self.deterministic)

    def _metadata(self, max_batch: int) -> dict[str, Any]:
        s = self.served
        return {
            "schema_version": SCHEMA_VERSION,
            "model_id": s.model_id,
            "policy": s.extra.get("policy"),
            "action_dim": s.action_dim,
            "action_horizon": s.action_horizon,
            "control_hz": s.control_hz,
            "action_low": s.action_low,
            "action_high": s.action_high,
            "norm_stats_hash": s.stats_hash,
            "unnorm_key": s.unnorm_key,
            "observation": self.adapter.describe(),
            "deterministic": self.deterministic,
            "max_batch": max_batch,
            "max_message_bytes": self.max_message_bytes,
        }

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.stop()

    # ------------------------------------------------------------------ security
    def authorized(self, headers: Mapping[str, str]) -> bool:
        """Whether the request carries the API key (always, when none is set)."""
        if self.api_key is None:
            return True
        scheme, _, given = str(headers.get("authorization", "")).strip().partition(" ")
        if scheme.lower() not in ("api-key", "bearer"):
            return False
        return hmac.compare_digest(given.strip().encode(), self.api_key.encode())

    _REFUSED = "missing or wrong API key: send the header 'Authorization: Api-Key <key>'"

    # ------------------------------------------------------------------ websocket
    async def _websocket(self, websocket: WebSocket) -> None:
        if not self.authorized(websocket.headers):
            try:
                await websocket.send_denial_response(PlainTextResponse(self._REFUSED, status_code=401))
            except RuntimeError:  # a server without the denial extension answers HTTP 403
                await websocket.close(code=1008)
            return
        await websocket.accept()
        self.clients += 1
        try:
            await websocket.send_bytes(self._metadata_frame)
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                reply = await self._answer(message)
                if isinstance(reply, str):
                    await websocket.send_text(reply)
                else:
                    await websocket.send_bytes(reply)
        except (WebSocketDisconnect, OSError):  # the client left (uvicorn's ClientDisconnected is an OSError)
            return
        finally:
            self.clients -= 1

    async def _answer(self, message: Mapping[str, Any]) -> bytes | str:
        """The reply frame to one websocket message: msgpack bytes, or an error text."""
        start = time.perf_counter()
        data = message.get("bytes")
        if data is None:
            return ("error: expected a binary msgpack frame (an observation dict packed with "
                    "openpi_client.msgpack_numpy), got a text frame")
        try:
            obs = self.adapter.convert(codec.unpackb(data))
            decoded = time.perf_counter()
            actions, timing = await self.batcher.submit(obs)
        except (codec.DecodeError, RequestError) as err:
            return f"error: {err}"
        except Exception as err:  # the policy failed: this client hears why, the others go on
            log.exception("forward pass failed")
            return f"error: the policy failed on this observation: {type(err).__name__}: {err}"
        timing = {**timing, "decode_ms": (decoded - start) * 1e3, "total_ms": (time.perf_counter() - start) * 1e3}
        return codec.packb({"actions": np.asarray(actions, np.float32), "server_timing": timing})

    # ------------------------------------------------------------------ REST
    async def _act(self, request: Request) -> Response:
        if not self.authorized(request.headers):
            return JSONResponse({"error": self._REFUSED}, status_code=401)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_message_bytes:
                return JSONResponse({"error": f"the request body exceeds the limit of {self.max_message_bytes} "
                                              f"bytes (max_message_bytes)"}, status_code=413)
        try:
            payload = json_numpy.loads(bytes(body))
            double_encoded = isinstance(payload, dict) and "encoded" in payload
            if double_encoded:
                payload = json_numpy.loads(payload["encoded"])
        except (ValueError, TypeError) as err:
            return JSONResponse({"error": f"the body is not json-numpy JSON ({err})"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"error": "the body must be a JSON object with image and instruction"}, status_code=400)
        unnorm_key = payload.get("unnorm_key")
        if unnorm_key is not None and unnorm_key != self.served.unnorm_key:
            return JSONResponse({"error": f"unnorm_key={unnorm_key!r}: this server unnormalises with "
                                          f"{self.served.unnorm_key!r}; omit unnorm_key or pass that one"},
                                status_code=400)
        try:
            obs = self.adapter.convert(payload, aliases=REST_ALIASES)
            actions, _ = await self.batcher.submit(obs)
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except Exception as err:
            log.exception("forward pass failed")
            return JSONResponse({"error": f"the policy failed: {type(err).__name__}: {err}"}, status_code=500)
        # deploy.py answers one action [D] (a chunk [H, D] for chunking policies).
        action = np.asarray(actions[0] if self.served.action_horizon == 1 else actions, np.float32)
        text = json_numpy.dumps(action)
        return Response(json.dumps(text) if double_encoded else text, media_type="application/json")

    async def _healthz(self) -> dict[str, Any]:
        return {"status": "ok", "clients": self.clients, "forward_passes": self.batcher.forward_passes,
                "served": self.batcher.served}

    async def _metadata_route(self, request: Request) -> Response:
        if not self.authorized(request.headers):
            return JSONResponse({"error": self._REFUSED}, status_code=401)
        return JSONResponse(self.metadata)


class PolicyServer:
    """Binds the socket and runs the app under uvicorn, in the foreground or in a thread.

    Args:
        app: the PolicyApp to serve.
        host, port: where to listen (port 0: a free port; ``port`` then tells which).
    """

    def __init__(self, app: PolicyApp, host: str, port: int) -> None:
        import uvicorn

        self.policy_app = app
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as err:
            self._socket.close()
            raise OSError(f"cannot listen on {host}:{port} ({err.strerror}): pass another port=N (port=0 picks "
                          f"a free one) or host=") from None
        self.port = self._socket.getsockname()[1]
        # Listening now, so clients that connect before uvicorn's loop runs wait in the backlog.
        self._socket.listen(128)
        config = uvicorn.Config(app.app, ws_max_size=app.max_message_bytes, ws="websockets-sansio",
                                log_level="warning", lifespan="on", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The websocket address clients connect to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serves until SIGINT / SIGTERM."""
        self._server.run(sockets=[self._socket])

    def start(self, timeout: float = 30.0) -> Self:
        """Serves in a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="rlplat-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the policy server did not start (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stops a server started with ``start``."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_server(served: ServedPolicy, cfg: Any, api_key: str | None) -> PolicyServer:
    """The server a checked serve config describes, bound (not yet serving)."""
    from rlplat.serve.config import to_plain

    app = PolicyApp(served, api_key=api_key, client_keys=to_plain(cfg.client_keys), deterministic=cfg.deterministic,
                    max_message_bytes=cfg.max_message_bytes, max_batch=cfg.batching.max_batch,
                    wait_ms=cfg.batching.wait_ms)
    return PolicyServer(app, str(cfg.host), int(cfg.port))


