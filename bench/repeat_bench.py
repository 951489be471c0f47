"""Repeated jobs on SDXL-shaped layers: K-LoRA against the same two LoRAs stacked, per host engine, host-free.

A1111: the real slot engine (`lib_klora.engines.slots`) inside the test suite's faithful stand-in of the
built-in Lora extension (tests/hosts/fake_lora_extension.py, whose merges are A1111 v1.10.1's); "stacked"
is that extension merging both LoRAs itself, as `<lora:a:1><lora:b:1>` does. "klora" is the default:
layers whose choice changes within the pass get the chosen LoRA's delta on their activations, the others
stay merged between jobs; "klora_merge_at_switch" (the setting off) re-merges switching layers at each
switch and at the next job's start; "klora_restore" replays the oldest behaviour (every touched layer
restored at the end of each job).
Forge/reForge: the real hook engine (`lib_klora.engines.patcher`, a hook on every adapted layer) against the
host merging both LoRAs once; "hybrid" (a simulation of the alternative the issue asks to weigh) merges
the layers whose choice is constant within the pass once and hooks only the layers that switch.

A job = `--steps` UNet evaluations; each evaluation runs every selected layer on activations of its real
SDXL token count at `--size` px with CFG (batch 2; cross-attention k/v on 77 text tokens). Only the
transformer-block linears exist (every `--every`-th of SDXL's 700, so weights, merges and forwards are all
1/every of SDXL's), no convolutions or text encoder. Variants run round-robin, `--jobs` in a row each; the
first job of a run (after another variant changed the weights) is reported apart from the repeated ones.
Times are this process's CPU seconds (all threads), so other work on a shared machine hardly moves them.
Ends with `RESULT remerged_params_repeat=<A1111 K-LoRA, per repeated job, scaled to all layers>
klora_vs_stacked_repeat=<A1111, fastest repeated job>` and the other ratios. Fastest, not median: on a
shared machine other work only ever adds time, so the fastest of several jobs is the steadiest estimate
of a variant's own cost. `--dtype float16` stores and computes the layers in half precision (A1111's
`--precision half`); `--storage-dtype-branches` then replays the hooks' old half-precision branches on a
CPU, to compare with the fp32 ones `branch_dtype` picks there.

    python bench/repeat_bench.py [--size 256] [--steps 10] [--every 10] [--rounds 3] [--jobs 3] [--threads 2]
        [--dtype float32] [--storage-dtype-branches]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_klora.dynamic.branches import LowRankBranch
from lib_klora.dynamic.hooks import install_hooks
from lib_klora.dynamic.selectors import FusionSelector
from lib_klora.engines import patcher, slots
from lib_klora.engines.kept_merges import kept_layers
from lib_klora.fusion.cache import ScoreCache
from lib_klora.params.model import KLoraParams
from lib_klora.tools.synthetic import depth_gain, make_lora_tensors, unet_layer_shapes, write_lora
from tests.hosts.fake_lora_extension import installed

RANKS = (16, 32)  # subject, style: the ranks of the live SDXL test
CONTEXT_TOKENS = 77


@dataclass
class Denoiser:
    total_steps: int
    step: int = 0


class SdxlSubset(nn.Module):
    """Every `every`-th SDXL transformer linear, named as A1111 names them, with its activations."""

    def __init__(self, every: int, size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        shapes = dict(list(unet_layer_shapes("sdxl").items())[::every])
        self.shapes = shapes
        self.paths = list(shapes)
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes.values())
        self.requires_grad_(False)
        generator = torch.Generator().manual_seed(0)
        self.network_layer_mapping: dict[str, nn.Module] = {}
        for path, layer in zip(self.paths, self.layers, strict=True):
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
            layer.network_layer_name = "diffusion_model_" + path.replace(".", "_")
            self.network_layer_mapping[layer.network_layer_name] = layer
        latent = size // 8
        self.to(dtype)
        self.inputs: list[torch.Tensor] = []
        shared: dict[tuple[int, int], torch.Tensor] = {}
        for path, (_out, features) in shapes.items():
            side = latent // (2 if ".1." in path.split("attentions")[0] else 4)
            cross = ".attn2.to_k" in path or ".attn2.to_v" in path
            tokens = CONTEXT_TOKENS if cross else max(1, side) ** 2
            key = (2 * tokens, features)
            if key not in shared:
                shared[key] = torch.randn(key, generator=generator).to(dtype)
            self.inputs.append(shared[key])

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.shapes.values())

    def evaluate(self) -> None:
        with torch.no_grad():
            for layer, x in zip(self.layers, self.inputs, strict=True):
                layer(x)


@dataclass
class Timings:
    first: list[float] = field(default_factory=list)
    repeat: list[float] = field(default_factory=list)
    first_params: list[int] = field(default_factory=list)
    repeat_params: list[int] = field(default_factory=list)


def hook_work(model: SdxlSubset, steps: int, job: Callable[[], int]) -> float:
    """Multiply-adds of the hooks' low-rank matmuls in one run of `job`, as a fraction of the layers' own:
    the activation-side cost without timing noise (the same count on any hardware)."""
    done = [0]
    add_into = LowRankBranch.add_into

    def counting(self: LowRankBranch, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        done[0] += (x.numel() // x.shape[-1]) * self.rank * (x.shape[-1] + self.out_features)
        return add_into(self, out, x)

    LowRankBranch.add_into = counting  # type: ignore[method-assign]
    try:
        job()
    finally:
        LowRankBranch.add_into = add_into  # type: ignore[method-assign]
    own = steps * sum(
        x.shape[0] * o * i for x, (o, i) in zip(model.inputs, model.shapes.values(), strict=True)
    )
    return done[0] / own


def run_variant(timings: Timings, jobs: int, job: Callable[[], int]) -> None:
    for index in range(jobs):
        start = time.process_time()  # CPU seconds of this process: robust to other jobs on a shared machine
        merged = job()
        elapsed = time.process_time() - start
        (timings.first if index == 0 else timings.repeat).append(elapsed)
        (timings.first_params if index == 0 else timings.repeat_params).append(merged)


def plain_weights(model: SdxlSubset) -> None:
    """Back to the checkpoint's weights (outside any timing), from Lora's backups."""
    with torch.no_grad():
        for layer in model.layers:
            backup = getattr(layer, "network_weights_backup", None)
            if backup is not None:
                layer.weight.copy_(backup)
            layer.network_current_names = ()


def a1111_variants(model: SdxlSubset, lora_dir: Path, params: KLoraParams, steps: int) -> dict[str, Any]:
    """Job functions of the A1111 variants, run inside the stand-in Lora extension; each returns the number
    of weight parameters rewritten (Lora's restore-then-merge of a layer, or an eager restore)."""
    nets = sys.modules["networks"]
    rewritten = [0]
    restore = nets.network_restore_weights_from_backup

    def counting_restore(module: nn.Module) -> None:
        if getattr(module, "network_weights_backup", None) is not None:
            rewritten[0] += module.weight.numel()
        restore(module)

    nets.network_restore_weights_from_backup = counting_restore
    cache, scores = slots.NetworkCache(), ScoreCache()

    def sample(on_step: Callable[[Denoiser], None] | None) -> None:
        denoiser = Denoiser(steps)
        for step in range(steps):
            denoiser.step = step
            if on_step is not None:
                on_step(denoiser)
            model.evaluate()

    def stacked() -> int:
        rewritten[0] = 0
        nets.load_networks(["subject", "style"])
        sample(None)
        return rewritten[0]

    def klora(restore_after: bool, on_activations: bool = False) -> Callable[[], int]:
        def job() -> int:
            rewritten[0] = 0
            nets.load_networks([])  # the job's activation: no <lora> tags, then the slots
            built = slots.build_job(
                nets,
                cache,
                scores,
                model,
                params,
                None,
                device="cpu",
                digest=lambda path: scores.digests.digest(Path(path)),
                switch_on_activations=on_activations,
            )
            slots.inject_slots(nets, built, is_hires=False)
            sample(lambda d: slots.on_step(built, d, False, 1))
            if restore_after:
                slots.teardown(nets, built)
            else:
                slots.finish(nets, built)
            return rewritten[0]

        return job

    return {
        "stacked": stacked,
        "klora": klora(False, on_activations=True),
        "klora_merge_at_switch": klora(False),
        "klora_restore": klora(True),
    }


def forge_variants(
    model: SdxlSubset,
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]],
    params: KLoraParams,
    steps: int,
) -> tuple[dict[str, Callable[[], int]], int]:
    """Job functions of the Forge/reForge variants (plain Linear forwards, no Lora extension)."""
    find = dict(zip(model.paths, model.layers, strict=True))
    patches = [{f"diffusion_model.{p}.weight": f for p, f in lora.items()} for lora in factors]
    deltas = [
        patcher.module_deltas(
            patch,
            lambda name: find.get(name.removeprefix("diffusion_model.")),
            lambda value: patcher.LowRankFactors(*value),
            lambda value, key, weight: weight,
        )[0]
        for patch in patches
    ]
    table = patcher.build_patcher_job(params, None, (deltas[0], deltas[1])).table
    strengths = (params.subject_strength, params.style_strength)
    planned = patcher.build_patcher_job(params, None, (deltas[0], deltas[1]), table=table)
    choices = planned.plan_for(params).schedule(steps).choices  # [layers, steps]
    names = [layer.canonical for layer in table.layers]
    switching = {names[i] for i in range(len(names)) if len(set(choices[i].tolist())) > 1}
    merged_by_host: dict[str, bool] = {}

    def host_merge(which: tuple[int, ...], layers: list[str]) -> int:
        """The host's patcher merging LoRA `which` into `layers` (once: it keeps merged weights)."""
        count = 0
        with torch.no_grad():
            for name in layers:
                layer = find[name.removeprefix("diffusion_model.")]
                for w in which:
                    delta = deltas[w].get(name)
                    if delta is not None:
                        up, down = delta.factors("cpu")
                        layer.weight.add_(up @ down, alpha=strengths[w])
                count += layer.weight.numel()
        return count

    def evaluate_with(on_step: Callable[[int], None]) -> None:
        for step in range(steps):
            on_step(step)
            model.evaluate()

    def stacked() -> int:
        count = 0
        if not merged_by_host.get("stacked"):
            plain_weights(model)
            merged_by_host.clear()
            count = host_merge((0, 1), sorted(set(deltas[0]) | set(deltas[1])))
            merged_by_host["stacked"] = True
        evaluate_with(lambda step: None)
        return count

    def klora() -> int:
        if merged_by_host:
            plain_weights(model)  # the host unpatches when the <lora> tags go (not timed as ours)
            merged_by_host.clear()
        job = patcher.build_patcher_job(params, None, (deltas[0], deltas[1]), table=table)
        patcher.install(job, strengths)
        denoiser = Denoiser(steps)

        def step_to(step: int) -> None:
            denoiser.step = step
            patcher.on_step(job, denoiser, False, 1)

        evaluate_with(step_to)
        patcher.teardown(job)
        return 0

    def hybrid() -> int:
        count = 0
        if not merged_by_host.get("hybrid"):
            plain_weights(model)
            merged_by_host.clear()
            for which in (0, 1):  # constant layers: their pass-long choice, as host patches
                constant = [
                    n for i, n in enumerate(names) if n not in switching and int(choices[i, 0]) == which
                ]
                only = [n for n in deltas[which] if n not in deltas[1 - which]]
                count += host_merge((which,), constant + only)
            merged_by_host["hybrid"] = True
        rows = [i for i, n in enumerate(names) if n in switching]
        selector = FusionSelector(len(rows))
        selector.begin_static_pass(choices[rows])
        branches = {}
        modules = {}
        for n in switching:
            pair = []
            for which in (0, 1):
                up, down = deltas[which][n].factors("cpu")
                pair.append(LowRankBranch(up, down, strengths[which]))
            branches[n] = (pair[0], pair[1])
            modules[n] = find[n.removeprefix("diffusion_model.")]
        hooks = install_hooks(
            modules,
            branches,
            selector,
            {n: rows.index(names.index(n)) for n in switching},
            lambda: True,
            in_place=True,
        )
        evaluate_with(selector.set_step)
        hooks.remove()
        return count

    switching_params = sum(find[n.removeprefix("diffusion_model.")].weight.numel() for n in switching)
    return {"stacked": stacked, "klora": klora, "hybrid": hybrid}, switching_params


def storage_dtype_branches() -> None:
    """Replay the old rule: every branch computes in its layer's storage dtype (fp16 on a CPU too)."""
    from lib_klora.dynamic import branches
    from lib_klora.engines import network_modules

    def storage(weight: torch.Tensor) -> torch.dtype:
        return weight.dtype if weight.dtype.is_floating_point else torch.float32

    for module in (branches, network_modules, patcher):
        module.branch_dtype = storage  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in px (SDXL latent = size/8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=10, help="keep every N-th SDXL transformer linear")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=3, help="jobs per variant in a row; the first is apart")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pattern", default="s", choices=("s", "s*"))
    parser.add_argument("--hosts", default="a1111,forge", help="a1111, forge or both (comma-separated)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="the layers' weights and activations (float16: A1111's --precision half)",
    )
    parser.add_argument(
        "--storage-dtype-branches",
        action="store_true",
        help="branches in the layers' dtype, as before fp32 branches on a CPU (to compare with)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.storage_dtype_branches:
        storage_dtype_branches()

    model = SdxlSubset(args.every, args.size, getattr(torch, args.dtype))
    params = KLoraParams(enabled=True, subject="subject", style="style", pattern=args.pattern)
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = []
    with tempfile.TemporaryDirectory() as workdir:
        lora_dir = Path(workdir)
        for name, rank, favour, seed in (("subject", RANKS[0], "down", 1), ("style", RANKS[1], "up", 2)):
            tensors = make_lora_tensors(
                model.shapes,
                rank,
                seed=seed,
                alpha=rank / 2,
                layer_gain=depth_gain(favour),
                dtype=torch.float32,
            )
            write_lora(lora_dir / f"{name}.safetensors", tensors)
            factors.append(
                {
                    path: (
                        tensors[f"lora_unet_{path.replace('.', '_')}.lora_up.weight"],
                        tensors[f"lora_unet_{path.replace('.', '_')}.lora_down.weight"],
                        rank / 2,
                    )
                    for path in model.shapes
                }
            )
        print(
            f"SDXL subset: {len(model.paths)} of 700 transformer linears ({model.params / 1e6:.0f}M params, "
            f"scale ×{args.every}), {args.size}px, {args.steps} steps, CFG, ranks {RANKS}, "
            f"{args.threads} threads, pattern {params.pattern}, {args.dtype} layers, branches in "
            + ("the layers' dtype" if args.storage_dtype_branches else "branch_dtype's choice")
        )
        results: dict[str, Timings] = {}
        hosts = set(args.hosts.split(","))
        with installed(model, lora_dir):
            variants = a1111_variants(model, lora_dir, params, args.steps)
            variants["klora"]()  # warm-up: load both LoRAs, compute and cache the scores
            work = {"hook_macs_vs_layers": hook_work(model, args.steps, variants["klora"])}
            held_lora = slots.held_lora
            slots.held_lora = lambda choices, ranks: None  # every switching layer plain
            try:
                work["plain_hook_macs_vs_layers"] = hook_work(model, args.steps, variants["klora"])
            finally:
                slots.held_lora = held_lora
            for _ in range(args.rounds if "a1111" in hosts else 0):
                for name, job in variants.items():
                    run_variant(results.setdefault(f"a1111_{name}", Timings()), args.jobs, job)
            kept_layers.release(sys.modules["networks"])
            plain_weights(model)
        forge, switching_params = forge_variants(model, factors, params, args.steps)
        for _ in range(args.rounds if "forge" in hosts else 0):
            for name, job in forge.items():
                run_variant(results.setdefault(f"forge_{name}", Timings()), args.jobs, job)
        plain_weights(model)

    fastest = {name: (min(t.first), min(t.repeat)) for name, t in results.items()}
    params_of = {name: (max(t.first_params), max(t.repeat_params)) for name, t in results.items()}
    print(
        f"{'variant':<28} {'first job':>10} {'repeated':>10} {'re-merged first':>16} {'re-merged repeat':>17}"
    )
    for name, (first, repeat) in fastest.items():
        first_p, repeat_p = params_of[name]
        print(f"{name:<28} {first:>9.3f}s {repeat:>9.3f}s {first_p / 1e6:>15.1f}M {repeat_p / 1e6:>16.1f}M")
    switching = f"{switching_params / 1e6:.1f}M of {model.params / 1e6:.1f}M params"
    print(f"layers that switch within the pass: {switching}")
    if "a1111_klora" in fastest and "a1111_stacked" in fastest:
        # Merges cost the same per job whatever the size and steps; hooks and the forward grow with both.
        extra = fastest["a1111_klora"][1] - fastest["a1111_stacked"][1]
        per_step = fastest["a1111_stacked"][1] / args.steps
        print(f"A1111 K-LoRA, repeated job: {extra:+.3f}s over stacked; stacked: {per_step:.3f}s per step")

    print(
        f"hook multiply-adds per A1111 K-LoRA job: {work['hook_macs_vs_layers']:.2%} of the layers' own "
        f"(every switching layer plain: {work['plain_hook_macs_vs_layers']:.2%})"
    )
    ratios: dict[str, str] = {key: f"{value:.4f}" for key, value in work.items()}
    pairs = {
        "klora_vs_stacked_repeat": ("a1111_klora", "a1111_stacked", 1),
        "klora_vs_stacked_first": ("a1111_klora", "a1111_stacked", 0),
        "merge_at_switch_vs_stacked_repeat": ("a1111_klora_merge_at_switch", "a1111_stacked", 1),
        "restore_each_job_vs_stacked_repeat": ("a1111_klora_restore", "a1111_stacked", 1),
        "forge_klora_vs_stacked_repeat": ("forge_klora", "forge_stacked", 1),
        "hybrid_vs_stacked_repeat": ("forge_hybrid", "forge_stacked", 1),
    }
    for key, (a, b, which) in pairs.items():
        if a in fastest and b in fastest:
            ratios[key] = f"{fastest[a][which] / fastest[b][which]:.4f}"
    # Re-merged parameters of a repeated A1111 K-LoRA job, scaled from the subset to all SDXL linears.
    if "a1111_klora" in params_of:
        remerged = {"remerged_params_repeat": str(params_of["a1111_klora"][1] * args.every)}
        if "a1111_klora_merge_at_switch" in params_of:
            at_switch = params_of["a1111_klora_merge_at_switch"][1] * args.every
            remerged["merge_at_switch_remerged_params_repeat"] = str(at_switch)
        ratios = {**remerged, **ratios}
    print("RESULT " + " ".join(f"{k}={v}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
