"""Robot-side runtime: drive a robot with actions from a policy server, safely (issue 20).

    rlplat-deploy server=ws://HOST:8000 robot=sim sim.run=outputs/quickstart/<date>_<time>   # dry run
    rlplat-deploy server=ws://HOST:8000 robot=my_robots.arm:Arm robot_args.port=/dev/ttyUSB0

The pieces, each usable alone:

- ``Robot`` (``robot.py``): what a robot offers the runtime (reset / get_observation /
  apply_action / hold / home); ``SimRobot`` (``sim.py``) wraps the platform's envs for dry runs.
- ``PolicyClient`` (``client.py``): the policy server's websocket protocol (openpi's
  msgpack-numpy frames), reconnecting, refusing a server that comes back with another model.
- ``ActionChunkBroker``, ``SafetyFilter``, ``RateLimiter``, ``Recorder`` and the control loop
  ``Runtime`` with its watchdog (``runtime.py``, ``safety.py``, ``record.py``).

Importing this package needs numpy, msgpack and websockets only (no torch, no model code), so it
runs on the robot's own computer; only ``SimRobot`` imports the simulators.
"""
