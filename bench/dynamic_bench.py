"""Benchmark of the `dynamic` method's per-step cost (and, when present, of the latent guidance).

KL part (`kl_vs_topk`): SD1.5 attention projections (q/k/v/out of attn1 and attn2 in all 16 transformer
blocks) at a 64×64 latent (4096 / 1024 / 256 / 64 tokens, 77 context tokens), batch 2 for CFG, subject
LoRA rank 8 and style LoRA rank 16. One "step" runs every layer once, as one batched-CFG UNet call does.

* K-LoRA: the layers with the chosen LoRA merged into the weights, so a step is the plain forwards
  (K-LoRA's per-step selection itself is a table lookup and costs nothing at this scale);
* dynamic: the same forwards with the `dynamic` hooks, each deciding on its step's first (here: only) call:
  two low-rank deltas on a token subsample, three softmaxes and two KL reductions per layer, then the
  chosen delta accumulated into the output in place (`in_place=True`, as the WebUI adapters install
  them). An extra line shows the out-of-place variant (a new output tensor per layer).

Both are timed side by side in interleaved repeats; the figure is the ratio of the median step times
(target ≤ 1.5). The dynamic hooks are timed with the shipped token subsample (`DEFAULT_MAX_TOKENS`) and
with every token, to show what the subsample buys. A third line applies only the subject delta, with no
decision: the floor of any LoRA applied on the activation side instead of merged.

On the CPU, glibc hands large buffers back to the kernel on free, so each fresh activation-sized tensor
costs page faults; in a VM these can dominate the hooks' extra allocations (watch the `sys` time).
Running with MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 keeps freed buffers for
reuse, as the CUDA caching allocator does, and shows the arithmetic cost alone.

The guidance part lives in bench/guidance_bench_part.py (function `guided_vs_unguided()`) and is only
run when that file exists.

    python bench/dynamic_bench.py [--part kl|guidance|all] [--repeats 15] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_klora.dynamic.branches import LowRankBranch
from lib_klora.dynamic.hooks import install_hooks
from lib_klora.dynamic.kl import DEFAULT_MAX_TOKENS
from lib_klora.dynamic.selectors import DynamicSelector
from lib_klora.tools.synthetic import unet_layer_shapes

LATENT_TOKENS = 64 * 64  # 512×512 image
CONTEXT_TOKENS = 77
BATCH = 2  # cond + uncond in one call
SUBJECT_RANK, STYLE_RANK = 8, 16
_LEVEL_OF_UP_BLOCK = {1: 2, 2: 1, 3: 0}  # SD1.5 up_blocks.1..3 mirror down_blocks.2..0


def _tokens(path: str) -> int:
    """Tokens a projection sees: the latent at its block's resolution, or the text context for attn2 k/v."""
    if ".attn2.to_k" in path or ".attn2.to_v" in path:
        return CONTEXT_TOKENS
    if path.startswith("mid_block"):
        level = 3
    elif path.startswith("down_blocks."):
        level = int(path.split(".")[1])
    else:
        level = _LEVEL_OF_UP_BLOCK[int(path.split(".")[1])]
    return LATENT_TOKENS // 4**level


def _branch(
    out_f: int, in_f: int, rank: int, generator: torch.Generator, device: torch.device
) -> LowRankBranch:
    # Initialised so the delta is a few percent of the output, as for a trained LoRA at strength 1.
    down = torch.randn(rank, in_f, generator=generator) / in_f**0.5
    up = torch.randn(out_f, rank, generator=generator) * (0.05 / rank**0.5)
    return LowRankBranch(up.to(device), down.to(device), 1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(device: torch.device, dtype: torch.dtype):
    """The layers twice (plain and hooked copies sharing weights), their inputs and the LoRA branches."""
    g = torch.Generator().manual_seed(0)
    shapes = unet_layer_shapes("sd15", feed_forward=False)
    plain: dict[str, nn.Linear] = {}
    hooked: dict[str, nn.Linear] = {}
    branches: dict[str, tuple[LowRankBranch, LowRankBranch]] = {}
    inputs: dict[str, torch.Tensor] = {}
    shared_x: dict[tuple[int, int], torch.Tensor] = {}
    for path, (out_f, in_f) in shapes.items():
        layer = nn.Linear(in_f, out_f, bias=path.endswith("to_out.0")).to(device, dtype)
        twin = nn.Linear(in_f, out_f, bias=layer.bias is not None).to(device, dtype)
        twin.weight, twin.bias = layer.weight, layer.bias
        plain[path], hooked[path] = layer, twin
        subject = _branch(out_f, in_f, SUBJECT_RANK, g, device)
        style = _branch(out_f, in_f, STYLE_RANK, g, device)
        branches[path] = (subject, style)
        key = (_tokens(path), in_f)
        if key not in shared_x:
            shared_x[key] = torch.randn(BATCH, key[0], in_f, generator=g).to(device, dtype)
        inputs[path] = shared_x[key]
    return plain, hooked, branches, inputs


@dataclass
class _Variant:
    label: str
    selector: DynamicSelector | None  # None: the plain (merged) forwards
    in_place: bool = True
    times: list[float] = field(default_factory=list)


def kl_vs_topk(
    *,
    repeats: int = 15,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    also_max_tokens: tuple[int | None, ...] = (None,),
    verbose: bool = True,
) -> float:
    """Median step time with the `dynamic` hooks over that of the merged (K-LoRA) forwards; target ≤ 1.5."""
    dev = torch.device(device)
    plain, hooked, branches, inputs = _build(dev, dtype)
    names = list(plain)
    index = {name: i for i, name in enumerate(names)}

    merged = _Variant("klora (merged)", None)
    shipped = _Variant(f"dynamic, max_tokens={DEFAULT_MAX_TOKENS}", DynamicSelector(len(names)))
    # Reference: the subject delta applied on the activation side with no decision, the floor of any
    # unmerged LoRA (its extra low-rank matmuls and the add).
    floor = _Variant("subject delta only (floor)", DynamicSelector(0))
    out_of_place = _Variant(
        f"dynamic, max_tokens={DEFAULT_MAX_TOKENS}, out of place", DynamicSelector(len(names)), in_place=False
    )
    variants = [merged, shipped, floor, out_of_place]
    for extra in also_max_tokens:
        if extra != DEFAULT_MAX_TOKENS:
            label = f"dynamic, max_tokens={extra or 'all'}"
            variants.append(_Variant(label, DynamicSelector(len(names), max_tokens=extra)))

    current: list[_Variant] = [merged]
    hook_sets = []
    for variant in variants:  # one hook set per variant on the same modules; only the current one is live
        if variant.selector is None:
            continue
        pairs = {n: (b[0], None) for n, b in branches.items()} if variant is floor else branches
        live = _live_for(variant, current)
        # in_place as the WebUI adapters install them: the chosen delta is accumulated into the layer's
        # fresh output by one in-place GEMM.
        hook_sets.append(
            install_hooks(hooked, pairs, variant.selector, index, live, in_place=variant.in_place)
        )
        variant.selector.begin_pass("bench", 1_000_000)

    def step(variant: _Variant) -> float:
        current[0] = variant
        selector = variant.selector
        if selector is not None:
            selector.set_step(selector.step + 1)  # a fresh step: every layer decides again
        layers = plain if selector is None else hooked
        _sync(dev)
        start = time.perf_counter()
        for name in names:
            layers[name](inputs[name])
        if selector is not None:
            selector.table("bench")  # the step's decisions reach the host table, as during sampling
        _sync(dev)
        return time.perf_counter() - start

    with torch.inference_mode():
        for _ in range(2):  # warm-up: allocator, kernels, factor caches
            for variant in variants:
                step(variant)
        for r in range(repeats):
            shift = r % len(variants)  # rotate the order so that no variant always runs first
            for variant in variants[shift:] + variants[:shift]:
                variant.times.append(step(variant))
    for hook_set in hook_sets:
        hook_set.remove()
        if hook_set.error is not None:
            raise RuntimeError("a dynamic hook failed during the benchmark") from hook_set.error

    base = statistics.median(merged.times)
    if verbose:
        print(
            f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, dtype {dtype}; "
            f"{len(names)} layers, batch {BATCH}, ranks {SUBJECT_RANK}/{STYLE_RANK}, {repeats} repeats"
        )
        for variant in variants:
            value = statistics.median(variant.times)
            print(f"  {variant.label:<30} {value * 1e3:8.1f} ms/step   x{value / base:.3f}")
    return statistics.median(shipped.times) / base


def _live_for(variant: _Variant, current: list[_Variant]) -> Callable[[], bool]:
    return lambda: current[0] is variant


def _guidance_part() -> Callable[[], float] | None:
    """`guided_vs_unguided` from bench/guidance_bench_part.py, or None when that file is absent."""
    path = Path(__file__).with_name("guidance_bench_part.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("guidance_bench_part", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.guided_vs_unguided


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("kl", "guidance", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--also-max-tokens",
        default="all",
        help="comma-separated extra token subsamples to time for comparison ('all' = every token, '' = none)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extras = tuple(None if v == "all" else int(v) for v in args.also_max_tokens.split(",") if v.strip())
    guided = _guidance_part() if args.part in ("guidance", "all") else None
    if args.part == "guidance" and guided is None:
        parser.error("bench/guidance_bench_part.py is not there yet")

    results: list[str] = []
    if args.part in ("kl", "all"):
        ratio = kl_vs_topk(repeats=args.repeats, device=args.device, also_max_tokens=extras)
        print(f"dynamic vs K-LoRA per step: x{ratio:.3f}   [target <= 1.5]")
        results.append(f"kl_vs_topk={ratio:.4f}")
    if guided is not None:
        results.append(f"guided_vs_unguided={guided():.4f}")
    print("RESULT " + " ".join(results))


if __name__ == "__main__":
    main()
