"""Action decoding speed of the tiny OpenVLA: one batched KV-cached call vs one env at a time.

    python bench/decode.py                 # batch 8, 7 action tokens
    python bench/decode.py --batch 16 --repeats 50

Decodes ``--action-dim`` action tokens greedily for ``--batch`` observations (random images,
toy-env instructions) in three ways, all through the same model:
- batched: one ``generate_actions`` call for the whole batch (one prefill, D-1 cached steps);
- per env: ``--batch`` calls with batch 1 (what a loop over envs costs);
- batched, no KV cache: the whole prompt + tokens re-run for every token (what the cache saves).
Reports the median of ``--repeats`` timings, the speedup ratios (target: batched >= 5x faster
than per env) and the tiny model's size (parameters, bytes, process peak RSS), as a table and as
JSON in bench/results/decode.json. Run with the machine otherwise idle; ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rlplat.policies.openvla.modeling import OpenVLAForActionPrediction
from rlplat.policies.openvla.policy import ensure_tiny, load


@torch.no_grad()
def decode_uncached(vla: OpenVLAForActionPrediction, inputs: dict[str, torch.Tensor], tokenizer, steps: int) -> torch.Tensor:
    """Greedy action tokens [B, D] by re-running the full sequence for every token (no KV cache)."""
    low = tokenizer.action_token_range[0]
    prompt = vla.embed_prompt(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    embeds, mask, positions = prompt.embeds, prompt.attention_mask, prompt.position_ids
    tokens = []
    for _ in range(steps):
        hidden = vla._decode(embeds, mask, positions)[:, -1]
        choice = vla._action_logits(hidden, tokenizer).argmax(-1) + low
        tokens.append(choice)
        embeds = torch.cat([embeds, vla.get_input_embeddings()(choice[:, None])], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return torch.stack(tokens, dim=1)


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--action-dim", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings)")
    parser.add_argument("--cache-dir", default=None, help="tiny-model cache (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = ensure_tiny(args.cache_dir or tempfile.mkdtemp(prefix="rlplat-decode-"),
                         action_dim=args.action_dim, image_size=args.image_size)
    model, processor, tokenizer, _ = load(folder)
    vla = model
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    words = ["red", "green", "blue", "yellow"]
    instructions = [f"reach the {words[i % 4]} square" for i in range(args.batch)]
    batch_inputs = processor(images, instructions)
    single_inputs = [processor(images[i : i + 1], instructions[i : i + 1]) for i in range(args.batch)]

    def batched() -> torch.Tensor:
        return vla.generate_actions(**batch_inputs, action_tokenizer=tokenizer)[0]

    def per_env() -> list[torch.Tensor]:
        return [vla.generate_actions(**x, action_tokenizer=tokenizer)[0] for x in single_inputs]

    def uncached() -> torch.Tensor:
        return decode_uncached(vla, batch_inputs, tokenizer, args.action_dim)

    # Same greedy tokens every way, or the timings compare different work.
    reference = batched()
    if not torch.equal(reference, torch.cat(per_env())) or not torch.equal(reference, uncached()):
        raise SystemExit("batched, per-env and uncached decoding disagree; the benchmark would be meaningless")

    t_batched = median_s(batched, args.repeats)
    t_per_env = median_s(per_env, args.repeats)
    t_uncached = median_s(uncached, args.repeats)
    n_params = sum(p.numel() for p in vla.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in vla.parameters())
    result = {
        "batch": args.batch, "action_tokens": args.action_dim, "image_size": args.image_size,
        "prompt_tokens": int(batch_inputs["input_ids"].shape[1]), "threads": args.threads,
        "batched_ms": 1e3 * t_batched, "per_env_ms": 1e3 * t_per_env, "uncached_batched_ms": 1e3 * t_uncached,
        "speedup_batched_vs_per_env": t_per_env / t_batched,
        "speedup_kv_cache": t_uncached / t_batched,
        "actions_per_s_batched": args.batch / t_batched, "actions_per_s_per_env": args.batch / t_per_env,
        "model_params": n_params, "model_mb": n_bytes / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "target_speedup": 5.0,
    }
    print(f"{'mode':<28} {'ms / batch of ' + str(args.batch):>18} {'actions/s':>10}")
    print(f"{'batched, KV cache':<28} {result['batched_ms']:>18.2f} {result['actions_per_s_batched']:>10.0f}")
    print(f"{'one env at a time':<28} {result['per_env_ms']:>18.2f} {result['actions_per_s_per_env']:>10.0f}")
    print(f"{'batched, no KV cache':<28} {result['uncached_batched_ms']:>18.2f} {args.batch / t_uncached:>10.0f}")
    print(f"speedup batched vs per env: {result['speedup_batched_vs_per_env']:.1f}x (target >= 5x); "
          f"KV cache: {result['speedup_kv_cache']:.1f}x")
    print(f"tiny model: {n_params:,} params, {result['model_mb']:.2f} MiB; process peak RSS {result['peak_rss_mb']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
