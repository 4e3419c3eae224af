"""``rlplat-make-pairs``: a Pick-a-Pic-format preference dataset made on this machine.

    rlplat-make-pairs --out data/shapes_pairs                       # 2048 train + 256 validation pairs
    rlplat-make-pairs --out DIR --pairs 512 --noise 0.05 --tie-margin 0.02 policy.num_steps=10

Samples two images per caption from a text-to-image policy (default: the tiny shapes model early
in its pretraining, ``diffusion_tiny_shapes_early``: its samples differ enough for most pairs to
carry a preference; the fully trained base ties on about half of them) for the preference source's prompts (train prompts for ``train``, held-out prompts for
``validation``) and labels each pair like a noisy human: the source's score (shapes fidelity) of
both images, a tie when they differ by at most ``--tie-margin`` (0.5 / 0.5), otherwise the
higher-scored image wins with probability ``sigmoid(gap / --noise)`` (Bradley-Terry; 0: always).
Writes ``data/train-00000-of-00001.parquet`` and ``data/validation-00000-of-00001.parquet`` in the
exact Pick-a-Pic v2 schema (``rlplat.pairs``), so the Pick-a-Pic loader, FiFA and the DPO
presets read it as they read the real set, and ``make_pairs.json`` with the counts and how often
the label agrees with the score. Everything derives from ``--seed``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import numpy as np


def label_pairs(scores_0: np.ndarray, scores_1: np.ndarray, noise: float, tie_margin: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(label_0, label_1)`` per pair: 0.5 / 0.5 within the tie band, else a Bradley-Terry draw
    on the score gap at temperature ``noise`` (0: the higher score always wins)."""
    gap = np.asarray(scores_0, np.float64) - np.asarray(scores_1, np.float64)
    if noise > 0:
        first_wins = rng.random(len(gap)) < 1.0 / (1.0 + np.exp(-gap / noise))
    else:
        first_wins = gap > 0
    label_0 = np.where(np.abs(gap) <= tie_margin, 0.5, first_wins.astype(np.float64))
    return label_0, 1.0 - label_0


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_split(policy: Any, source: Any, prompts: list[str], pairs: int, batch: int, noise: float,
               tie_margin: float, seed: int, model_name: str, first_id: int) -> tuple[list[dict], dict[str, float]]:
    """``pairs`` rows in the v2 schema for captions drawn from ``prompts``, and their counts."""
    import torch

    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    rows, agree, ties = [], 0, 0
    start = dt.datetime(2024, 1, 1)
    while len(rows) < pairs:
        n = min(batch, pairs - len(rows))
        captions = [prompts[int(i)] for i in rng.integers(0, len(prompts), n)]
        doubled = [c for c in captions for _ in (0, 1)]  # two independent samples per caption
        images = policy.sample_trajectory(doubled, generator)["images"].numpy()
        scores = np.asarray(source.score(images, doubled), np.float64)
        label_0, label_1 = label_pairs(scores[0::2], scores[1::2], noise, tie_margin, rng)
        for k, caption in enumerate(captions):
            i = first_id + len(rows)
            uids = [f"{rng.integers(2**63):016x}-{side}" for side in (0, 1)]
            tie = label_0[k] == 0.5
            ties += int(tie)
            agree += int(not tie and (label_0[k] > 0.5) == (scores[2 * k] > scores[2 * k + 1]))
            rows.append({
                "are_different": True, "best_image_uid": "" if tie else uids[0 if label_0[k] > 0.5 else 1],
                "caption": caption, "created_at": start + dt.timedelta(seconds=i), "has_label": True,
                "image_0_uid": uids[0], "image_0_url": "", "image_1_uid": uids[1], "image_1_url": "",
                "jpg_0": _jpeg(images[2 * k]), "jpg_1": _jpeg(images[2 * k + 1]),
                "label_0": float(label_0[k]), "label_1": float(label_1[k]), "model_0": model_name,
                "model_1": model_name, "ranking_id": i, "user_id": int(rng.integers(0, 16)),
                "num_example_per_prompt": 1, "__index_level_0__": i,
            })
    decided = len(rows) - ties
    return rows, {"pairs": len(rows), "ties": ties, "label_agrees_with_score": agree / decided if decided else float("nan")}


def main(argv: list[str] | None = None) -> None:
    """Console entry point (see the module docstring)."""
    make_pairs(argv)


def make_pairs(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses ``argv``, writes the dataset and returns the report."""
    parser = argparse.ArgumentParser(prog="rlplat-make-pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (data/<split>-*.parquet go inside)")
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs")
    parser.add_argument("--validation-pairs", type=int, default=256, help="validation pairs (held-out captions)")
    parser.add_argument("--policy", default="diffusion_tiny_shapes_early", help="the text-to-image policy preset")
    parser.add_argument("--preference", default="shapes_fidelity", help="the source of captions and scores")
    parser.add_argument("--noise", type=float, default=0.05, help="Bradley-Terry temperature of the labels (0: none)")
    parser.add_argument("--tie-margin", type=float, default=0.02, help="score gap at or below which a pair is a tie")
    parser.add_argument("--batch", type=int, default=64, help="captions sampled at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides of the policy (e.g. policy.num_steps=10)")
    args = parser.parse_args(argv)
    for name in ("pairs", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.validation_pairs < 0 or args.noise < 0 or args.tie_margin < 0:
        parser.error("--validation-pairs, --noise and --tie-margin must be >= 0")

    from hydra.utils import instantiate

    from rlplat import registry
    from rlplat.config import compose
    from rlplat.pairs import write_pairs

    cfg = compose(["experiment=d3po_tiny", f"policy={args.policy}", f"preference={args.preference}", *args.overrides])
    registry.preflight("policy", cfg.policy)
    policy = instantiate(cfg.policy, _convert_="all")
    source = instantiate(cfg.preference, _convert_="all")
    report: dict[str, Any] = {"policy": args.policy, "preference": args.preference, "noise": args.noise,
                              "tie_margin": args.tie_margin, "seed": args.seed}
    first_id = 0
    for split, prompts, pairs in (("train", source.train_prompts, args.pairs),
                                  ("validation", source.eval_prompts, args.validation_pairs)):
        if pairs == 0:
            continue
        rows, counts = make_split(policy, source, prompts, pairs, args.batch, args.noise, args.tie_margin,
                                  args.seed + (split == "validation"), args.policy, first_id)
        first_id += len(rows)
        path = write_pairs(rows, args.out / "data" / f"{split}-00000-of-00001.parquet")
        report[split] = {**counts, "file": str(path)}
        print(f"{split}: {counts['pairs']} pairs, {counts['ties']} ties, label agrees with the score on "
              f"{counts['label_agrees_with_score']:.1%} of the others -> {path}")
    (args.out / "make_pairs.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
