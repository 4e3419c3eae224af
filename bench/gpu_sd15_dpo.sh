#!/usr/bin/env bash
# Diffusion-DPO on a Stable Diffusion 1.5-shaped model on one H100-class GPU (< 10 minutes): one
# optimizer step of 16 pairs at 512 px (4 and 16 pairs per forward pass), LoRA (reference: the
# adapter disabled) vs full fine-tuning (reference: a frozen bfloat16 copy): time and peak memory.
# With real weights: export SD15_PATH=/data/sd15 (diffusers layout); without, random weights in
# SD1.5's shapes are built first (a few GB in a temp dir). Writes bench/results/dpo_step_sd15_mb<N>.json.
# The training preset itself: rlplat-train experiment=dpo_sd15_pickapic (README, "Offline human preferences").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
path_args=()
if [[ -n "${SD15_PATH:-}" ]]; then path_args=(--path "$SD15_PATH"); fi
for micro in 4 16; do
    timeout 270 python bench/diffusion_step.py --algo dpo --shape sd15 --device cuda --pairs 16 \
        --micro-batch "$micro" --bf16 "${path_args[@]}" --out "bench/results/dpo_step_sd15_mb${micro}.json"
done
