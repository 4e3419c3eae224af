"""rlplat: RL and preference fine-tuning of robot and image models, configured by Hydra, placed by Ray.

Kept light on purpose: ``import rlplat.policies.mlp`` or ``import rlplat.envs.toy`` must not
start Ray or import simulators.
"""

__version__ = "0.1.0"
