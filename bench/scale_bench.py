"""K-LoRA at SD1.5 / SDXL / FLUX scale on diffusers models: time per denoising step and peak memory.

Models are diffusers' own classes with the real configurations written out below and random weights
(nothing is downloaded). On the CPU two reductions keep a full run under ~10 minutes and ~6 GB:
SDXL uses transformer_layers_per_block (1, 2, 2) instead of (1, 2, 10) (every layer shape stays real; 20
instead of 70 transformer blocks), FLUX keeps its real width with 1 double and 2 single blocks (of 19 and
38), and latents are small (16×16, i.e. 128² images). On a GPU the
full models run at 1024² (128×128 latents) in bf16.

Two random LoRAs per model, written with tools/synthetic.py at the layers' real shapes (every linear of the
transformer blocks: attention and feed-forward): SD1.5 ranks 16/16, SDXL 16/32, FLUX 16/16 on double and
single blocks.

Variants, timed interleaved in one process (a step is one batched-CFG denoiser call with the clock set
before it). The figure per variant is the fastest of its rounds: the bench machine is shared, and the
least-disturbed round is the best estimate of the variant's own cost; medians are printed too:
    none      the base model
    one       one LoRA on the activation side (PEFT-style, unfused): the floor of any hook-based LoRA
    fused     both LoRAs merged into the weights (the stacking baseline; costs what `none` costs)
    klora_s   K-LoRA, pattern S, through the generic engine (lib_klora.engines.torch_module)
    klora_s*  K-LoRA, pattern S*
    klora_w   K-LoRA, pattern S, written into the weights at each layer's switch steps (apply_to="weights":
              the adapted weights' originals are kept on the CPU, which the CPU's RSS counts)
    dynamic   method dynamic (KL choice per layer and step)
    guidance  K-LoRA S plus reference guidance on every step (random CLIP/DINO/TAESD weights)
Peak memory per variant: the process's resident set size sampled every 2 ms while the variant runs (CPU),
or torch.cuda.max_memory_allocated reset per variant (GPU).

    python bench/scale_bench.py [--quick] [--device cpu|cuda] [--models sd15,sdxl,flux] [--rounds N]

Ends with one line: RESULT sdxl_klora_vs_fused=… sdxl_dynamic_vs_fused=… flux_klora_vs_fused=…
mem_klora_vs_fused=… sdxl_klora_weights_vs_fused=… mem_klora_weights_vs_fused=… (K-LoRA = pattern S
through hooks, the default; memory = SDXL's peak over the fused variant's peak).
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_klora.dynamic.branches import LowRankBranch
from lib_klora.dynamic.hooks import install_hooks
from lib_klora.engines.torch_module import ModuleFusion
from lib_klora.loras.lora_file import read_lora_file
from lib_klora.tools.synthetic import make_lora_tensors, write_lora

SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
RANKS = {"sd15": (16, 16), "sdxl": (16, 32), "flux": (16, 16)}
VARIANTS = ("none", "one", "fused", "klora_s", "klora_s*", "klora_w", "dynamic", "guidance")
STEPS = 30  # the schedule the clock walks through (the timed steps are spread over it)


@dataclass
class Model:
    name: str
    module: nn.Module
    component: str  # "unet" | "transformer"
    call: Callable[[int], torch.Tensor]  # one batched-CFG denoiser call
    latent: Callable[[torch.Tensor], torch.Tensor]  # denoiser output -> one image latent [1, C, h, w]
    latent_channels: int


def build_model(name: str, device: torch.device, dtype: torch.dtype, quick: bool, gpu: bool) -> Model:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    side = 128 if gpu else (8 if quick else 16)
    batch = 2
    if name in ("sd15", "sdxl"):
        config = dict(SD15 if name == "sd15" else SDXL)
        if name == "sdxl" and not gpu:
            config["transformer_layers_per_block"] = (1, 1, 1) if quick else (1, 2, 2)
        unet = UNet2DConditionModel(**config).to(device, dtype).eval()
        x = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
        ctx = torch.randn(batch, 77, config["cross_attention_dim"], device=device, dtype=dtype)
        extra = {}
        if name == "sdxl":
            extra = {
                "added_cond_kwargs": {
                    "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
                    "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * batch).to(
                        device, dtype
                    ),
                }
            }

        def call_unet(step: int) -> torch.Tensor:
            t = torch.tensor(999 - step * 33, device=device)
            return unet(x, t, ctx, **extra).sample

        return Model(name, unet, "unet", call_unet, lambda out: out[:1].float(), 4)
    config = dict(FLUX)
    if not gpu:
        config["num_layers"], config["num_single_layers"] = (1, 1) if quick else (1, 2)
    flux = FluxTransformer2DModel(**config).to(device, dtype).eval()
    if not gpu:
        side = 8 if quick else 16  # FLUX costs most per token: 16×16 latents (8×8 packed tokens) on the CPU
    grid = side // 2  # 2×2 patches are packed into one token
    tokens, text_tokens = grid * grid, 512 if gpu else 32
    hidden = torch.randn(batch, tokens, 64, device=device, dtype=dtype)
    text = torch.randn(batch, text_tokens, 4096, device=device, dtype=dtype)
    pooled = torch.randn(batch, 768, device=device, dtype=dtype)
    img_ids = torch.zeros(grid, grid, 3)
    img_ids[..., 1] = torch.arange(grid)[:, None]
    img_ids[..., 2] = torch.arange(grid)[None, :]
    img_ids = img_ids.reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(text_tokens, 3, device=device, dtype=dtype)
    guidance = torch.full((batch,), 3.5, device=device, dtype=dtype)

    def call_flux(step: int) -> torch.Tensor:
        t = torch.full((batch,), 1 - step / STEPS, device=device, dtype=dtype)
        return flux(hidden, text, pooled, t, img_ids, txt_ids, guidance).sample

    def unpack(out: torch.Tensor) -> torch.Tensor:  # [B, (h/2)(w/2), 64] -> [1, 16, h, w]
        packed = out[:1].float().reshape(1, grid, grid, 16, 2, 2)
        return packed.permute(0, 3, 1, 4, 2, 5).reshape(1, 16, grid * 2, grid * 2)

    return Model(name, flux, "transformer", call_flux, unpack, 16)


def write_loras(model: Model, folder: Path) -> tuple[Path, Path]:
    """Both LoRAs on every linear of the transformer blocks, at the layers' real shapes."""
    blocks = ("transformer_blocks",)  # also matches single_transformer_blocks
    shapes = {
        f"{model.component}.{name}": (m.out_features, m.in_features)
        for name, m in model.module.named_modules()
        if isinstance(m, nn.Linear) and any(b in name for b in blocks) and ".norm" not in name
    }
    ranks = RANKS[model.name]
    return tuple(  # type: ignore[return-value]
        write_lora(
            folder / f"{model.name}_{which}.safetensors",
            make_lora_tensors(shapes, rank, seed=seed, key_format="peft", dtype=torch.float16),
        )
        for which, rank, seed in (("subject", ranks[0], 1), ("style", ranks[1], 2))
    )


class PeakMemory:
    """Peak RSS (CPU, sampled every 2 ms) or peak CUDA allocation while a `with` block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _linear_modules(model: Model, lora_path: Path) -> dict[str, tuple[nn.Module, object]]:
    """Module of each LoRA layer (component-relative diffusers path) with its parsed LoRA layer."""
    lookup = {name.replace(".", "_"): m for name, m in model.module.named_modules()}
    out = {}
    for canonical, layer in read_lora_file(lora_path).modules.items():
        module = lookup.get(canonical.partition(":")[2])
        if module is not None:
            out[canonical] = (module, layer)
    return out


class FusedWeights:
    """The stacking baseline: both deltas added into the weights (and subtracted again after the variant;
    the bench's random weights may drift by an ulp, which no timing notices)."""

    def __init__(self, model: Model, paths: tuple[Path, Path]) -> None:
        self.layers = [_linear_modules(model, p) for p in paths]

    def _add(self, sign: float) -> None:
        with torch.no_grad():
            for layers in self.layers:
                for module, layer in layers.values():
                    up, down = layer.factors(module.weight.device)
                    module.weight.add_((up @ down).to(module.weight.dtype), alpha=sign)

    def __enter__(self) -> FusedWeights:
        self._add(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._add(-1.0)


def one_lora_hooks(model: Model, path: Path):
    layers = _linear_modules(model, path)
    branches = {
        name: (LowRankBranch.from_module(layer, module), None) for name, (module, layer) in layers.items()
    }
    modules = {name: module for name, (module, _) in layers.items()}
    return install_hooks(modules, branches, None, {}, lambda: True, in_place=True)  # type: ignore[arg-type]


def _reference_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> dict[str, tuple[float, int]]:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    started = time.perf_counter()
    model = build_model(name, device, dtype, args.quick, gpu)
    params = sum(p.numel() for p in model.module.parameters())
    paths = write_loras(model, folder)
    components = {model.component: model.module}
    fusions: dict[str, ModuleFusion] = {
        "klora_s": ModuleFusion(components, *paths, {"pattern": "s"}),
        "klora_s*": ModuleFusion(components, *paths, {"pattern": "s*"}),
        "klora_w": ModuleFusion(components, *paths, {"pattern": "s"}, apply_to="weights"),
        "dynamic": ModuleFusion(components, *paths, {"method": "dynamic"}),
    }
    if args.guidance:
        from lib_klora.guidance.run import GuidanceModels
        from lib_klora.guidance.taesd import TaesdDecoder

        with torch.no_grad():
            decoder = TaesdDecoder(model.latent_channels).to(device).eval().requires_grad_(False)
        fusions["guidance"] = ModuleFusion(
            components,
            *paths,
            {"pattern": "s", "guidance": True, "style_refs": [_reference_png()], "guidance_subject": 0.0},
            guidance_models=GuidanceModels(None, random_weights=True),
            decode=decoder.decode,
        )
    print(
        f"{name}: {params / 1e6:.0f} M parameters, {len(fusions['klora_s'].layer_names)} fused layers, "
        f"set up in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    variants = [v for v in VARIANTS if v != "guidance" or args.guidance]
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, int] = dict.fromkeys(variants, 0)
    spread = max(1, STEPS // (args.rounds * args.steps))
    with torch.no_grad():
        model.call(0)  # warm-up: first-call allocations and kernel choices
        for round_index in range(args.rounds):
            for variant in variants:
                gc.collect()
                with PeakMemory(device) as memory:
                    elapsed = run_variant(variant, model, paths, fusions, args, round_index, spread)
                times[variant].append(elapsed)
                peaks[variant] = max(peaks[variant], memory.peak)
    results = {v: (min(times[v]), peaks[v]) for v in variants}
    medians = {v: statistics.median(times[v]) for v in variants}
    fused_time, fused_peak = results["fused"]
    for variant, (seconds, peak) in results.items():
        print(
            f"  {variant:9s} {seconds * 1000:9.1f} ms/step  x{seconds / fused_time:5.3f}   "
            f"peak {peak / 2**30:6.2f} GiB  x{peak / fused_peak:5.3f}   "
            f"(median {medians[variant] * 1000:.1f} ms, x{medians[variant] / medians['fused']:5.3f})",
            flush=True,
        )
    for fusion in fusions.values():
        fusion.remove()
    del model, fusions
    gc.collect()
    return results


def run_variant(
    variant: str,
    model: Model,
    paths: tuple[Path, Path],
    fusions: dict[str, ModuleFusion],
    args: argparse.Namespace,
    round_index: int,
    spread: int,
) -> float:
    """Seconds per step of `args.steps` steps of one variant (steps spread over the 30-step schedule)."""
    steps = [(round_index * args.steps + k) * spread % STEPS for k in range(args.steps)]
    sync = torch.cuda.synchronize if model.module.device.type == "cuda" else (lambda: None)
    if variant in ("none", "fused", "one"):
        context = (
            FusedWeights(model, paths)
            if variant == "fused"
            else one_lora_hooks(model, paths[0])
            if variant == "one"
            else None
        )
        if context is not None:
            context.__enter__()
        try:
            sync()
            start = time.perf_counter()
            for step in steps:
                model.call(step)
            sync()
            return (time.perf_counter() - start) / len(steps)
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    fusion = fusions[variant]
    with fusion:
        fusion.begin(STEPS)
        sync()
        start = time.perf_counter()
        for step in steps:
            fusion.step(step)
            out = model.call(step)
            if variant == "guidance":
                fusion.guide(model.latent(out), 1.0)
        sync()
        return (time.perf_counter() - start) / len(steps)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller models and latents, one round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="sd15,sdxl,flux")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant and round")
    parser.add_argument("--no-guidance", dest="guidance", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    print(
        f"device {args.device}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps", flush=True
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results[name] = bench_model(name, args, Path(tmp))

    def ratio(model: str, variant: str, index: int = 0) -> str:
        if model not in results:
            return "nan"
        return f"{results[model][variant][index] / results[model]['fused'][index]:.3f}"

    print(
        f"RESULT sdxl_klora_vs_fused={ratio('sdxl', 'klora_s')} "
        f"sdxl_dynamic_vs_fused={ratio('sdxl', 'dynamic')} "
        f"flux_klora_vs_fused={ratio('flux', 'klora_s')} mem_klora_vs_fused={ratio('sdxl', 'klora_s', 1)} "
        f"sdxl_klora_weights_vs_fused={ratio('sdxl', 'klora_w')} "
        f"mem_klora_weights_vs_fused={ratio('sdxl', 'klora_w', 1)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
