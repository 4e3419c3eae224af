"""rlplat-make-pairs: a Pick-a-Pic v2 dataset from the shipped tiny shapes model."""

import json

import numpy as np
import pyarrow.parquet as pq

from rlplat.envs.preference.pickapic import PickAPicSource
from rlplat.make_pairs import label_pairs, make_pairs
from rlplat.pairs import pickapic_v2_schema


def test_labels_follow_the_score_with_ties_and_noise():
    rng = np.random.default_rng(0)
    a, b = np.array([0.9, 0.5, 0.50, 0.2]), np.array([0.1, 0.5, 0.51, 0.8])
    label_0, label_1 = label_pairs(a, b, noise=0.0, tie_margin=0.02, rng=rng)
    assert label_0.tolist() == [1.0, 0.5, 0.5, 0.0] and (label_0 + label_1 == 1).all()
    # With noise the better image still wins most of the time, not always.
    wins = label_pairs(np.full(2000, 0.6), np.full(2000, 0.5), noise=0.1, tie_margin=0.0, rng=rng)[0].mean()
    assert 0.65 < wins < 0.80  # sigmoid(1) = 0.731


def test_made_pairs_load_through_the_pickapic_loader(tmp_path):
    report = make_pairs(["--out", str(tmp_path), "--pairs", "12", "--validation-pairs", "4", "--batch", "8",
                         "--tie-margin", "0", "policy.num_steps=3"])
    train = tmp_path / "data" / "train-00000-of-00001.parquet"
    assert pq.read_schema(train).equals(pickapic_v2_schema())
    assert report["train"]["pairs"] == 12 and report["validation"]["pairs"] == 4
    assert json.loads((tmp_path / "make_pairs.json").read_text())["train"]["ties"] == report["train"]["ties"]
    source = PickAPicSource(tmp_path, split="train", resolution=32, drop_ties=False)
    pairs = list(source.one_pass())
    assert len(pairs) == 12 and source.stats["corrupt"] == 0
    assert pairs[0]["image_w"].shape == (32, 32, 3)
    validation = {p["caption"] for p in PickAPicSource(tmp_path, split="validation", resolution=32,
                                                       drop_ties=False).one_pass()}
    assert not validation & {p["caption"] for p in pairs}  # held-out captions only
