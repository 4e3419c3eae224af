"""Pick-a-Pic v2 pairwise human preferences, read from local parquet shards as published.

The dataset (``yuvalkirstain/pickapic_v2``, ~1M pairs, ~15 GB as ``data/<split>-NNNNN-of-NNNNN-*.parquet``)
has one row per comparison: ``caption``, the two images' JPEG bytes ``jpg_0`` / ``jpg_1``,
``label_0`` / ``label_1`` (1/0 for a preference, 0.5/0.5 for a tie), ``image_0_uid``,
``image_1_uid``, ``best_image_uid``, ``has_label``, ``are_different``, ``model_0``, ``model_1``,
``ranking_id``, ``user_id``, ``created_at``, ``num_example_per_prompt`` (``rlplat.pairs``).
The ``pickapic_v2_no_images`` variant has the same columns without ``jpg_*``; its images sit in a
local folder as ``<uid>.jpg`` (``images_dir``).

``PickAPicSource`` streams the pairs: one parquet row group in memory at a time, row groups of all
shards visited in an order shuffled with the seed (a new order each epoch), rows shuffled within
the group. Each kept row becomes ``{"caption", "image_w", "image_l", "uid_w", "uid_l", "user_id",
"ranking_id"}`` with the preferred image first (uint8 HxWx3, both through the same resize, crop
and flip). Ties are dropped by default (``drop_ties=False`` keeps them with ``"tie": True``, for a
tie-aware loss); rows without a label or with two identical images are dropped; rows whose image
bytes are missing or do not decode are skipped and logged with their ``ranking_id``. Every
outcome is counted in ``stats``. ``state_dict()`` records where the stream is (epoch, row group,
row), so a resumed run continues with the next pair.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rlplat.pairs import PICKAPIC_V2_COLUMNS

log = logging.getLogger(__name__)

DOWNLOAD_HINT = ("download it once on a machine with hub access: `hf download yuvalkirstain/pickapic_v2 "
                 "--repo-type dataset --local-dir /data/pickapic_v2` (~15 GB; add `--include 'data/validation*'` "
                 "for the 20k-pair validation split only), copy the folder here and set PICKAPIC_PATH to it")


def split_files(files: list[Path], split: str) -> list[Path]:
    """The shards of ``split``: file names ``<split>-NNNNN-of-NNNNN*.parquet`` (so ``validation``
    does not take ``validation_unique``'s shards)."""
    return [f for f in files if f.name.startswith(split + "-") or f.stem == split]


def split_captions(path: str | Path, split: str, limit: int | None = None) -> list[str]:
    """The distinct non-empty captions of ``split`` in stored order (the caption column only)."""
    import pyarrow.parquet as pq

    root = Path(path).expanduser()
    captions: dict[str, None] = {}
    for file in split_files([root] if root.is_file() else sorted(root.rglob("*.parquet")), split):
        reader = pq.ParquetFile(file)
        for group in range(reader.num_row_groups):
            for caption in reader.read_row_group(group, columns=["caption"]).column("caption").to_pylist():
                if caption and caption.strip():
                    captions.setdefault(caption, None)
                    if limit is not None and len(captions) >= limit:
                        return list(captions)
    return list(captions)


class PickAPicSource:
    """Pairs of a Pick-a-Pic v2 folder (see the module docstring), streamed and resumable.

    Args:
        path: Folder with the parquet shards (searched recursively), or one parquet file.
        split: Shards whose file name starts with this (``train``, ``validation``, ...; null: all).
        drop_ties: Drop 0.5/0.5 rows (else they are kept and marked ``tie``).
        images_dir: Folder of ``<uid>.jpg`` images for the no-images variant (null: ``jpg_*`` columns).
        resolution: Output images are ``resolution`` x ``resolution`` (shorter side resized, then cropped).
        random_crop: Crop at a random offset (else the centre).
        random_flip: Mirror left-right with probability 0.5.
        seed: Shuffle and augmentation seed.
        shuffle: Visit row groups and rows in a seeded random order (else as stored).
    """

    def __init__(self, path: str | Path, split: str | None = "train", drop_ties: bool = True,
                 images_dir: str | Path | None = None, resolution: int = 512, random_crop: bool = False,
                 random_flip: bool = True, seed: int = 0, shuffle: bool = True) -> None:
        import pyarrow.parquet as pq

        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"preference.path={path}: no Pick-a-Pic folder there; {DOWNLOAD_HINT}")
        files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
        if split:
            files = split_files(files, split)
        if not files:
            raise FileNotFoundError(f"preference.path={path} holds no {split + '-*' if split else ''}.parquet "
                                    f"shards; {DOWNLOAD_HINT}")
        if resolution < 8:
            raise ValueError(f"preference.resolution={resolution} must be >= 8")
        self.files = files
        self.drop_ties, self.resolution = bool(drop_ties), int(resolution)
        self.random_crop, self.random_flip = bool(random_crop), bool(random_flip)
        self.images_dir = Path(images_dir).expanduser() if images_dir else None
        self.seed, self.shuffle = int(seed), bool(shuffle)
        # (file index, row group index) of every row group of every shard.
        self.groups = [(i, g) for i, f in enumerate(files) for g in range(pq.ParquetFile(f).num_row_groups)]
        columns = set(pq.ParquetFile(files[0]).schema_arrow.names)
        missing = {"caption", "label_0", "label_1", "image_0_uid", "image_1_uid", "ranking_id"} - columns
        if self.images_dir is None:
            missing |= {"jpg_0", "jpg_1"} - columns
        if missing:
            hint = " (the no-images variant: set preference.images_dir)" if {"jpg_0", "jpg_1"} & missing else ""
            raise ValueError(f"preference.path={path}: {files[0].name} lacks the Pick-a-Pic v2 columns "
                             f"{sorted(missing)}{hint}")
        self.columns = [c for c in PICKAPIC_V2_COLUMNS if c in columns and not (self.images_dir and c.startswith("jpg"))]
        self.stats: Counter[str] = Counter()
        self.epoch, self.group, self.row = 0, 0, 0

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """Where the stream is (the next pair to yield) and the counts so far."""
        return {"epoch": self.epoch, "group": self.group, "row": self.row, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.group, self.row = int(state["epoch"]), int(state["group"]), int(state["row"])
        self.stats = Counter(state.get("stats", {}))

    def _order(self, n: int, *key: int) -> np.ndarray:
        return np.random.default_rng([self.seed, *key]).permutation(n) if self.shuffle else np.arange(n)

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Pairs forever (epoch after epoch), from the current position."""
        while True:
            yield from self.one_pass()

    def one_pass(self) -> Iterator[dict[str, Any]]:
        """The pairs of the rest of the current epoch; the position then moves to the next epoch."""
        import pyarrow.parquet as pq

        order = self._order(len(self.groups), self.epoch)
        while self.group < len(self.groups):
            file_index, group_index = self.groups[order[self.group]]
            rows = pq.ParquetFile(self.files[file_index]).read_row_group(group_index, columns=self.columns).to_pylist()
            row_order = self._order(len(rows), self.epoch, int(order[self.group]))
            while self.row < len(rows):
                position = (self.epoch, self.group, self.row)
                row = rows[row_order[self.row]]
                self.row += 1
                self.stats["rows"] += 1
                pair = self._pair(row, position)
                if pair is not None:
                    self.stats["kept"] += 1
                    yield pair
            self.group, self.row = self.group + 1, 0
        self.epoch, self.group = self.epoch + 1, 0

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` pairs."""
        out = []
        for pair in self:
            out.append(pair)
            if len(out) == n:
                break
        return out

    def _pair(self, row: dict[str, Any], position: tuple[int, int, int]) -> dict[str, Any] | None:
        """The row as a pair (preferred first), or None (dropped and counted)."""
        if row.get("has_label") is False:
            self.stats["unlabeled"] += 1
            return None
        if row.get("are_different") is False:
            self.stats["same_images"] += 1
            return None
        label_0, label_1 = row["label_0"], row["label_1"]
        tie = label_0 == label_1
        if tie:
            self.stats["ties"] += 1
            if self.drop_ties:
                return None
        first = 0 if tie or label_0 > label_1 else 1
        images = []
        for side in (first, 1 - first):
            image = self._decode(row, side)
            if image is None:
                self.stats["corrupt"] += 1
                log.warning("Pick-a-Pic row ranking_id=%s: image %d (uid %s) is missing or does not decode; skipped",
                            row.get("ranking_id"), side, row.get(f"image_{side}_uid"))
                return None
            images.append(image)
        rng = np.random.default_rng([self.seed, *position])  # one draw for both images of the pair
        image_w, image_l = self._augment(images, rng)
        pair = {"caption": row["caption"] or "", "image_w": image_w, "image_l": image_l,
                "uid_w": row[f"image_{first}_uid"], "uid_l": row[f"image_{1 - first}_uid"],
                "user_id": row.get("user_id"), "ranking_id": row.get("ranking_id")}
        if not self.drop_ties:
            pair["tie"] = bool(tie)
        return pair

    def _decode(self, row: dict[str, Any], side: int) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            if self.images_dir is not None:
                data = (self.images_dir / f"{row[f'image_{side}_uid']}.jpg").read_bytes()
            else:
                data = row.get(f"jpg_{side}")
            if not data:
                return None
            image = Image.open(io.BytesIO(data))
            image.load()
            return image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError):
            return None

    def _augment(self, images: list[Any], rng: np.random.Generator) -> list[np.ndarray]:
        """The same resize (shorter side), crop and flip for every image of one pair."""
        from PIL import Image

        size = self.resolution
        out, crop, flip = [], None, self.random_flip and bool(rng.random() < 0.5)
        for image in images:
            scale = size / min(image.size)
            w, h = max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))
            image = image.resize((w, h), Image.Resampling.BILINEAR)
            if crop is None:  # drawn once, from the first image's size (both are resized alike)
                left = int(rng.integers(0, w - size + 1)) if self.random_crop else (w - size) // 2
                top = int(rng.integers(0, h - size + 1)) if self.random_crop else (h - size) // 2
                crop = (left, top)
            left, top = min(crop[0], w - size), min(crop[1], h - size)
            array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
            out.append(array[:, ::-1].copy() if flip else array)
        return out
