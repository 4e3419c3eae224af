#!/usr/bin/env bash
# One H100-class GPU, under 10 minutes: ManiSkill3 PushCube-v1 on physx_cuda with 1024 and 4096
# envs in one batched env, raw simulator steps/s vs the platform's rollout steps/s with a no-op
# policy (the overhead ratio; controller path and placement.rollout_in_env), written to
# bench/results/rollout_gpu_maniskill_<envs>.json.
#
#   bash bench/gpu_maniskill.sh        # from the repository root, after the README's install
#                                      # plus: pip install -e ".[maniskill]"
# The NVIDIA driver provides SAPIEN's Vulkan device; scripts/setup_system.sh is not needed here.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 WANDB_MODE=offline MS_SKIP_ASSET_DOWNLOAD_PROMPT=1
export MS_ASSET_DIR="${MS_ASSET_DIR:-$PWD/.cache/maniskill}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for envs in 1024 4096; do
    timeout 270 python bench/rollout.py --env maniskill --sim-backend physx_cuda --gpu --num-cpus 8 \
        --noop-envs "${envs}x1" --episode-steps 50 --parts noop --repeats 3 \
        --out "bench/results/rollout_gpu_maniskill_${envs}.json"
done
