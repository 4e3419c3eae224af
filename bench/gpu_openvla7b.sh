#!/usr/bin/env bash
# OpenVLA-7B on one H100-class GPU (< 10 minutes): decode throughput and one PPO step's memory.
# Real weights: export OPENVLA_7B_PATH=/data/openvla-7b (or have openvla/openvla-7b in the HF
# cache); without them a 7B-shaped random model is built on the GPU. Writes
# bench/results/gpu_openvla7b.json. Extra arguments go to bench/gpu_openvla7b.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 570 python bench/gpu_openvla7b.py "$@"
