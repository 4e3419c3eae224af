"""Policy server: serves a trained policy to robots (issue 20, first slice).

    python -m rlplat.serve checkpoint=outputs/quickstart/<date>_<time>       # newest intact checkpoint
    python -m rlplat.serve policy=openvla_tiny                               # untrained, for smoke tests
    RLPLAT_API_KEY=... python -m rlplat.serve checkpoint=... host=0.0.0.0 port=8000

Websocket + msgpack-numpy as openpi-client speaks it, REST ``POST /act`` as OpenVLA's
``deploy.py`` clients call it, ``GET /healthz``. Importing this package loads no model code.
"""
