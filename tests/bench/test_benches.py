"""The benchmark scripts run end to end on CPU with tiny presets (their numbers are not judged here)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()


def test_decode_bench_agrees_across_modes_and_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "decode.json"
    # main() exits if batched, per-env and uncached decoding give different tokens.
    run_main(load_script("decode"), ["--batch", "3", "--action-dim", "7", "--repeats", "1",
                                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    assert result["batch"] == 3 and result["action_tokens"] == 7
    for key in ("batched_ms", "per_env_ms", "uncached_batched_ms", "speedup_batched_vs_per_env"):
        assert result[key] > 0
    assert 10_000 < result["model_params"] < 10_000_000


def test_uncached_decode_matches_generate(tmp_path: Path) -> None:
    import numpy as np
    import torch

    decode = load_script("decode")
    from rlplat.policies.openvla.policy import ensure_tiny, load

    model, processor, tokenizer, _ = load(ensure_tiny(tmp_path, action_dim=4, image_size=32))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial model: spread the LM head so greedy choices differ by row
        model.get_output_embeddings().weight.normal_(0, 1)
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    inputs = processor(images, ["reach the red square", "go", "touch the blue square", "a", "move"])
    cached = model.generate_actions(**inputs, action_tokenizer=tokenizer)[0]
    assert torch.equal(decode.decode_uncached(model, inputs, tokenizer, 4), cached)
    assert len({tuple(r) for r in cached.tolist()}) > 1


def test_gpu_script_runs_the_tiny_shape_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "gpu.json"
    run_main(load_script("gpu_openvla7b"), ["--model", "tiny", "--device", "cpu", "--decode-batches", "1", "2",
                                            "--repeats", "1", "--ppo-batch", "2", "--lora-r", "4", "--out", str(out)],
             monkeypatch)
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    ppo = result["ppo_step"]
    # LoRA + value head only, and the first update starts on-policy (ratio 1).
    assert 0 < ppo["trainable_params"] < result["params"]
    assert math.isfinite(ppo["loss"])
    assert ppo["ratio_mean"] == pytest.approx(1.0, abs=1e-4)


# Stands in for ``python`` on PATH: runs the bench script until its arguments are parsed, notes the
# command line in $PARSED_LOG and exits 0; a bad argument exits 2 (argparse), which stops the
# calling shell script (set -e).
_PARSE_ONLY = """import argparse, os, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_only(self, *args, **kwargs):
    parse(self, *args, **kwargs)
    with open(os.environ["PARSED_LOG"], "a") as log:
        log.write(" ".join(sys.argv) + "\\n")
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_only
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
BENCH = Path(__file__).parents[2] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("gpu_*.sh")))
def test_gpu_shell_scripts_pass_arguments_their_benches_accept(script: str, tmp_path: Path) -> None:
    # The GPU scripts run only on a lent GPU machine; their command lines are checked here.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "parse_only.py").write_text(_PARSE_ONLY)
    (shim / "python").write_text(f'#!/bin/sh\nexec {sys.executable} {shim / "parse_only.py"} "$@"\n')
    (shim / "nvidia-smi").write_text("#!/bin/sh\necho 'no GPU: argument check only'\n")
    for tool in ("python", "nvidia-smi"):
        (shim / tool).chmod(0o755)
    log = tmp_path / "parsed.txt"
    proc = subprocess.run(["bash", str(BENCH / script)], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "PARSED_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith("bench/") for line in lines), lines


def test_diffusion_step_bench_runs_both_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "diffusion_step.json"
    run_main(load_script("diffusion_step"), ["--steps", "2", "--pairs", "2", "--cache-dir", str(tmp_path / "cache"),
                                             "--out", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    lora, full = result["variants"]
    assert (lora["variant"], full["variant"]) == ("lora", "full")
    # LoRA trains a small fraction of the same UNet; full trains all of it.
    assert 0 < lora["trainable_params"] < 0.05 * full["trainable_params"]
    assert full["trainable_params"] == full["unet_params"] == lora["unet_params"] - lora["trainable_params"]
    assert all(v["update_s"] > 0 and v["peak_mb"] > 0 and v["pairs"] == 2 for v in result["variants"])


def test_diffusion_step_bench_runs_one_dpo_step_with_each_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    out = tmp_path / "dpo_step.json"
    run_main(load_script("diffusion_step"), ["--algo", "dpo", "--pairs", "4", "--micro-batch", "2", "--cache-dir",
                                             str(tmp_path / "cache"), "--out", str(out)], monkeypatch)
    lora, full = json.loads(out.read_text())["variants"]
    assert (lora["reference"], full["reference"]) == ("adapter disabled", "frozen copy")
    # The first step starts at the reference (log 2) in both; the full variant trains the whole UNet.
    assert lora["loss"] == pytest.approx(math.log(2), abs=1e-3) and full["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert full["trainable_params"] == full["unet_params"] and lora["micro_batch"] == 2


def test_learning_diffusion_bench_runs_before_and_after_from_the_shipped_model(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "learning_diffusion.json"
    monkeypatch.setenv("RLPLAT_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--algos", "d3po", "--rewards", "jpeg_compressibility", "--seeds", "0", "--steps", "1",
            "--eval-images", "4", "--set", "policy.num_steps=2", "algo.batch_size=2", "trainer.torch_threads=1",
            "--out", str(out)]
    run_main(load_script("learning_diffusion"), argv, monkeypatch)
    result = json.loads(out.read_text())
    (row,) = result["runs"]
    assert row["curve"][0][0] == 0 and row["curve"][-1][0] == 4  # step 0 (before) and after 2 pairs
    assert row["before"] < 0 and row["after"] < 0  # minus kB
    summary = result["summary"]["d3po/jpeg_compressibility"]
    assert summary["gain_mean"] == pytest.approx(row["after"] - row["before"])
    assert (tmp_path / "learning_diffusion_grids" / "d3po_jpeg_compressibility_before.png").is_file()


def test_learning_diffusion_long_mode_stops_on_its_wall_clock_budget_and_keeps_curves_and_grids(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "long.json"
    monkeypatch.setenv("RLPLAT_CACHE_DIR", str(tmp_path / "cache"))
    budget_s = 3.0
    argv = ["--budget-min", str(budget_s / 60), "--eval-every", "1", "--algos", "ddpo", "--rewards",
            "jpeg_compressibility", "--seeds", "0", "--eval-images", "28", "--set", "policy.num_steps=3",
            # The preset trains the steps between its first 5 (shared within a group) and its last:
            # with 3 steps, the middle one, after a shared first step.
            "algo.skip_initial_steps=1", "algo.batch_size=2", "algo.group_size=2", "algo.num_minibatches=1",
            "trainer.stop_when=null",  # the preset's fidelity floor would stop the 3-step sampler at once
            "trainer.torch_threads=1",  # the preset takes both cores; pytest runs two files side by side
            "--out", str(out)]
    run_main(load_script("learning_diffusion"), argv, monkeypatch)
    result = json.loads(out.read_text())
    (row,) = result["runs"]
    curve = row["curve"]
    assert result["mode"] == "long" and row["preset"] == "ddpo_tiny_jpeg_long"
    assert row["stop_when"] is None and "trainer.time_budget_s=3 spent after step" in row["stopped"]
    # Evaluated at step 0 and after every iteration until the budget ran out; then the run stopped.
    assert [p["step"] for p in curve] == list(range(len(curve))) and row["iterations"] == curve[-1]["step"] >= 1
    assert curve[-1]["perf/elapsed_s"] >= budget_s and all(p["perf/elapsed_s"] < budget_s for p in curve[1:-1])
    assert [p["samples"] for p in curve] == [4 * p["step"] for p in curve]  # 2 prompts x 2 samples per iteration
    for p in curve:
        assert p["eval/reward"] < 0 and 0 <= p["eval/fidelity"] <= 1 and p["eval/diversity"] > 0
    assert all(p["train/kl_to_base"] >= 0 for p in curve[1:])
    assert row["before"] == curve[0] and row["final"] == curve[-1] and row["reached"]["target"] == -0.91
    assert row["reached"]["met"] == any(p["eval/reward"] >= -0.91 and p["eval/fidelity"] >= 0.8 for p in curve)
    # The best evaluation after the start: on JPEG among those that kept the fidelity floor.
    assert row["best_reward_any"]["eval/reward"] == max(p["eval/reward"] for p in curve[1:])
    floor_kept = [p for p in curve[1:] if p["eval/fidelity"] >= 0.8]
    assert row["best_reward"] == (max(floor_kept, key=lambda p: p["eval/reward"]) if floor_kept else None)
    grids = tmp_path / "long_grids"
    names = [f"ddpo_jpeg_compressibility_{share:03d}pct.png" for share in (0, 25, 50, 100)]
    assert sorted(f.name for f in grids.iterdir()) == names
    assert "step 0," in row["grids"]["0%"] and f"step {row['iterations']}," in row["grids"]["100%"]
    assert out.with_suffix(".png").stat().st_size > 1000

    # --merge joins cells run side by side (here the same record posing as a D3PO cell, evaluated
    # at another cadence), with their grids; the same cell twice or other settings are refused.
    other = json.loads(out.read_text())
    other["runs"][0]["algo"], other["settings"]["algos"], other["settings"]["eval_every"] = "d3po", ["d3po"], 2
    other["settings"]["set"] = ["algo.branch=true"]  # each run keeps its own overrides
    other["runs"][0]["grids"] = {k: v.replace("ddpo_", "d3po_") for k, v in other["runs"][0]["grids"].items()}
    del other["runs"][0]["best_reward_any"]  # a record from before that summary: the merge recomputes it
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "other_grids").mkdir()
    for name in names:
        shutil.copy(grids / name, tmp_path / "other_grids" / name.replace("ddpo_", "d3po_"))
    merged = tmp_path / "merged.json"
    script = load_script("learning_diffusion")
    run_main(script, ["--merge", str(out), str(tmp_path / "other.json"), "--out", str(merged)], monkeypatch)
    joined = json.loads(merged.read_text())
    assert [(r["algo"], r["reward"]) for r in joined["runs"]] == [("ddpo", "jpeg_compressibility"),
                                                                  ("d3po", "jpeg_compressibility")]
    assert joined["settings"]["algos"] == ["d3po", "ddpo"] and len(joined["settings"]["merged_from"]) == 2
    assert joined["settings"]["set"] is None and joined["runs"][0]["overrides"] == row["overrides"]
    assert joined["runs"][1]["best_reward_any"] == row["best_reward_any"]
    # A merged record merged again (its summaries recomputed) keeps the files it came from.
    run_main(script, ["--merge", str(merged), "--out", str(tmp_path / "again.json")], monkeypatch)
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["settings"]["merged_from"] == joined["settings"]["merged_from"] and again["runs"] == joined["runs"]
    # ... and joins a record that was never merged (a cell replaced by a new run).
    renamed = json.loads((tmp_path / "again.json").read_text())
    renamed["runs"] = [r for r in renamed["runs"] if r["algo"] == "ddpo"]
    (tmp_path / "without_d3po.json").write_text(json.dumps(renamed))
    shutil.copytree(tmp_path / "again_grids", tmp_path / "without_d3po_grids")
    run_main(script, ["--merge", str(tmp_path / "without_d3po.json"), str(tmp_path / "other.json"), "--out",
                      str(tmp_path / "replaced.json")], monkeypatch)
    replaced = json.loads((tmp_path / "replaced.json").read_text())
    assert [r["algo"] for r in replaced["runs"]] == ["ddpo", "d3po"]
    assert replaced["settings"]["merged_from"] == [*joined["settings"]["merged_from"], str(tmp_path / "other.json")]
    assert sorted(f.name for f in (tmp_path / "merged_grids").iterdir()) == sorted(
        names + [n.replace("ddpo_", "d3po_") for n in names])
    assert merged.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="a cell appears twice"):
        run_main(script, ["--merge", str(out), str(out), "--out", str(tmp_path / "twice.json")], monkeypatch)
    other["settings"]["budget_min"] = 30.0
    (tmp_path / "longer.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="ran other settings.*budget_min"):
        run_main(script, ["--merge", str(out), str(tmp_path / "longer.json"), "--out", str(tmp_path / "x.json")],
                 monkeypatch)


def test_learning_maniskill_bench_records_a_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.simulators import require_simulator

    require_simulator("mani_skill")
    out = tmp_path / "maniskill.json"
    small = ["--seeds", "0", "--steps", "2", "--eval-every", "1", "--eval-episodes", "2", "--out", str(out),
             "--by-steps", "20", "--set", "env.num_envs=2", "env.vector=sync", "env.max_episode_steps=10",
             "algo.rollout_steps=10", "algo.num_minibatches=2"]
    run_main(load_script("learning_maniskill"), small, monkeypatch)
    run_main(load_script("learning_maniskill"), [*small, "algo.bootstrap_at_done=truncated", "--label", "truncated"],
             monkeypatch)
    result = json.loads(out.read_text())
    # Both variants are kept side by side under their labels.
    assert set(result["variants"]) == {"preset", "truncated"}
    variant = result["variants"]["preset"]
    run_ = variant["runs"][0]
    points = run_["curve"]
    # Evaluations at steps 0 (before any update), 1 and 2: 2 envs x 10 steps per iteration.
    assert [p["env_steps"] for p in points] == [0, 20, 40]
    for p in points:
        assert 0.0 <= p["success_once"] <= 1.0 and 0.0 <= p["success_at_end"] <= 1.0
    assert points[-1]["wall_s"] > points[0]["wall_s"]
    # One diagnostics entry per iteration; the KL stop count is their sum.
    assert len(run_["train"]["explained_variance"]) == 2 and variant["kl_stops"] == [sum(run_["train"]["kl_stop"])]
    assert variant["table"][-1]["env_steps"] == 40
    summary = run_["summary"]
    first = next((p for p in points if p["success_once"] >= 0.9), None)
    assert summary["first_env_steps"] == (first and first["env_steps"])
    assert summary["passes"] == (first is not None and first["env_steps"] <= 20
                                 and min(p["success_once"] for p in points[1:]) >= 0.9)


def test_rollout_bench_measures_all_four_on_the_toy_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rollout.json"
    run_main(load_script("rollout"), ["--env", "toy", "--noop-envs", "4x1", "--episode-steps", "5", "--vla-num-envs", "4",
                                      "--vla-episode-steps", "3", "--repeats", "1", "--out", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    (noop,) = result["noop"]
    platform, in_env, vla = noop["platform"], noop["platform_in_env"], result["vla"]
    for rate in (noop["raw_steps_per_s"], noop["raw_steps_per_s_in_env"], platform["steps_per_s"],
                 in_env["steps_per_s"], vla["sequential"]["steps_per_s"], vla["pipelined"]["steps_per_s"]):
        assert rate > 0 and math.isfinite(rate)
    # Each platform variant is compared with the raw rounds it took turns with.
    assert noop["overhead_ratio"] == pytest.approx(platform["steps_per_s"] / noop["raw_steps_per_s"])
    assert noop["overhead_ratio_in_env"] == pytest.approx(in_env["steps_per_s"] / noop["raw_steps_per_s_in_env"])
    # In the env worker the policy's time is its own (no round trip), and part of the step.
    assert 0 < in_env["act_ms"] < in_env["act_ms"] + in_env["env_ms"] <= 1e3 * 4 / in_env["steps_per_s"] * 1.01
    # A bare actor call is part of what a platform step costs (a step makes two and more).
    trip, step_ms = result["ray_round_trip"], 1e3 * 4 / platform["steps_per_s"]  # 4 envs per step
    assert 0 < trip["ping_ms"] and 0 < trip["act_ms"] < 5 * step_ms
    assert vla["pipeline_speedup"] == pytest.approx(vla["pipelined"]["steps_per_s"] / vla["sequential"]["steps_per_s"])
    # The waits are parts of the rollout: positive, and together at most one step's time.
    seq = vla["sequential"]
    assert seq["act_ms"] > 0 and seq["env_ms"] > 0
    # 4 envs per step (2 pipeline stages of 2: a GRPO group of 2 never spans two env shards).
    assert seq["act_ms"] + seq["env_ms"] <= 1e3 * 4 / seq["steps_per_s"] * 1.01
    assert vla["overlap_bound"] == pytest.approx((seq["act_ms"] + seq["env_ms"]) / max(seq["act_ms"], seq["env_ms"]))


def test_recompute_logprobs_bench_reports_both_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "recompute.json"
    run_main(load_script("recompute_logprobs"), ["--num-envs", "2", "--steps", "2", "--minibatches", "2",
                                                 "--out", str(out)], monkeypatch)
    rows = {r["dtype"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"float32", "bfloat16"}
    for row in rows.values():
        assert row["rows"] == 4
        # Re-scored with the training weights, the first ratio is 1 up to the float rounding of
        # another minibatch composition.
        assert 0.0 <= row["ratio_dev_first_on"] < 1e-6 and row["ratio_dev_first_off"] >= 0.0


def test_vla_decode_modes_bench_compares_greedy_and_sampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "modes.json"
    run_main(load_script("vla_decode_modes"), ["--episodes", "4", "--temperatures", "1.0", "--out", str(out)], monkeypatch)
    rows = {r["decode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"greedy", "sampled T=1.0"}
    for row in rows.values():
        assert 0.0 <= row["success_at_end"] <= 1.0 and 0.0 <= row["success_once"] <= 1.0
    # Greedy decoding repeats a few action bins; sampling at T=1 rarely draws the same pair twice.
    assert rows["greedy"]["distinct_actions"] < rows["sampled T=1.0"]["distinct_actions"]


def test_vla_direction_probe_counts_wrong_directions_per_band(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "probe.json"
    run_main(load_script("vla_direction_probe"), ["--scenes", "8", "--rounds", "2", "--out", str(out)], monkeypatch)
    bands = json.loads(out.read_text())["bands"]
    assert [b["distance"] for b in bands] == [[0.15, 0.3], [0.3, 0.45], [0.45, 0.6], [0.6, 0.8], [0.8, 1.0]]
    # Every probed state lies in one band and is either in the target's patch or not.
    assert 0 < sum(b["n"] for b in bands) <= 16
    for b in bands:
        assert b["same_patch"]["n"] + b["other_patch"]["n"] == b["n"]
        for part in (b, b["same_patch"], b["other_patch"]):
            assert (part["wrong_direction"] is None) == (part["n"] == 0)
            assert part["wrong_direction"] is None or 0.0 <= part["wrong_direction"] <= 1.0


def test_footprint_bench_measures_the_process_tree_of_a_toy_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "footprint.json"
    run_main(load_script("footprint"), ["--families", "toy", "--out", str(out)], monkeypatch)
    (row,) = json.loads(out.read_text())["rows"]
    # Ray's processes and the workers are counted: the tree holds more than the controller alone.
    assert row["tree_peak_mib"] > row["controller_peak_mib"] > 50
    assert row["controller_heavy_modules"] == "[]"
    assert 0 < row["startup_s"] < row["wall_s"]


def test_sweep_bench_runs_a_sweep_and_reports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sweep.json"
    run_main(load_script("sweep"), ["--launchers", "basic", "--lrs", "3e-4", "--seeds", "0", "1", "--steps", "1",
                                    "--out", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    (basic,) = result["runs"]
    assert basic["launcher"] == "basic" and basic["jobs"] == 2 and basic["wall_s"] > 0
    (row,) = basic["table"]
    assert row["seeds"] == 2 and row["not finished"] == 0 and 0.0 <= row["final mean"] <= 1.0


def test_learning_vla_bench_runs_from_the_shipped_checkpoint_and_merges_side_by_side_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script("learning_vla_toy")
    small = ["--shipped", "--algos", "grpo", "--rl-steps", "1", "--eval-every", "1", "--eval-episodes", "4",
             "--set", "env.num_envs=8", "env.max_episode_steps=8", "policy.temperature=0.5"]
    run_main(bench, [*small, "--seeds", "0", "--out", str(tmp_path / "s0.json")], monkeypatch)
    first = json.loads((tmp_path / "s0.json").read_text())
    # No SFT run: the RL run starts from the shipped checkpoint (no init_from) with the extra overrides.
    assert [r["algo"] for r in first["runs"]] == ["grpo"] and "sft" not in first["summary"]
    (rl,) = first["runs"]
    assert [step for step, _ in rl["curve"]] == [0, 64] and rl["before"] == rl["curve"][0][1]
    # A second invocation with the same settings (another seed, as on another core) merges with it.
    second = json.loads((tmp_path / "s0.json").read_text())
    second["settings"]["seeds"] = [1]
    second["runs"][0] |= {"seed": 1, "final_success": 1.0 - rl["final_success"]}
    (tmp_path / "s1.json").write_text(json.dumps(second))
    merged_path = tmp_path / "merged.json"
    run_main(bench, ["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--out", str(merged_path)],
             monkeypatch)
    merged = json.loads(merged_path.read_text())
    assert [r["seed"] for r in merged["runs"]] == [0, 1] and merged["settings"]["seeds"] == [0, 1]
    summary = merged["summary"]["grpo"]
    assert summary["afters"] == [rl["final_success"], 1.0 - rl["final_success"]]
    assert summary["min_after"] == min(summary["afters"]) and summary["after_mean"] == pytest.approx(0.5)
    # Files run with other settings are refused, naming what differs.
    second["settings"]["rl_steps"] = 2
    (tmp_path / "s1.json").write_text(json.dumps(second))
    with pytest.raises(SystemExit, match="rl_steps"):
        run_main(bench, ["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--out", str(merged_path)],
                 monkeypatch)


def test_learning_maniskill_merge_joins_seeds_run_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script("learning_maniskill")

    def one_seed(seed: int, successes: list[float], path: Path, **settings_changes) -> None:
        points = [{"env_steps": 50_000 * i, "wall_s": 10.0 * i, "success_once": s, "success_at_end": s / 2,
                   "return": 10 * s} for i, s in enumerate(successes)]
        run_ = {"seed": seed, "curve": points, "train": {"kl_stop": [1.0, 0.0, 1.0]},
                "summary": bench.summarize(points, 0.9, 100_000)}
        settings = {"preset": "maniskill_pushcube_ppo_mlp", "label": "v", "seeds": [seed], "target": 0.9,
                    "by_steps": 100_000, "set": ["algo.update_epochs=8"], "out": str(path), **settings_changes}
        path.write_text(json.dumps({"variants": {"v": bench.variant([run_], settings, settings["preset"])}}))

    one_seed(2, [0.0, 0.5, 0.95, 0.97], tmp_path / "s2.json")
    one_seed(0, [0.0, 0.9, 1.0, 0.88], tmp_path / "s0.json")
    out = tmp_path / "all.json"
    out.write_text(json.dumps({"variants": {"preset": {"kept": True}}}))
    run_main(bench, ["--merge", str(tmp_path / "s2.json"), str(tmp_path / "s0.json"), "--label", "v", "--out", str(out)],
             monkeypatch)
    result = json.loads(out.read_text())
    merged = result["variants"]["v"]
    # The file's other variants are kept; the seeds are joined in order and the table spans both.
    assert result["variants"]["preset"] == {"kept": True}
    assert [r["seed"] for r in merged["runs"]] == [0, 2] and merged["settings"]["seeds"] == [0, 2]
    assert merged["table"][1]["success_once_mean"] == pytest.approx(0.7)
    assert merged["table"][3]["success_once_min"] == pytest.approx(0.88)
    assert merged["kl_stops"] == [2, 2]
    # Seed 0 reaches 0.9 by 100k but falls to 0.88; seed 2 reaches it only at 100k and holds.
    assert [r["summary"]["passes"] for r in merged["runs"]] == [False, True] and merged["all_pass"] is False
    one_seed(1, [0.0, 0.9, 1.0, 1.0], tmp_path / "s1.json", set=["algo.update_epochs=4"])
    with pytest.raises(SystemExit, match="algo.update_epochs=4"):
        run_main(bench, ["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--label", "v",
                         "--out", str(out)], monkeypatch)


def test_diffusion_reward_reference_places_the_renders_and_the_bases(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "reference.json"
    bench = load_script("diffusion_reward_reference")
    with pytest.raises(SystemExit, match="expected NAME=DIR"):
        run_main(bench, ["--model", str(bench.BASES["shapes_early"]), "--out", str(out)], monkeypatch)
    with pytest.raises(SystemExit, match="is taken"):
        run_main(bench, ["--model", f"shapes_base={bench.BASES['shapes_early']}", "--out", str(out)], monkeypatch)
    # A run's checkpoint folder (checkpoints/step_N) names the policy's export inside it.
    step = tmp_path / "run" / "checkpoints" / "step_4"
    (step / "policy").mkdir(parents=True)
    (step / "policy" / "pretrained").symlink_to(bench.BASES["shapes_early"])
    run_main(bench, ["--images", "14", "--num-steps", "2", "--per-caption", "4", "--guidance", "1", "3",
                     "--model", f"early_again={step}", "--out", str(out)], monkeypatch)
    rows = {r["images"]: r for r in json.loads(out.read_text())["rows"]}
    renders, blank = rows["shapes-world renders"], rows["blank white"]
    # The world's own renders draw every caption exactly; a blank image draws nothing and is the smallest JPEG.
    assert (renders["fidelity"], renders["count"], blank["fidelity"]) == (1.0, 1.0, 0.0)
    assert blank["jpeg_kb"] < renders["jpeg_kb"] < rows["renders + noise (std 8/255)"]["jpeg_kb"]
    # More blur: a smaller JPEG, and the most blurred read worse than the least (softer edges read as
    # less of the shape; between neighbouring radii 14 images may tie or swap).
    blurred = [rows[f"renders blurred (Gaussian, radius {r} px)"] for r in (0.5, 0.7, 0.9, 1.0, 1.2, 1.5)]
    sizes = [b["jpeg_kb"] for b in blurred]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < renders["jpeg_kb"]
    assert blurred[-1]["fidelity"] < blurred[0]["fidelity"] <= 1.0
    # The early base also at the other guidance scale asked for (3, the policy's, is the row above).
    assert not any("shapes_base samples (2 DDIM steps, guidance" in name for name in rows)
    assert "shapes_early samples (2 DDIM steps, guidance 3)" not in rows
    for name in ("shapes_base samples (2 DDIM steps)", "shapes_early samples (2 DDIM steps)",
                 "shapes_early samples (2 DDIM steps, guidance 1)"):
        assert rows[name]["jpeg_kb"] > 0.5 and 0.0 <= rows[name]["fidelity"] <= 1.0
        assert rows[name]["fidelity"] == pytest.approx((rows[name]["color"] + rows[name]["count"] + rows[name]["shape"]) / 3)
    # Guidance 1 samples without the unconditional pass: other images from the same seeds.
    unguided = rows["shapes_early samples (2 DDIM steps, guidance 1)"]
    assert unguided["jpeg_kb"] != rows["shapes_early samples (2 DDIM steps)"]["jpeg_kb"]
    # Every model also on the training captions (other prompts: other images); a --model is sampled like
    # the bases (the early base again: its rows repeat the early base's exactly), without a selection.
    for name in ("shapes_base", "shapes_early", "early_again"):
        trained_on = rows[f"{name} samples (2 DDIM steps, train captions)"]
        assert trained_on["jpeg_kb"] != rows[f"{name} samples (2 DDIM steps)"]["jpeg_kb"]
    for split in ("", ", train captions"):
        again = rows[f"early_again samples (2 DDIM steps{split})"]
        assert {**again, "images": ""} == {**rows[f"shapes_early samples (2 DDIM steps{split})"], "images": ""}
    assert "early_again samples (2 DDIM steps, guidance 1)" not in rows
    selections = json.loads(out.read_text())["selection"]
    assert sorted(selections) == ["shapes_base", "shapes_early"]
    # Best of n of the bases' own samples: n=1 is the mean, and a larger n never scores worse.
    for sel in selections.values():
        best = [sel["fidelity_best_of_n"][str(n)] for n in (1, 2, 4)]
        assert sel["samples_per_caption"] == 4 and best[0] == pytest.approx(sel["fidelity"])
        assert best == sorted(best) and best[-1] <= 1.0
        smallest = list(sel["jpeg_kb_smallest_of_n_with_fidelity_ge_0.8"].values())
        assert smallest == sorted(smallest, reverse=True)


def test_best_of_n_is_the_expected_maximum_of_a_draw() -> None:
    best_of_n = load_script("diffusion_reward_reference").best_of_n
    values = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    for n in range(1, 6):
        draws = [max(c) for c in itertools.combinations(values, n)]
        assert best_of_n(values, n) == pytest.approx(np.mean(draws))
