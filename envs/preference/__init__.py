"""Preference sources (``rlplat.envs.preference``): online proxy scores and pairwise labels.

Nothing heavy is imported here; ``proxy`` loads CLIP models only when a source needs them.
"""
