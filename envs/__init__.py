"""Environments (``rlplat.envs``): the VectorEnv contract in ``base`` and its implementations.

Nothing is imported here, so ``import rlplat.envs.toy`` never pulls in a simulator.
"""
