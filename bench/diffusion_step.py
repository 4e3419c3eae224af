"""One D3PO or Diffusion-DPO update on a text-to-image UNet: time and peak memory, LoRA vs full fine-tuning.

    python bench/diffusion_step.py                         # tiny model on CPU, both variants
    python bench/diffusion_step.py --shape sd15 --device cuda --steps 20 --pairs 4   # one GPU
    python bench/diffusion_step.py --algo dpo --pairs 8    # one Diffusion-DPO optimizer step

``--algo dpo``: one optimizer step of ``DiffusionDPO.update`` on ``--pairs`` pairs of random
images at the model's resolution, ``--micro-batch`` pairs per pass (the reference is the adapter
disabled for LoRA and a frozen copy, bfloat16 on a GPU, for full fine-tuning, so the full
variant's memory includes the copy). Otherwise (D3PO):

Each variant runs in a fresh subprocess (so the process's peak memory is its own): build or load
the model, sample ``--pairs`` pairs of ``--steps`` DDIM steps sharing x_T, label them with JPEG
compressibility, then one D3PO update over every step (backward per step, one optimizer step).
Both variants use the sampled log-probs as the D3PO reference, so they differ only in what
trains. Reports wall time of sampling and of the update, and peak memory (CUDA: max allocated
during the update; CPU: the subprocess's peak RSS, model included), then LoRA/full ratios,
as a table and JSON in bench/results/diffusion_step.json. ``--shape sd15`` builds a Stable
Diffusion 1.5-shaped model with random weights (UNet 860M, CLIP-L text encoder, VAE) when
``--path`` is not given.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TINY = {"image_size": 32, "fold": 2, "block_out_channels": [64, 128], "text_hidden_size": 32}


def build_sd15_shaped(folder: Path) -> Path:
    """SD1.5's UNet / VAE / text-encoder shapes with random weights, plus the tiny word tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlplat.policies.diffusion.pipeline import build_tiny_tokenizer

    if (folder / "unet" / "config.json").is_file():
        return folder
    tokenizer = build_tiny_tokenizer(folder / "tokenizer", max_length=77)
    CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tokenizer), 49408), hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                 projection_dim=768)).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, sample_size=512).save_pretrained(folder / "vae")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    return folder


def run_dpo_step(args: argparse.Namespace, policy, device: torch.device) -> dict:
    """One Diffusion-DPO optimizer step on random pairs: the numbers for the table."""
    from rlplat.algos.dpo import DiffusionDPO
    from rlplat.algos.optim import build_optimizer
    from rlplat.batch import Batch

    algo = DiffusionDPO(beta=5000.0, batch_size=args.pairs, micro_batch=args.micro_batch, num_minibatches=1,
                        reference="auto", optim={"lr": 1e-5, "eps": 1e-8, "max_grad_norm": 1.0, "weight_decay": 0.0})
    algo.check(args.lora_r if args.variant == "lora" else 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    algo.attach(policy)
    optimizer = build_optimizer(policy.param_groups(1e-5), algo.optim)
    side = policy.latent_shape[-1] * (8 if policy.vae is not None else policy.fold)
    rng = np.random.default_rng(0)
    images = torch.as_tensor(rng.integers(0, 256, (2, args.pairs, side, side, 3), dtype=np.uint8))
    captions = ["a red circle", "two blue squares", "three green triangles", "a yellow square"]
    prompts = (captions * args.pairs)[: args.pairs]
    batch = Batch({"images_w": images[0], "images_l": images[1]}, extras={"prompts": prompts})
    policy.train()
    t1 = time.perf_counter()
    metrics = algo.update(policy, optimizer, batch, torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_update = time.perf_counter() - t1
    params = [p for p in policy.parameters() if p.requires_grad]
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": args.variant, "trainable_params": sum(p.numel() for p in params),
            "unet_params": sum(p.numel() for p in policy.unet.parameters()), "sample_s": 0.0, "update_s": t_update,
            "peak_mb": peak, "pairs": args.pairs, "micro_batch": args.micro_batch, "loss": metrics["train/loss"],
            "reference": "adapter disabled" if algo.reference_model is None else "frozen copy",
            "peak_kind": "CUDA max allocated in the step" if device.type == "cuda" else "process peak RSS"}


def run_variant(args: argparse.Namespace) -> dict:
    """One variant, in this process: the numbers for the table."""
    from rlplat.algos.d3po import d3po_step_loss, order_pairs
    from rlplat.envs.preference.proxy import JpegCompressibility, preference_labels
    from rlplat.policies.diffusion.pipeline import TextToImagePolicy

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = args.path
    if args.shape == "sd15" and not path:
        path = str(build_sd15_shaped(Path(args.cache_dir) / "sd15_shaped"))
    lora = {"r": args.lora_r} if args.variant == "lora" else None
    policy = TextToImagePolicy(path=path, tiny=TINY if not path else None, cache_dir=args.cache_dir, device=args.device,
                               num_steps=args.steps, guidance_scale=args.guidance, lora=lora,
                               dtype="bfloat16" if args.bf16 else "float32")
    if args.algo == "dpo":
        return run_dpo_step(args, policy, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    prompts = ["a red circle", "two blue squares", "three green triangles", "a yellow square"] * args.pairs
    prompts = prompts[: args.pairs]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn((len(prompts), *policy.latent_shape), generator=generator)
    first, second = (policy.sample_trajectory(prompts, generator=generator, latents=x_T) for _ in range(2))
    score = JpegCompressibility()
    a_preferred, keep = preference_labels(score(first["images"].numpy(), prompts), score(second["images"].numpy(), prompts),
                                          ties="random", rng=np.random.default_rng(0))
    pairs = order_pairs(first, second, a_preferred, keep)
    sync()
    t_sample = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    policy.train()
    t1 = time.perf_counter()
    for k in range(args.steps):
        # The sampled log-probs as the reference in both variants, so they differ only in what trains.
        loss, _ = d3po_step_loss(policy, pairs, k, reference="sampled")
        (loss / args.steps).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    t_update = time.perf_counter() - t1
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": args.variant, "trainable_params": sum(p.numel() for p in params),
            "unet_params": sum(p.numel() for p in policy.unet.parameters()), "sample_s": t_sample,
            "update_s": t_update, "peak_mb": peak, "pairs": len(pairs),
            "peak_kind": "CUDA max allocated in the update" if device.type == "cuda" else "process peak RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", choices=["d3po", "dpo"], default="d3po")
    parser.add_argument("--micro-batch", type=int, default=None, help="dpo: pairs per forward pass (default: --pairs)")
    parser.add_argument("--shape", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--path", default=None, help="a local diffusers folder (e.g. real SD1.5) instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sample")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--lora-r", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--variant", choices=["lora", "full"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusion_step.json")
    args = parser.parse_args()
    args.micro_batch = args.micro_batch or args.pairs
    if args.variant:  # child process: one variant, JSON on the last stdout line
        print(json.dumps(run_variant(args)))
        return
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="rlplat-diffusion-step-")
    forwarded = ["--algo", args.algo, "--micro-batch", str(args.micro_batch),
                 "--shape", args.shape, "--device", args.device, "--steps", str(args.steps), "--pairs",
                 str(args.pairs), "--guidance", str(args.guidance), "--lora-r", str(args.lora_r), "--threads",
                 str(args.threads), "--cache-dir", args.cache_dir, *(["--path", args.path] if args.path else []),
                 *(["--bf16"] if args.bf16 else [])]
    rows = []
    for variant in ("lora", "full"):
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--variant", variant], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    lora, full = rows
    result = {"algo": args.algo,
              "shape": args.shape, "path": args.path, "device": args.device, "steps": args.steps, "pairs": args.pairs,
              "guidance": args.guidance, "variants": rows,
              "update_time_ratio_lora_over_full": lora["update_s"] / full["update_s"],
              "peak_memory_ratio_lora_over_full": lora["peak_mb"] / full["peak_mb"] if full["peak_mb"] > 0 else None}
    print(f"{'variant':<8} {'trainable':>12} {'sample s':>9} {'update s':>9} {'peak MiB':>9}")
    for row in rows:
        print(f"{row['variant']:<8} {row['trainable_params']:>12,} {row['sample_s']:>9.2f} {row['update_s']:>9.2f} "
              f"{row['peak_mb']:>9.1f}")
    print(f"LoRA / full: update time {result['update_time_ratio_lora_over_full']:.2f}, peak memory "
          f"{result['peak_memory_ratio_lora_over_full'] or float('nan'):.2f} ({rows[0]['peak_kind']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
