"""The shapes world: captions, rendering and the programmatic fidelity score."""

from __future__ import annotations

import numpy as np
import pytest

from rlplat.envs.preference.shapes import (
    BACKGROUND,
    ShapesFidelity,
    ShapeSpec,
    all_specs,
    fidelity_parts,
    parse_caption,
    render,
    sample_dataset,
)


def test_captions_round_trip_for_every_spec():
    specs = all_specs()
    assert len(specs) == 54 and len(set(specs)) == 54
    for spec in specs:
        assert parse_caption(spec.caption()) == spec
        assert parse_caption(spec.caption(background=True)) == spec
    assert ShapeSpec(2, "red", "circle").caption() == "two red circles"
    assert ShapeSpec(1, "blue", "square").caption(True) == "a blue square on a white background"


@pytest.mark.parametrize("caption", ["a pink circle", "four red squares", "a red hexagon", ""])
def test_captions_outside_the_world_are_refused(caption):
    with pytest.raises(ValueError, match="not in the shapes world"):
        parse_caption(caption)


def test_rendered_images_score_one_on_their_own_caption():
    rng = np.random.default_rng(0)
    scorer = ShapesFidelity()
    for spec in all_specs():
        for _ in range(3):
            image = render(spec, 32, rng)
            assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
            assert scorer(image[None], [spec.caption()])[0] == pytest.approx(1.0), spec


def test_mismatches_lower_the_matching_part_only():
    rng = np.random.default_rng(1)
    image = render(ShapeSpec(2, "red", "square"), 32, rng)
    assert fidelity_parts(image, ShapeSpec(2, "blue", "square")) == {"color": 0.0, "count": 1.0, "shape": 1.0}
    assert fidelity_parts(image, ShapeSpec(3, "red", "square")) == {"color": 1.0, "count": 0.0, "shape": 1.0}
    assert fidelity_parts(image, ShapeSpec(2, "red", "triangle")) == {"color": 1.0, "count": 1.0, "shape": 0.0}
    blank = np.full((32, 32, 3), BACKGROUND, np.uint8)
    assert ShapesFidelity()(blank[None], ["a red square"])[0] == 0.0


def test_fidelity_separates_right_from_wrong_captions_on_a_dataset():
    images, captions = sample_dataset(60, seed=3)
    scorer = ShapesFidelity()
    right = scorer(images, captions)
    wrong = scorer(images, captions[1:] + captions[:1])
    assert right.mean() == pytest.approx(1.0) and wrong.mean() < 0.7
    again, again_captions = sample_dataset(60, seed=3)
    assert np.array_equal(again, images) and again_captions == captions


def test_prompt_split_is_fixed_disjoint_and_covers_every_word_in_train():
    from rlplat.envs.preference.shapes import COLORS, SHAPES, prompt_split

    train, heldout = prompt_split(0.25, seed=0)
    assert len(train) + len(heldout) == 54 and len(heldout) == 14
    assert not set(train) & set(heldout)
    assert prompt_split(0.25, seed=0) == (train, heldout)
    specs = [parse_caption(c) for c in train]
    assert {s.color for s in specs} == set(COLORS) and {s.shape for s in specs} == set(SHAPES)
    assert {s.count for s in specs} == {1, 2, 3}
    with pytest.raises(ValueError, match="heldout_fraction"):
        prompt_split(1.0)


def test_shapes_prompts_give_the_split_and_reproducible_demonstrations():
    from rlplat.envs.preference.shapes import ShapesFidelity, ShapesPrompts, prompt_split

    prompts = ShapesPrompts(image_size=32)
    assert (prompts.train_prompts, prompts.eval_prompts) == prompt_split()
    images, captions = prompts.demonstrations(20, seed=5)
    again, _ = prompts.demonstrations(20, seed=5)
    assert images.shape == (20, 32, 32, 3) and np.array_equal(images, again)
    assert all(ShapesFidelity()(images[i : i + 1], [c]) == 1.0 for i, c in enumerate(captions))
