#!/usr/bin/env bash
# One D3PO update on a Stable Diffusion 1.5-shaped model on one H100-class GPU (< 10 minutes):
# LoRA vs full UNet, time and peak memory. With real weights: pass --path /data/sd15 (diffusers
# layout); without, random weights in SD1.5's shapes are built first (a few GB in a temp dir).
# Writes bench/results/diffusion_step_sd15.json. Extra arguments go to bench/diffusion_step.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 570 python bench/diffusion_step.py --shape sd15 --device cuda --steps 20 --pairs 4 --bf16 \
    --out bench/results/diffusion_step_sd15.json "$@"
