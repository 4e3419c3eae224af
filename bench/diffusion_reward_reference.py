"""Reference points for the text-to-image learning benchmark's rewards: where its targets sit.

    python bench/diffusion_reward_reference.py          # ~3 min on one core

Scores (JPEG size in kB at quality 95, as ``preference=jpeg_compressibility`` measures it, and
the shapes-world prompt fidelity) of images for the 14 held-out captions, cycled to
``--images``: the shapes world's own renders (what pretraining imitates: fidelity 1 by
construction), the same renders with Gaussian pixel noise, blurred (six radii), with an off-white
background, a blank white image, and samples of the two shipped bases (10 DDIM steps, guidance
3, the settings of the learning benchmark, fixed seeds; the early base also at the other
``--guidance`` scales: whether sampling with another guidance weight would start the fidelity
runs higher). For the bases it also splits the fidelity into its colour / count / shape parts,
and (``--per-caption`` samples of each held-out caption) what choosing among the base's own
samples reaches: the expected best fidelity of n samples, and the expected smallest JPEG of n
among those with fidelity >= 0.8. Every model is also sampled on the 40 training captions (the
prompts a tuning run samples; each as often as a held-out caption), so a tuned model's rows show
whether its gain carries to the captions it never saw; ``--model NAME=DIR`` adds such a model (a
run's ``checkpoints/step_N`` folder, or any folder ``policy.path`` loads). Writes
bench/results/diffusion_reward_reference.json and prints the tables.

    python bench/diffusion_reward_reference.py --model d3po=RUN/checkpoints/step_200 --out /tmp/ref.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

import rlplat.policies.diffusion
from rlplat import checkpoint
from rlplat.envs.preference.proxy import jpeg_size_kb
from rlplat.envs.preference.shapes import ShapesFidelity, fidelity_parts, parse_caption, prompt_split, render
from rlplat.policies.diffusion.pipeline import TextToImagePolicy
from rlplat.workers.weights import PRETRAINED_DIR

# The shipped bases (policy=diffusion_tiny_shapes, diffusion_tiny_shapes_early).
ASSETS = Path(rlplat.policies.diffusion.__file__).parent / "assets"
BASES = {"shapes_base": ASSETS / "shapes_base", "shapes_early": ASSETS / "shapes_early"}


def row(name: str, images: np.ndarray, captions: list[str]) -> dict[str, float | str]:
    """Mean JPEG size and fidelity of ``images`` for ``captions``, and the fidelity's parts."""
    parts = np.array([[p["color"], p["count"], p["shape"]] for p in
                      (fidelity_parts(image, parse_caption(c)) for image, c in zip(images, captions, strict=True))])
    return {"images": name, "jpeg_kb": float(jpeg_size_kb(images).mean()),
            "fidelity": float(ShapesFidelity()(images, captions).mean()),
            "color": float(parts[:, 0].mean()), "count": float(parts[:, 1].mean()), "shape": float(parts[:, 2].mean())}


def best_of_n(values: np.ndarray, n: int) -> float:
    """Expected largest of ``n`` values drawn without replacement from ``values`` (exact: the i-th
    smallest of K is the largest of the draw with probability C(i-1, n-1) / C(K, n))."""
    v = np.sort(values)
    weights = np.array([math.comb(i, n - 1) for i in range(len(v))], dtype=float) / math.comb(len(v), n)
    return float(weights @ v)


def selection(policy: TextToImagePolicy, heldout: list[str], per_caption: int, seed: int) -> dict[str, object]:
    """What choosing among a base's own samples reaches: ``per_caption`` samples of each held-out
    caption, then per caption the expected best of n (prompt fidelity), and the expected smallest
    JPEG of n among the samples with fidelity >= 0.8 (the JPEG target's floor), averaged over captions.
    Preference tuning that sharpens the base toward its better samples lands near some best-of-n."""
    captions = [c for c in heldout for _ in range(per_caption)]
    chunks = []
    for start in range(0, len(captions), 64):
        with torch.no_grad():
            chunks.append(policy.sample_trajectory(captions[start:start + 64],
                                                   generator=torch.Generator().manual_seed(seed + start))["images"].numpy())
    images = np.concatenate(chunks)
    fidelity = ShapesFidelity()(images, captions).reshape(len(heldout), per_caption)
    jpeg = jpeg_size_kb(images).reshape(len(heldout), per_caption)
    ns = [n for n in (1, 2, 4, 8, 16) if n <= per_caption]
    kept = [row_jpeg[row_fid >= 0.8] for row_jpeg, row_fid in zip(jpeg, fidelity, strict=True)]
    fewest = min(len(k) for k in kept)
    return {
        "samples_per_caption": per_caption,
        "fidelity": float(fidelity.mean()), "jpeg_kb": float(jpeg.mean()),
        "share_fidelity_ge_0.85": float((fidelity >= 0.85).mean()),
        "captions_without_a_sample_ge_0.85": int(((fidelity >= 0.85).sum(1) == 0).sum()),
        "fidelity_best_of_n": {n: float(np.mean([best_of_n(r, n) for r in fidelity])) for n in ns},
        "jpeg_kb_smallest_of_n_with_fidelity_ge_0.8": (
            {n: float(np.mean([-best_of_n(-k, n) for k in kept])) for n in ns if n <= fewest}),
        "fewest_samples_with_fidelity_ge_0.8": fewest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=10, help="DDIM steps of the base samples")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5],
                        help="classifier-free guidance scales of the early base's samples (the runs use 3)")
    parser.add_argument("--per-caption", type=int, default=32,
                        help="samples per held-out caption for the best-of-n selection of each base")
    parser.add_argument("--model", nargs="+", default=[], metavar="NAME=DIR",
                        help="more models to sample like the bases (a run's checkpoints/step_N, or a diffusers folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusion_reward_reference.json")
    args = parser.parse_args()
    models = dict(BASES)
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not (sep and name and folder):
            raise SystemExit(f"--model {spec!r}: expected NAME=DIR (a folder policy.path loads)")
        if name in models:
            raise SystemExit(f"--model {spec!r}: the name {name!r} is taken; choose another")
        # A run's checkpoints/step_N folder: the policy's export inside it.
        export = Path(folder) / checkpoint.POLICY / PRETRAINED_DIR
        models[name] = export if export.is_dir() else Path(folder)
    torch.set_num_threads(1)
    train, heldout = prompt_split()
    captions = [heldout[i % len(heldout)] for i in range(args.images)]
    # Each training caption as often as a held-out caption is on average (64 images: 5 of each of 40).
    train_captions = [c for c in train for _ in range(max(1, round(args.images / len(heldout))))]
    rng = np.random.default_rng(args.seed)
    renders = np.stack([render(parse_caption(c), 32, rng) for c in captions])
    rows = [row("shapes-world renders", renders, captions)]
    for sigma in (2, 4, 8):
        noisy = np.clip(renders + rng.normal(0.0, sigma, renders.shape), 0, 255).astype(np.uint8)
        rows.append(row(f"renders + noise (std {sigma}/255)", noisy, captions))
    # Softer edges compress better and read worse: the radii bracket the JPEG target's corner.
    for radius in (0.5, 0.7, 0.9, 1.0, 1.2, 1.5):
        blurred = np.stack([np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
                            for image in renders])
        rows.append(row(f"renders blurred (Gaussian, radius {radius} px)", blurred, captions))
    off_white = renders.copy()
    off_white[(renders == 255).all(-1)] = 245
    rows.append(row("renders on off-white (245)", off_white, captions))
    rows.append(row("blank white", np.full_like(renders, 255), captions))
    selections: dict[str, dict[str, object]] = {}
    for name, path in models.items():
        policy = TextToImagePolicy(path=str(path), num_steps=args.num_steps, lora={"r": 0})
        # The runs' guidance (the policy's) first, then the training captions at that scale; the
        # early base also at the other --guidance scales.
        others = [g for g in args.guidance if g != policy.guidance_scale] if name == "shapes_early" else []
        draws = [(policy.guidance_scale, captions, ""),
                 (policy.guidance_scale, train_captions, ", train captions"),
                 *((g, captions, f", guidance {g:g}") for g in others)]
        for scale, prompts, label in draws:
            with torch.no_grad():
                images = policy.sample_trajectory(prompts, generator=torch.Generator().manual_seed(args.seed),
                                                  guidance_scale=scale)["images"]
            rows.append(row(f"{name} samples ({args.num_steps} DDIM steps{label})", images.numpy(), prompts))
        if name in BASES:
            selections[name] = selection(policy, heldout, args.per_caption, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "selection": selections}, indent=1))
    print(f"{'images':<52} {'JPEG kB':>8} {'fidelity':>8} {'colour':>7} {'count':>6} {'shape':>6}")
    for r in rows:
        print(f"{r['images']:<52} {r['jpeg_kb']:>8.3f} {r['fidelity']:>8.3f} {r['color']:>7.3f} {r['count']:>6.3f} "
              f"{r['shape']:>6.3f}")
    ns = list(next(iter(selections.values()))["fidelity_best_of_n"])
    print(f"\nbest of n of the bases' own samples ({args.per_caption} per held-out caption), mean over captions")
    print(f"{'base':<14} {'quantity':<40} " + " ".join(f"{'n=' + str(n):>7}" for n in ns))
    for name, sel in selections.items():
        for key, label in (("fidelity_best_of_n", "fidelity, best of n"),
                           ("jpeg_kb_smallest_of_n_with_fidelity_ge_0.8", "JPEG kB, smallest of n with fidelity>=0.8")):
            print(f"{name:<14} {label:<40} " + " ".join(f"{sel[key][n]:>7.3f}" if n in sel[key] else f"{'-':>7}"
                                                         for n in ns))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
