"""OpenVLA-7B on one GPU: batched action-decode throughput and one PPO step's time and memory.

    bash bench/gpu_openvla7b.sh                     # one H100-class GPU, < 10 minutes
    python bench/gpu_openvla7b.py --model tiny      # the same code path on CPU, tiny shape

Model: ``--model auto`` loads real openvla-7b weights when they are here ($OPENVLA_7B_PATH, or
openvla/openvla-7b in the local HF cache; OpenVLA's own format goes through our key mapping),
else builds a 7B-shaped random model directly on the GPU in bf16 (same shapes, same compute);
``random`` forces the random model, ``tiny`` uses the tiny preset (CPU, float32).
Decode: greedy KV-cached generation of the 7 action tokens for each ``--decode-batches`` size
(actions/s, ms per call, peak memory). PPO step: LoRA (rank ``--lora-r``, all linear layers)
plus value head, gradient checkpointing on the LLM; one rollout-style decode, then one update on
``--ppo-batch`` rows (teacher-forced log-probs, clipped surrogate + value loss, backward, AdamW
step): time and peak memory. Prints a table and writes JSON to bench/results/gpu_openvla7b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlplat.algos.losses import ppo_policy_loss, value_loss
from rlplat.policies.openvla.config import find_model_dir
from rlplat.policies.openvla.modeling import OpenVLAForActionPrediction, instantiate_on, openvla_7b_config
from rlplat.policies.openvla.policy import ensure_tiny, load


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build(kind: str, device: torch.device) -> tuple[OpenVLAForActionPrediction, Any, Any, str]:
    """(model with value head, processor or None, action tokenizer, where it came from)."""
    if kind == "tiny":
        folder = ensure_tiny(tempfile.mkdtemp(prefix="rlplat-gpu-bench-"), action_dim=7, image_size=32)
        model, processor, tokenizer, _ = load(folder, value_head=True)
        return model.to(device), processor, tokenizer, f"tiny preset ({folder})"
    if kind == "auto":
        try:
            folder = find_model_dir(os.environ.get("OPENVLA_7B_PATH", "openvla/openvla-7b"))
        except FileNotFoundError as err:
            print(f"no real weights ({str(err).splitlines()[0][:120]}...): building a 7B-shaped random model")
        else:
            model, processor, tokenizer, _ = load(folder, dtype=torch.bfloat16, device=device, value_head=True)
            return model, processor, tokenizer, f"real weights ({folder})"
    config = openvla_7b_config(value_head=True)
    model = instantiate_on(config, torch.bfloat16, device)
    return model.eval(), None, config.action_tokenizer(), "7B-shaped random init (bf16)"


def make_inputs(model: OpenVLAForActionPrediction, processor: Any, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of prompts + images in the model's input format."""
    config = model.config
    rng = np.random.default_rng(0)
    if processor is not None:
        side = config.siglip_config.image_size
        images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
        inputs = processor(images, ["pick up the red block and place it in the bowl"] * batch)
        return {k: v.to(device) for k, v in inputs.items()}
    # No tokenizer files with random weights: token ids of the prompt's length (Llama-2's
    # tokenizer gives ~25 ids for it), BOS first; pixels for both fused towers.
    length = 25
    ids = torch.as_tensor(rng.integers(3, 31000, (batch, length)), device=device)
    ids[:, 0] = config.text_config.bos_token_id or 1
    channels = 6 if config.use_fused_vision_backbone else 3
    side = config.siglip_config.image_size
    pixels = torch.randn(batch, channels, side, side, device=device, dtype=model.dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def bench_decode(model, processor, tokenizer, batches: list[int], repeats: int, device: torch.device) -> list[dict]:
    rows = []
    for batch in batches:
        inputs = make_inputs(model, processor, batch, device)
        reset_peak(device)
        model.generate_actions(**inputs, action_tokenizer=tokenizer)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.generate_actions(**inputs, action_tokenizer=tokenizer)
        sync(device)
        dt = (time.perf_counter() - t0) / repeats
        rows.append({"batch": batch, "ms_per_call": 1e3 * dt, "actions_per_s": batch / dt,
                     "tokens_per_s": batch * model.config.action_dim / dt, "peak_gib": peak_gib(device)})
        print(f"decode batch {batch:>4}: {1e3 * dt:8.1f} ms/call {batch / dt:9.1f} actions/s "
              f"peak {rows[-1]['peak_gib'] or 0:.1f} GiB", flush=True)
    return rows


def bench_ppo_step(model, processor, tokenizer, batch: int, lora_r: int, device: torch.device) -> dict:
    from peft import LoraConfig, get_peft_model

    model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=16, target_modules="all-linear",
                                                  modules_to_save=["value_head"]))
    vla = peft_model.base_model.model
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    inputs = make_inputs(vla, processor, batch, device)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    vla.eval()
    tokens, logprobs = vla.generate_actions(**inputs, action_tokenizer=tokenizer, do_sample=True)
    old_logp = logprobs.sum(-1).float()
    sync(device)
    t_rollout = time.perf_counter() - t0
    vla.train()
    t1 = time.perf_counter()
    out = vla.evaluate_actions(**inputs, action_token_ids=tokens, action_tokenizer=tokenizer)
    advantages = torch.randn(batch, device=device)
    pg, metrics = ppo_policy_loss(out["action_logprob"], old_logp, advantages, clip_coef=0.2)
    returns = torch.randn(batch, device=device)
    loss = pg + 0.5 * value_loss(out["values"], out["values"].detach(), returns, None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    t_update = time.perf_counter() - t1
    result = {"batch": batch, "lora_r": lora_r, "trainable_params": n_trainable,
              "rollout_decode_s": t_rollout, "update_s": t_update, "peak_gib": peak_gib(device),
              "loss": float(loss.detach()), "ratio_mean": float(metrics["ratio_mean"])}
    print(f"PPO step batch {batch}, LoRA r={lora_r} ({n_trainable / 1e6:.1f}M trainable): decode "
          f"{t_rollout:.2f} s, update {t_update:.2f} s, peak {result['peak_gib'] or 0:.1f} GiB, "
          f"ratio {result['ratio_mean']:.4f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["auto", "random", "tiny"], default="auto")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ppo-batch", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_openvla7b.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; run on a GPU machine or pass --model tiny --device cpu")

    t0 = time.perf_counter()
    model, processor, tokenizer, source = build(args.model, device)
    t_load = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {source}, {n_params / 1e9:.2f}B params, built/loaded in {t_load:.0f} s "
          f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)
    decode = bench_decode(model, processor, tokenizer, args.decode_batches, args.repeats, device)
    ppo = bench_ppo_step(model, processor, tokenizer, args.ppo_batch, args.lora_r, device)
    result = {"model": source, "params": n_params, "load_s": t_load, "device": str(device),
              "decode": decode, "ppo_step": ppo, "total_s": time.perf_counter() - t0}
    print(f"\n{'decode batch':>12} {'ms/call':>10} {'actions/s':>10} {'peak GiB':>9}")
    for row in decode:
        print(f"{row['batch']:>12} {row['ms_per_call']:>10.1f} {row['actions_per_s']:>10.1f} {row['peak_gib'] or 0:>9.1f}")
    print(f"PPO step (batch {ppo['batch']}, LoRA r={ppo['lora_r']}, grad ckpt): update {ppo['update_s']:.2f} s, "
          f"peak {ppo['peak_gib'] or 0:.1f} GiB; total {result['total_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
