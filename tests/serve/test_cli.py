"""``python -m rlplat.serve``: the config is checked before anything loads, with messages that
name the key and the fix; the real entry point serves an openpi client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.serve.helpers import require_serve_packages

require_serve_packages()

from openpi_client.websocket_client_policy import WebsocketClientPolicy

from rlplat.serve.cli import main
from rlplat.serve.config import ServeConfigError, check, compose


@pytest.mark.parametrize("overrides, message", [
    (["policy=openvla_tiny", "host=0.0.0.0"], ("host=0.0.0.0 accepts connections from other machines, which needs "
                                                "an API key: set api_key=<secret> or export RLPLAT_API_KEY=<secret>")),
    (["policy=openvla_tny"], "did you mean policy=openvla_tiny?"),
    (["policy=openvla_tiny", "batching.max_batch=0"], "batching.max_batch=0 must be >= 1"),
    (["policy=openvla_tiny", "port=70000"], "port=70000 must be <= 65535"),
    (["policy=openvla_tiny", "+batching.wait=3"], "did you mean batching.wait_ms?"),
    ([], "nothing to serve: set checkpoint=PATH"),
    (["policy=openvla_7b"], "is not a local model folder: download the weights once"),
])
def test_a_bad_config_stops_before_anything_loads(overrides, message, monkeypatch, capsys):
    monkeypatch.delenv("RLPLAT_API_KEY", raising=False)
    monkeypatch.delenv("OPENVLA_7B_PATH", raising=False)
    started = time.perf_counter()
    assert main(overrides) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - started < 30  # no model was built (that takes longer on a busy CPU)


def test_the_key_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RLPLAT_API_KEY", "from-the-environment")
    check(compose(["policy=openvla_tiny", "host=0.0.0.0"]))
    monkeypatch.setenv("RLPLAT_API_KEY", "short")
    with pytest.raises(ServeConfigError, match="has 5 characters; use at least 8"):
        check(compose(["policy=openvla_tiny", "host=0.0.0.0"]))


def test_python_m_rlplat_serve_serves_until_interrupted():
    process = subprocess.Popen([sys.executable, "-m", "rlplat.serve", "policy=openvla_tiny", "port=0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RLPLAT_API_KEY": ""})
    try:
        line = process.stdout.readline()
        assert line.startswith("serving untrained OpenVLAPolicy"), line + process.stdout.read()
        port = int(line.split(" on ws://127.0.0.1:")[1].split()[0])
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        image = np.zeros((32, 32, 3), np.uint8)
        assert client.infer({"observation/image": image, "prompt": "reach"})["actions"].shape == (1, 2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
