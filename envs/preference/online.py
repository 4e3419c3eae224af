"""Online preference sources: prompts to sample for, a score for what was sampled, pair labels.

**Task description.** The algorithm samples images for prompts drawn from ``train_prompts``; the
source scores them (``score``) and, for pairwise algorithms (D3PO), turns the two scores of a
pair into a preference label (``labels``). Evaluation samples ``eval_prompts``, which the tuning
never draws, with fixed seeds.

**Randomizations.** Prompt draws come from the loop's seeded generator; ties broken at random
(``ties="random"``) use it too, so a run is reproducible from ``seed``.

**Success condition.** There is none: the score is the reward (``reward/mean`` in the logs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from omegaconf import MISSING

from rlplat.envs.preference.proxy import ScoreSource, preference_labels
from rlplat.registry import checked, register


class PromptSet:
    """Fixed train and held-out prompt lists.

    Subclasses that can render captioned images (the shapes world) set ``has_demonstrations``
    and implement ``demonstrations``, which supervised pretraining (algo=diffusion_sft) needs.

    Args:
        train: Prompts the tuning samples for.
        eval: Held-out prompts for evaluation (null: the train prompts).
    """

    #: Whether ``demonstrations`` gives captioned images.
    has_demonstrations: ClassVar[bool] = False
    #: Whether ``fidelity`` scores what the images show against their prompts.
    has_fidelity: ClassVar[bool] = False

    def __init__(self, train: Sequence[str], eval: Sequence[str] | None = None) -> None:
        if not train:
            raise ValueError("preference.prompts.train is empty: give at least one prompt")
        self.train_prompts = list(train)
        self.eval_prompts = list(eval) if eval else list(train)

    def fidelity(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray | None:
        """Prompt fidelity [B] in [0, 1] of uint8 images for their prompts, a side metric whatever
        the reward (the shapes world has one); None: this prompt set has no such score."""
        return None

    def demonstrations(self, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
        """``n`` (image, caption) pairs for supervised training; a plain prompt list has none."""
        raise ValueError(
            f"{type(self).__name__} has prompts but no images, so algo=diffusion_sft has nothing to learn from: "
            f"use a prompt set with demonstrations (preference.prompts._target_=rlplat.envs.preference.shapes.ShapesPrompts)"
        )


@dataclass
class OnlinePreferenceConfig:
    """Prompts, a score and tie rules for online preference tuning (envs/preference/online.py)."""

    # Prompt set (_target_ + arguments): train prompts, held-out eval prompts, maybe demonstrations.
    prompts: Any = field(default_factory=lambda: {"_target_": "rlplat.envs.preference.shapes.ShapesPrompts"})
    # Score source (_target_ + arguments), higher is better.
    score: Any = MISSING
    # Score gap at or below which a pair counts as a tie.
    tie_margin: float = checked(0.0, ge=0)
    # Tied pairs: drop (no gradient) or random (a fair coin labels them).
    ties: str = checked("drop", choices=("drop", "random"))


@register("preference", "online", OnlinePreferenceConfig)
class OnlinePreferences:
    """Prompts + a ``ScoreSource`` + how score pairs become labels (a ``preference`` config).

    Args:
        prompts: A ``PromptSet`` (train / eval prompts, maybe demonstrations).
        score: The ``ScoreSource`` (JPEG, shapes fidelity, PickScore, aesthetic, ...).
        tie_margin: Score gap at or below which a pair is a tie.
        ties: "drop" (tied pairs give no gradient) or "random" (a fair coin labels them).
    """

    def __init__(self, prompts: PromptSet, score: ScoreSource, tie_margin: float = 0.0, ties: str = "drop") -> None:
        self.prompts = prompts
        self.scorer = score
        self.tie_margin = float(tie_margin)
        self.ties = ties
        preference_labels(np.zeros(1), np.zeros(1), self.tie_margin, ties, np.random.default_rng(0))  # checks both

    @property
    def name(self) -> str:
        return self.scorer.name

    @property
    def train_prompts(self) -> list[str]:
        return self.prompts.train_prompts

    @property
    def eval_prompts(self) -> list[str]:
        return self.prompts.eval_prompts

    def sample_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` training prompts drawn uniformly with replacement."""
        return [self.train_prompts[int(i)] for i in rng.integers(0, len(self.train_prompts), n)]

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """float32 [B] scores of uint8 images [B, H, W, 3] for their prompts."""
        return self.scorer(images, prompts)

    def fidelity(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray | None:
        """The prompt set's fidelity side metric (``PromptSet.fidelity``), or None."""
        return self.prompts.fidelity(images, prompts)

    def labels(self, scores_a: np.ndarray, scores_b: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(a_preferred, keep)`` per pair (``proxy.preference_labels`` with this source's tie rules)."""
        return preference_labels(scores_a, scores_b, self.tie_margin, self.ties, rng)

    def demonstrations(self, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
        """Captioned images for supervised (pre)training, from the prompt set."""
        return self.prompts.demonstrations(n, seed)
