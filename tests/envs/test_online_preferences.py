"""OnlinePreferences: prompt draws, scoring and tie rules of a preference source."""

from __future__ import annotations

import numpy as np
import pytest

from rlplat.envs.preference.online import OnlinePreferences, PromptSet
from rlplat.envs.preference.proxy import JpegCompressibility


def test_prompts_are_drawn_from_train_only_and_reproducibly():
    source = OnlinePreferences(PromptSet(["a", "b", "c"], eval=["held out"]), JpegCompressibility())
    draws = source.sample_prompts(200, np.random.default_rng(0))
    assert set(draws) == {"a", "b", "c"} and draws == source.sample_prompts(200, np.random.default_rng(0))
    assert source.eval_prompts == ["held out"] and source.name == "jpeg_compressibility"
    assert PromptSet(["x"]).eval_prompts == ["x"]


def test_labels_follow_the_tie_rules():
    a, b = np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.55])
    drop = OnlinePreferences(PromptSet(["p"]), JpegCompressibility(), tie_margin=0.1, ties="drop")
    preferred, keep = drop.labels(a, b, np.random.default_rng(0))
    assert preferred[:2].tolist() == [True, False] and keep.tolist() == [True, True, False]
    coin = OnlinePreferences(PromptSet(["p"]), JpegCompressibility(), tie_margin=0.1, ties="random")
    assert coin.labels(a, b, np.random.default_rng(0))[1].all()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="ties"):
        OnlinePreferences(PromptSet(["p"]), JpegCompressibility(), ties="maybe")
    with pytest.raises(ValueError, match="train is empty"):
        PromptSet([])
    with pytest.raises(ValueError, match="ShapesPrompts"):
        PromptSet(["p"]).demonstrations(4, seed=0)
