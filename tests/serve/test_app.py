"""The policy server as clients see it: openpi-client over websocket, OpenVLA deploy.py's REST
call, the API key, malformed frames, and batching of concurrent clients."""

from __future__ import annotations

import json
import re
import threading

from tests.serve.helpers import require_serve_packages

require_serve_packages()

import httpx
import json_numpy
import msgpack
import numpy as np
import pytest
import websockets.exceptions
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from tests.serve.helpers import camera, in_process

PROMPT = "reach the blue square"
KEY = "correct-horse-battery"


def test_openpi_client_reads_metadata_and_gets_the_policys_actions(tiny_vla, start_server):
    server = start_server(tiny_vla)
    client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    meta = client.get_server_metadata()
    assert meta["schema_version"] == 1 and meta["action_dim"] == 2 and meta["action_horizon"] == 1
    assert meta["unnorm_key"] == tiny_vla.unnorm_key and len(meta["norm_stats_hash"]) == 64
    assert meta["observation"]["observation/image"]["shape"] == [32, 32, 3] and "prompt" in meta["observation"]
    images = [camera(0), camera(1)]
    for image in images:
        reply = client.infer({"observation/image": image, "prompt": PROMPT})
        assert reply["actions"].shape == (1, 2) and reply["actions"].dtype == np.float32
        np.testing.assert_array_equal(reply["actions"][0], in_process(tiny_vla, [image], [PROMPT])[0])
        assert reply["server_timing"]["batch_size"] == 1 and reply["server_timing"]["total_ms"] > 0
    # A camera of another size is resized to the policy's 32x32 on the server.
    reply = client.infer({"observation/image": camera(2, (96, 128)), "prompt": PROMPT})
    assert reply["actions"].shape == (1, 2)


def test_a_public_bind_serves_only_clients_with_the_key(tiny_vla, start_server):
    server = start_server(tiny_vla, host="0.0.0.0", api_key=KEY)
    for headers in (None, {"Authorization": "Api-Key wrong-key-12345"}, {"Authorization": KEY}):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(f"ws://127.0.0.1:{server.port}", additional_headers=headers)
        assert refused.value.response.status_code == 401
    with pytest.raises(websockets.exceptions.InvalidStatus):
        WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key="wrong-key-12345")
    client = WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key=KEY)
    assert client.infer({"observation/image": camera(0), "prompt": PROMPT})["actions"].shape == (1, 2)
    body = json_numpy.dumps({"image": camera(0), "instruction": PROMPT})
    assert httpx.post(f"http://127.0.0.1:{server.port}/act", content=body).status_code == 401
    ok = httpx.post(f"http://127.0.0.1:{server.port}/act", content=body, headers={"Authorization": f"Api-Key {KEY}"})
    assert ok.status_code == 200
    assert httpx.get(f"http://127.0.0.1:{server.port}/metadata").status_code == 401
    assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").json()["status"] == "ok"


def test_rest_act_answers_openvla_deploy_clients(tiny_vla, start_server):
    server = start_server(tiny_vla)
    url = f"http://127.0.0.1:{server.port}/act"
    image = camera(3)
    want = in_process(tiny_vla, [image], [PROMPT])[0]
    # deploy.py's client: json_numpy-encoded {"image", "instruction", "unnorm_key"} -> the action [D].
    plain = httpx.post(url, content=json_numpy.dumps({"image": image, "instruction": PROMPT,
                                                      "unnorm_key": tiny_vla.unnorm_key}))
    action = json_numpy.loads(plain.text)
    assert plain.status_code == 200 and action.shape == (2,) and action.dtype == np.float32
    np.testing.assert_array_equal(action, want)
    # Its double-encoded form: {"encoded": <json-numpy text>} -> a JSON string holding the action.
    double = httpx.post(url, json={"encoded": json_numpy.dumps({"image": image, "instruction": PROMPT})})
    np.testing.assert_array_equal(json_numpy.loads(json.loads(double.text)), want)
    wrong_key = httpx.post(url, content=json_numpy.dumps({"image": image, "instruction": PROMPT, "unnorm_key": "bridge"}))
    assert wrong_key.status_code == 400 and tiny_vla.unnorm_key in wrong_key.json()["error"]
    missing = httpx.post(url, content=json_numpy.dumps({"image": image}))
    assert missing.status_code == 400 and "'prompt'" in missing.json()["error"]


def test_malformed_frames_get_clear_errors_and_other_clients_are_served(tiny_vla, start_server):
    server = start_server(tiny_vla, max_message_bytes=64 * 1024)
    bad = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    good = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    cases = {
        b"\xc1 this is not msgpack": "not msgpack",
        msgpack_numpy.packb({"observation/image": camera(0)}): "missing key 'prompt'",
        msgpack_numpy.packb({"observation/image": camera(0).astype(np.float32), "prompt": PROMPT}):
            "'observation/image' must be uint8",
        msgpack_numpy.packb({"observation/image": camera(0)[..., 0], "prompt": PROMPT}):
            r"'observation/image' must have shape \[H, W, 3\], got \[32, 32\]",
        msgpack_numpy.packb({"observation/image": camera(0), "prompt": 7}): "'prompt' must be a string",
        msgpack.packb([1, 2, 3]): "expected a map of observation keys",
        msgpack.packb({"observation/image": {b"__ndarray__": True, b"data": b"xx", b"dtype": "|O", b"shape": [2]},
                       "prompt": PROMPT}): "dtype object",
        "a text frame": "expected a binary msgpack frame",
    }
    for frame, message in cases.items():
        bad._ws.send(frame)
        reply = bad._ws.recv()
        assert isinstance(reply, str), frame  # a text frame: openpi-client raises it as the server's error
        assert re.search(message, reply), (message, reply)
        # The client that sent it may go on; the other client is served meanwhile.
        assert good.infer({"observation/image": camera(1), "prompt": PROMPT})["actions"].shape == (1, 2)
    with pytest.raises(RuntimeError, match="Error in inference server"):
        bad.infer({"observation/image": camera(0)})
    assert bad.infer({"observation/image": camera(0), "prompt": PROMPT})["actions"].shape == (1, 2)
    # Oversize: the connection is closed with 1009 naming the limit; the others are unaffected.
    with pytest.raises(websockets.exceptions.ConnectionClosed, match="exceeds limit of 65536 bytes"):
        bad.infer({"observation/image": camera(0, (160, 160)), "prompt": PROMPT})
    assert good.infer({"observation/image": camera(1), "prompt": PROMPT})["actions"].shape == (1, 2)
    too_big = httpx.post(f"http://127.0.0.1:{server.port}/act", content=b"x" * (65 * 1024))
    assert too_big.status_code == 413 and "65536 bytes (max_message_bytes)" in too_big.json()["error"]


def test_concurrent_clients_share_forward_passes_with_unbatched_results(tiny_vla, start_server):
    n = 4
    server = start_server(tiny_vla, max_batch=8, wait_ms=300.0)
    clients = [WebsocketClientPolicy(host="127.0.0.1", port=server.port) for _ in range(n)]
    images = [camera(10 + i) for i in range(n)]
    # Prompts of different lengths: the batch is left-padded, which must not change any action.
    prompts = [PROMPT if i % 2 else "pick up the red cube on the left of the green bowl" for i in range(n)]
    barrier, replies = threading.Barrier(n), [None] * n

    def ask(i: int) -> None:
        barrier.wait()
        replies[i] = clients[i].infer({"observation/image": images[i], "prompt": prompts[i]})

    before = server.policy_app.batcher.forward_passes
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    passes = server.policy_app.batcher.forward_passes - before
    assert passes < n, f"{n} concurrent requests took {passes} forward passes"
    assert max(r["server_timing"]["batch_size"] for r in replies) > 1
    for i in range(n):  # each equals the policy acting on that observation alone
        np.testing.assert_array_equal(replies[i]["actions"][0], in_process(tiny_vla, [images[i]], [prompts[i]])[0])


class _Fragile:
    """A stand-in policy that acts [0.5, -0.5] but raises on the instruction 'explode'."""

    def eval(self):
        return self

    def act(self, obs, deterministic=True):
        import types

        import torch

        if "explode" in list(obs["instruction"]):
            raise ValueError("cannot act on 'explode'")
        return types.SimpleNamespace(actions=torch.tensor([[0.5, -0.5]] * len(obs["instruction"])))


def test_a_policy_error_reaches_only_its_client_while_others_are_served(tiny_vla, start_server):
    import dataclasses

    served = dataclasses.replace(tiny_vla, policy=_Fragile())
    server = start_server(served, max_batch=8, wait_ms=300.0)
    clients = [WebsocketClientPolicy(host="127.0.0.1", port=server.port) for _ in range(3)]
    prompts = [PROMPT, "explode", PROMPT]
    barrier, replies = threading.Barrier(3), [None] * 3

    def ask(i: int) -> None:
        barrier.wait()
        try:
            replies[i] = clients[i].infer({"observation/image": camera(i), "prompt": prompts[i]})
        except RuntimeError as err:
            replies[i] = err

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert "the policy failed on this observation: ValueError: cannot act on 'explode'" in str(replies[1])
    for i in (0, 2):
        np.testing.assert_array_equal(replies[i]["actions"], [[0.5, -0.5]])
    assert clients[1].infer({"observation/image": camera(1), "prompt": PROMPT})["actions"].shape == (1, 2)


def test_a_port_in_use_is_named(tiny_vla, start_server):
    from rlplat.serve.app import PolicyApp, PolicyServer

    server = start_server(tiny_vla)
    with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{server.port} .*pass another port=N"):
        PolicyServer(PolicyApp(tiny_vla, api_key=None, client_keys={}), "127.0.0.1", server.port)
