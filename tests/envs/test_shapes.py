"""The shapes world: captions, rendering and the programmatic fidelity score."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rlplat.envs.preference.shapes import (
    BACKGROUND,
    FILL_TOLERANCE,
    NOMINAL_FILL,
    ShapesFidelity,
    ShapeSpec,
    all_specs,
    count_credit,
    fidelity_parts,
    parse_caption,
    render,
    sample_dataset,
    shape_credit,
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
    assert fidelity_parts(image, ShapeSpec(3, "red", "square")) == {"color": 1.0, "count": 0.5, "shape": 1.0}
    assert fidelity_parts(image, ShapeSpec(2, "red", "triangle")) == {"color": 1.0, "count": 1.0, "shape": 0.0}
    assert fidelity_parts(image, ShapeSpec(2, "red", "circle")) == {"color": 1.0, "count": 1.0, "shape": 0.0}
    blank = np.full((32, 32, 3), BACKGROUND, np.uint8)
    assert ShapesFidelity()(blank[None], ["a red square"])[0] == 0.0


def test_weights_stress_one_part_and_bad_weights_name_the_field():
    images = np.repeat(render(ShapeSpec(2, "red", "square"), 32, np.random.default_rng(1))[None], 3, 0)
    captions = ["two blue squares", "three red squares", "two red triangles"]  # colour / count / shape off
    plain = ShapesFidelity()(images, captions)
    assert plain == pytest.approx([2 / 3, 2.5 / 3, 2 / 3])
    assert ShapesFidelity({"color": 1, "count": 1, "shape": 1})(images, captions).tolist() == plain.tolist()
    # The shape counts 3 times (a part not named weighs 1); the shape alone.
    assert ShapesFidelity({"shape": 3})(images, captions) == pytest.approx([4 / 5, 4.5 / 5, 2 / 5])
    assert ShapesFidelity({"color": 0, "count": 0})(images, captions) == pytest.approx([1, 1, 0])
    with pytest.raises(ValueError, match=r"weights names \['colour'\]: the parts are \['color', 'count', 'shape'\]"):
        ShapesFidelity({"colour": 2})
    for bad in ({"shape": -1}, {"color": 0, "count": 0, "shape": 0}):
        with pytest.raises(ValueError, match="each weight must be >= 0 and one > 0"):
            ShapesFidelity(bad)


def test_count_credit_halves_per_shape_off_and_decays():
    assert count_credit(2, 2) == 1.0
    assert count_credit(1, 2) == count_credit(3, 2) == 0.5
    assert count_credit(0, 3) == 0.25
    credits = [count_credit(n, 1) for n in range(1, 30)]
    assert all(a > b for a, b in itertools.pairwise(credits)) and credits[-1] < 0.04


def test_shape_credit_is_full_near_the_nominal_fill_and_zero_at_another_shapes():
    for shape, fill in NOMINAL_FILL.items():
        assert shape_credit(fill, shape) == 1.0
        assert shape_credit(fill + FILL_TOLERANCE * 0.99, shape) == 1.0
        for other, other_fill in NOMINAL_FILL.items():
            if other != shape:
                assert shape_credit(other_fill, shape) == 0.0, (shape, other)
    # Between the tolerance and the next shape's fill the credit falls monotonically: partial credit.
    fills = np.linspace(NOMINAL_FILL["circle"] + FILL_TOLERANCE, 1.0, 12)
    credits = [shape_credit(f, "circle") for f in fills]
    assert all(a >= b for a, b in itertools.pairwise(credits)) and 0.0 < credits[5] < 1.0


def test_fidelity_falls_steadily_with_each_stray_blob():
    """A correct image with k stray 2x2 specks of the named colour: every speck lowers the score
    (count and shape credit), where an all-or-nothing count would not tell 1 speck from 10."""
    spec = ShapeSpec(2, "blue", "circle")
    image = render(spec, 32, np.random.default_rng(4))
    clear = np.all(image == BACKGROUND, axis=-1)
    # Places whose 4x4 neighbourhood is background, so a 2x2 speck there is a blob of its own.
    spots = [(y, x) for y in range(0, 29, 4) for x in range(0, 29, 4) if clear[y : y + 4, x : x + 4].all()]
    scores = []
    for k in range(11):
        noisy = image.copy()
        for y, x in spots[:k]:
            noisy[y + 1 : y + 3, x + 1 : x + 3] = (30, 60, 220)
        scores.append(float(ShapesFidelity()(noisy[None], [spec.caption()])[0]))
    assert len(spots) >= 10 and scores[0] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(scores)), scores


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
