"""``rlplat-serve`` / ``python -m rlplat.serve``: check the config, load the policy, serve it.

    rlplat-serve checkpoint=PATH [host=127.0.0.1] [port=8000] [api_key=... | $RLPLAT_API_KEY]
    rlplat-serve policy=openvla_tiny [env=toy_camera]       # an untrained policy (smoke tests)
    rlplat-serve checkpoint=EXPORT policy=openvla_7b         # a LoRA export on openvla-7b weights

Arguments are Hydra overrides of ``conf/serve.yaml`` (settings: ``rlplat.serve.config.ServeConfig``).
The config is checked before any model loads or port is bound; a problem stops the server with a
message naming the key and the fix (exit code 2).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlplat.serve.app import PolicyServer


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (see the module docstring); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        from omegaconf import OmegaConf

        from rlplat.serve import config

        print(__doc__)
        print("settings (defaults; comments in rlplat/serve/config.py):")
        print(OmegaConf.to_yaml(OmegaConf.structured(config.ServeConfig)), end="")
        return 0
    try:
        server = prepare(args)
    except (ValueError, OSError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    app = server.policy_app
    print(f"serving {app.served.model_id} ({app.served.extra.get('policy')}, actions [{app.served.action_horizon}, "
          f"{app.served.action_dim}]) on {server.url}  REST: http://{server.host}:{server.port}/act  "
          f"health: /healthz  key: {'required' if app.api_key else 'none (loopback only)'}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # uvicorn finishes open requests, then re-raises Ctrl-C
        pass
    print("server stopped", flush=True)
    return 0


def prepare(overrides: Sequence[str]) -> PolicyServer:
    """Composes and checks the config, loads the policy and binds the port (tests use it too).

    Raises:
        ValueError: a config problem (``ServeConfigError``, Hydra's errors), naming the key and the fix.
        OSError: the port cannot be bound.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlplat.options import check_group_choices
    from rlplat.serve import config
    from rlplat.train import offline_defaults

    offline_defaults()
    problem = check_group_choices(list(overrides))
    if problem is not None:
        raise config.ServeConfigError(problem)
    try:
        cfg = config.compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise config.ServeConfigError(str(err).strip()) from None
    config.check(cfg)
    from rlplat.serve.app import build_server
    from rlplat.serve.loading import load

    served = load(cfg)
    return build_server(served, cfg, config.api_key_of(cfg))
