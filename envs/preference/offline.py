"""Offline preference data: pairs of a Pick-a-Pic-format dataset, plus what evaluation scores with.

**Task description.** The algorithm (``algo=dpo``) learns from human (or proxy-human) choices
between two images of one caption, read from parquet shards in the Pick-a-Pic v2 schema
(``PickAPicSource``: the published set, or one made here by ``rlplat-make-pairs``). Evaluation
samples the held-out captions (``eval_prompts``, by default the distinct captions of the
``eval_split`` shards) with fixed seeds and scores the images with ``score`` when one is set
(the shapes fidelity for the shapes pairs, PickScore for Pick-a-Pic), and against the images of
the model before tuning (win rate).

**Randomizations.** Pair order, crops and flips come from ``seed``; the stream position is
checkpointed, so a resumed run reads the pairs the uninterrupted one would.

**Success condition.** There is none: the held-out score and the win rate over the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlplat.envs.preference.pickapic import DOWNLOAD_HINT, PickAPicSource, split_captions, split_files
from rlplat.envs.preference.shapes import prompt_fidelity
from rlplat.registry import checked, register


@dataclass
class PreferencePairsConfig:
    """Pairs of a Pick-a-Pic v2-format folder and the held-out evaluation (envs/preference/offline.py)."""

    # Folder with the parquet shards (searched recursively).
    path: str | None = None
    # Training shards: <split>-*.parquet.
    split: str = "train"
    # Drop 0.5/0.5 (tied) pairs; false keeps them marked as ties (for a tie-aware loss).
    drop_ties: bool = True
    # Folder of <uid>.jpg images for the no-images variant (null: the jpg_0 / jpg_1 columns).
    images_dir: str | None = None
    # Side of the training images (the model's image size: 512 for SD1.5, 32 for the tiny model).
    resolution: int = checked(512, ge=8)
    # Crop at a random offset (else the centre), the same for both images of a pair.
    random_crop: bool = False
    # Mirror both images of a pair left-right with probability 0.5.
    random_flip: bool = True
    # Shuffle and augmentation seed.
    seed: int = 0
    # Held-out captions for evaluation (null: the distinct captions of eval_split).
    eval_prompts: list[str] | None = None
    # Shards whose distinct captions are the held-out prompts (Pick-a-Pic: validation_unique).
    eval_split: str = "validation"
    # At most this many held-out captions.
    max_eval_prompts: int = checked(64, ge=1)
    # Score of evaluation images (_target_ + arguments), higher is better; null: grids only.
    score: Any = None
    # How to get the data, printed when path holds no shards.
    get_data: str = DOWNLOAD_HINT


def preflight(path: str | None = None, split: str = "train", get_data: str = DOWNLOAD_HINT, **_: Any) -> None:
    """Stops before anything starts when the folder or its ``split`` shards are missing."""
    if not path:
        raise FileNotFoundError(f"preference.path is not set (the Pick-a-Pic-format folder; presets read it from "
                                f"an environment variable, e.g. PICKAPIC_PATH): {get_data}")
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet")) if root.is_dir() else []
    if not split_files(files, split):
        where = "does not exist" if not root.exists() else f"holds no {split}-*.parquet shards"
        raise FileNotFoundError(f"preference.path={path} {where}: {get_data}")


@register("preference", "pairs", PreferencePairsConfig, contract="PreferencePairSource", preflight=preflight)
class PreferencePairs:
    """Training pairs (a ``PickAPicSource`` stream) + held-out prompts + an optional score.

    What the offline collector calls: ``take(n)`` (the next ``n`` pairs, preferred image first),
    ``state_dict`` / ``load_state_dict`` (the stream position and counts), ``stats``,
    ``eval_prompts``, ``score`` and ``name``.
    """

    def __init__(self, path: str, split: str = "train", drop_ties: bool = True, images_dir: str | None = None,
                 resolution: int = 512, random_crop: bool = False, random_flip: bool = True, seed: int = 0,
                 eval_prompts: list[str] | None = None, eval_split: str = "validation", max_eval_prompts: int = 64,
                 score: Any = None, get_data: str = DOWNLOAD_HINT) -> None:
        preflight(path, split, get_data)
        self.pairs = PickAPicSource(path, split=split, drop_ties=drop_ties, images_dir=images_dir,
                                    resolution=resolution, random_crop=random_crop, random_flip=random_flip, seed=seed)
        self.eval_prompts = list(eval_prompts or split_captions(path, eval_split, max_eval_prompts))
        if not self.eval_prompts:
            raise ValueError(f"preference.eval_split={eval_split}: {path} has no captions in {eval_split}-*.parquet "
                             f"shards; give the held-out prompts as preference.eval_prompts=[...]")
        self.scorer = score
        self.resolution = int(resolution)

    @property
    def name(self) -> str:
        return self.scorer.name if self.scorer is not None else "none"

    @property
    def stats(self) -> dict[str, int]:
        return dict(self.pairs.stats)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The next ``n`` pairs as ``(images_w, images_l, captions)``: uint8 [n, R, R, 3] twice."""
        rows = self.pairs.take(n)
        return (np.stack([r["image_w"] for r in rows]), np.stack([r["image_l"] for r in rows]),
                [r["caption"] for r in rows])

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray | None:
        """float32 [B] scores of uint8 images for their prompts, or None without a score."""
        return None if self.scorer is None else self.scorer(images, prompts)

    def fidelity(self, images: np.ndarray, prompts: list[str]) -> np.ndarray | None:
        """Shapes-world prompt fidelity when the captions are shapes captions, else None."""
        return prompt_fidelity(images, prompts)

    def state_dict(self) -> dict[str, Any]:
        return self.pairs.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pairs.load_state_dict(state)
