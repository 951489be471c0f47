"""Plan benchmark on an SDXL-shaped LoRA pair (attention + feed-forward of all 70 transformer blocks).

Prints cold and cached plan times, the per-step decision cost, and how much cheaper a step's decisions
are than the official code's recomputation (dense ΔW and two full top-k per layer per forward).
The official cost is measured on one layer of each distinct shape and extrapolated by the number of
layers of that shape; everything is measured in this one run, side by side.

    python bench/plan_bench.py [--steps 50] [--workdir DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_klora.engines.tracking import LayerSelection
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import plan_from_files
from lib_klora.fusion.plan import PlanSettings
from lib_klora.loras.lora_file import read_lora_file
from lib_klora.tools.synthetic import make_lora_tensors, unet_layer_shapes, write_lora


def official_layer_cost(subject, style, device: torch.device, repeats: int = 3) -> float:
    """Seconds for what the official code does per layer call: both dense ΔW, both top-k sums."""
    k = subject.rank * style.rank
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for module in (subject, style):
            up, down = module.factors(device)
            dense = (up @ down).abs().flatten()
            dense.topk(min(k, dense.numel())).values.sum().item()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (the official SDXL default)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        shapes = unet_layer_shapes("sdxl", feed_forward=True)
        print(f"SDXL-shaped pair: {len(shapes)} layers, ranks 32 and 64; writing files ...")
        subject_path = write_lora(
            Path(tmp) / "subject_r32.safetensors", make_lora_tensors(shapes, 32, seed=1, key_format="kohya")
        )
        style_path = write_lora(
            Path(tmp) / "style_r64.safetensors", make_lora_tensors(shapes, 64, seed=2, key_format="kohya")
        )
        sizes = [p.stat().st_size / 2**20 for p in (subject_path, style_path)]
        print(f"file sizes: {sizes[0]:.0f} MiB, {sizes[1]:.0f} MiB")

        settings = PlanSettings()
        cache = ScoreCache()
        start = time.perf_counter()
        plan = plan_from_files(subject_path, style_path, settings, device=device, cache=cache)
        schedule = plan.schedule(args.steps)
        cold_s = time.perf_counter() - start

        cached_runs = []
        for _ in range(5):
            start = time.perf_counter()
            again = plan_from_files(subject_path, style_path, settings, device=device, cache=cache)
            again.schedule(args.steps)
            cached_runs.append(time.perf_counter() - start)
        cached_s = statistics.median(cached_runs)

        # Per-step decision, as the WebUI adapter does it each sampler step: take the step's column and
        # update the per-layer selection, collecting the layers whose choice flips.
        selection = LayerSelection([layer.canonical for layer in plan.table.layers])
        loops = 2000
        start = time.perf_counter()
        for i in range(loops):
            selection.apply(schedule.at(i % args.steps).tolist())
        per_step_us = (time.perf_counter() - start) / loops * 1e6

        # Official per-forward recomputation: one sample layer per distinct shape pair, extrapolated.
        subject_file, style_file = read_lora_file(subject_path), read_lora_file(style_path)
        by_shape: dict[tuple[int, int], str] = {}
        counts: Counter[tuple[int, int]] = Counter()
        for name, module in subject_file.modules.items():
            shape = (module.out_features, module.in_features)
            counts[shape] += 1
            by_shape.setdefault(shape, name)
        official_step_s = 0.0
        for shape, name in by_shape.items():
            cost = official_layer_cost(subject_file.modules[name], style_file.modules[name], device)
            official_step_s += cost * counts[shape]
            print(f"  official per-forward cost, shape {shape}: {cost * 1e3:.1f} ms x {counts[shape]} layers")
        vs_official = official_step_s / (per_step_us * 1e-6)

    print(f"layers scored: {len(plan.table.layers)}, gamma {plan.gamma:.4f}")
    print(f"cold plan (read + hash + score + schedule): {cold_s:.2f} s   [target <= 15 s on 2 CPU cores]")
    print(f"cached plan: {cached_s * 1e3:.2f} ms   [target <= 200 ms]")
    print(
        f"per-step decision: {per_step_us:.2f} us; official recomputation per step: {official_step_s:.2f} s "
        f"(extrapolated from {len(by_shape)} sampled shapes)"
    )
    print(f"decision speed-up vs official: {vs_official:.3g}x   [target >= 1000x]")
    print(
        f"RESULT cold_s={cold_s:.3f} cached_s={cached_s:.5f} per_step_us={per_step_us:.3f} "
        f"vs_official={vs_official:.1f}"
    )


if __name__ == "__main__":
    main()
