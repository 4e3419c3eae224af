"""Pick-a-Pic v2 loader on generated shards in the exact published schema."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rlplat.envs.preference.pickapic import PickAPicSource
from rlplat.pairs import pickapic_v2_schema, write_pairs


def _jpeg(channel: int, width: int = 40, height: int = 24) -> bytes:
    """A horizontal ramp in one colour channel (a crop or flip shows in the pixels)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., channel] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _row(i: int, label_0: float, jpg_0: bytes | None = None, jpg_1: bytes | None = None, **extra) -> dict:
    # Image 0 is red, image 1 blue: the winner's colour tells whether the pair was ordered right.
    best = f"u{i}_0" if label_0 > 0.5 else f"u{i}_1" if label_0 < 0.5 else ""
    row = {"are_different": True, "best_image_uid": best, "caption": f"caption {i}",
           "created_at": dt.datetime(2023, 5, 1), "has_label": True, "image_0_uid": f"u{i}_0",
           "image_0_url": f"https://example.invalid/u{i}_0.jpg", "image_1_uid": f"u{i}_1",
           "image_1_url": f"https://example.invalid/u{i}_1.jpg", "jpg_0": _jpeg(0) if jpg_0 is None else jpg_0,
           "jpg_1": _jpeg(2) if jpg_1 is None else jpg_1, "label_0": label_0, "label_1": 1.0 - label_0,
           "model_0": "sdxl", "model_1": "sd-2.1", "ranking_id": 1000 + i, "user_id": 7 + i % 3,
           "num_example_per_prompt": 1, "__index_level_0__": i}
    row.update(extra)
    return row


@pytest.fixture()
def shards(tmp_path):
    """Two train shards (row groups of 4) and one validation shard: 24 rows, of which 3 ties,
    2 corrupt (bytes that are not a JPEG, empty bytes), 1 unlabeled, 1 with identical images."""
    rows = [_row(i, 1.0 if i % 2 else 0.0) for i in range(24)]
    rows[3] = _row(3, 0.5)
    rows[10] = _row(10, 0.5)
    rows[17] = _row(17, 0.5)
    rows[5] = _row(5, 1.0, jpg_1=b"not a jpeg")
    rows[12] = _row(12, 0.0, jpg_0=b"")
    rows[20] = _row(20, 1.0, has_label=False)
    rows[22] = _row(22, 0.0, are_different=False)
    folder = tmp_path / "pickapic_v2" / "data"
    for k, part in enumerate((rows[:12], rows[12:])):
        write_pairs(part, folder / f"train-0000{k}-of-00002-abc.parquet", row_group_size=4)
    write_pairs([_row(99, 1.0)], folder / "validation-00000-of-00001.parquet")
    assert pq.read_schema(folder / "validation-00000-of-00001.parquet").equals(pickapic_v2_schema())
    return tmp_path / "pickapic_v2"


def test_a_full_pass_counts_every_outcome_and_keeps_the_rest(shards, caplog):
    source = PickAPicSource(shards, resolution=16, seed=0)
    pairs = list(source.one_pass())
    assert dict(source.stats) == {"rows": 24, "kept": 17, "ties": 3, "corrupt": 2, "unlabeled": 1, "same_images": 1}
    assert "ranking_id=1005" in caplog.text and "ranking_id=1012" in caplog.text
    dropped = {3, 10, 17, 5, 12, 20, 22}
    assert sorted(int(p["caption"].split()[1]) for p in pairs) == [i for i in range(24) if i not in dropped]
    assert source.state_dict()["epoch"] == 1


def test_winner_first_never_swapped_and_both_images_share_the_augmentation(shards):
    source = PickAPicSource(shards, resolution=16, random_crop=True, random_flip=True, seed=3)
    pairs = list(source.one_pass())
    flips = set()
    for pair in pairs:
        i = int(pair["caption"].split()[1])
        winner_channel = 0 if i % 2 else 2  # label_0 = 1 for odd rows: the red image wins
        w, l_ = pair["image_w"], pair["image_l"]
        assert w.shape == l_.shape == (16, 16, 3) and w.dtype == np.uint8
        assert w[..., winner_channel].mean() > 50 and w[..., 2 - winner_channel].mean() < 10
        assert pair["uid_w"] == f"u{i}_{0 if i % 2 else 1}" and pair["ranking_id"] == 1000 + i
        # Same crop and flip: the winner's ramp equals the loser's ramp in the other channel.
        np.testing.assert_allclose(w[..., winner_channel].astype(int), l_[..., 2 - winner_channel].astype(int), atol=6)
        flips.add(bool(w[0, 0, winner_channel] > w[0, -1, winner_channel]))
    assert flips == {True, False}  # both orientations occur over 17 pairs


def test_ties_kept_when_asked_and_marked(shards):
    source = PickAPicSource(shards, resolution=16, drop_ties=False, seed=0)
    pairs = source.take(20)
    assert sum(p["tie"] for p in pairs) == 3 and source.stats["ties"] == 3


def test_resume_continues_with_the_next_pair(shards):
    whole = PickAPicSource(shards, resolution=16, random_crop=True, seed=5).take(30)  # crosses an epoch
    first = PickAPicSource(shards, resolution=16, random_crop=True, seed=5)
    head = first.take(11)
    state = first.state_dict()
    second = PickAPicSource(shards, resolution=16, random_crop=True, seed=5)
    second.load_state_dict(state)
    tail = second.take(19)
    for a, b in zip(whole, head + tail, strict=True):
        assert a["ranking_id"] == b["ranking_id"]
        np.testing.assert_array_equal(a["image_w"], b["image_w"])
    # Another seed visits the pairs in another order; the next epoch in another order again.
    other = [p["ranking_id"] for p in PickAPicSource(shards, resolution=16, seed=6).take(17)]
    assert other != [p["ranking_id"] for p in whole[:17]]
    assert [p["ranking_id"] for p in whole[17:30]] != [p["ranking_id"] for p in whole[:13]]


def test_split_images_dir_and_errors_name_the_field(shards, tmp_path):
    assert [p["caption"] for p in PickAPicSource(shards, split="validation", resolution=16).take(1)] == ["caption 99"]
    with pytest.raises(FileNotFoundError, match="hf download yuvalkirstain/pickapic_v2"):
        PickAPicSource(tmp_path / "nowhere")
    # The no-images variant: the same rows without jpg_*, images in a folder by uid.
    table = pq.read_table(next(shards.rglob("validation-*.parquet"))).drop(["jpg_0", "jpg_1"])
    folder = tmp_path / "no_images"
    folder.mkdir()
    pq.write_table(table, folder / "validation-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"lacks the Pick-a-Pic v2 columns \['jpg_0', 'jpg_1'\].*images_dir"):
        PickAPicSource(folder, split=None)
    images = tmp_path / "images"
    images.mkdir()
    (images / "u99_0.jpg").write_bytes(_jpeg(0))
    (images / "u99_1.jpg").write_bytes(_jpeg(2))
    pair = PickAPicSource(folder, split=None, images_dir=images, resolution=16).take(1)[0]
    assert pair["uid_w"] == "u99_0" and pair["image_w"][..., 0].mean() > 50
