"""Reference points for the text-to-image learning benchmark's rewards: where its targets sit.

    python bench/diffusion_reward_reference.py          # ~1 min on one core

Scores (JPEG size in kB at quality 95, as ``preference=jpeg_compressibility`` measures it, and
the shapes-world prompt fidelity) of images for the 14 held-out captions, cycled to
``--images``: the shapes world's own renders (what pretraining imitates: fidelity 1 by
construction), the same renders with Gaussian pixel noise, blurred, with an off-white
background, a blank white image, and samples of the two shipped bases (10 DDIM steps, guidance
3, the settings of the learning benchmark, fixed seeds). For the bases it also splits the
fidelity into its colour / count / shape parts. Writes bench/results/diffusion_reward_reference.json
and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

import rlplat.policies.diffusion
from rlplat.envs.preference.proxy import jpeg_size_kb
from rlplat.envs.preference.shapes import ShapesFidelity, fidelity_parts, parse_caption, prompt_split, render
from rlplat.policies.diffusion.pipeline import TextToImagePolicy

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=10, help="DDIM steps of the base samples")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusion_reward_reference.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, heldout = prompt_split()
    captions = [heldout[i % len(heldout)] for i in range(args.images)]
    rng = np.random.default_rng(args.seed)
    renders = np.stack([render(parse_caption(c), 32, rng) for c in captions])
    rows = [row("shapes-world renders", renders, captions)]
    for sigma in (2, 4, 8):
        noisy = np.clip(renders + rng.normal(0.0, sigma, renders.shape), 0, 255).astype(np.uint8)
        rows.append(row(f"renders + noise (std {sigma}/255)", noisy, captions))
    blurred = np.stack([np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7))) for image in renders])
    rows.append(row("renders blurred (Gaussian, radius 0.7 px)", blurred, captions))
    off_white = renders.copy()
    off_white[(renders == 255).all(-1)] = 245
    rows.append(row("renders on off-white (245)", off_white, captions))
    rows.append(row("blank white", np.full_like(renders, 255), captions))
    for name, path in BASES.items():
        policy = TextToImagePolicy(path=str(path), num_steps=args.num_steps, lora={"r": 0})
        with torch.no_grad():
            images = policy.sample_trajectory(captions, generator=torch.Generator().manual_seed(args.seed))["images"]
        rows.append(row(f"{name} samples ({args.num_steps} DDIM steps)", images.numpy(), captions))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"{'images':<44} {'JPEG kB':>8} {'fidelity':>8} {'colour':>7} {'count':>6} {'shape':>6}")
    for r in rows:
        print(f"{r['images']:<44} {r['jpeg_kb']:>8.3f} {r['fidelity']:>8.3f} {r['color']:>7.3f} {r['count']:>6.3f} "
              f"{r['shape']:>6.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
