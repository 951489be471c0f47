"""Cost of one latent-guided sampling step relative to a plain one (imported by bench/dynamic_bench.py).

* unguided step: one evaluation of an SD1.5-sized UNet (diffusers ``UNet2DConditionModel`` with the SD1.5
  configuration, random weights) on a batch of 2 (CFG: cond + uncond), a 64×64 latent and a 77×768 context,
  then the CFG combination into x̂0, all under ``torch.no_grad()`` as in the WebUI;
* guided step: the same, plus `guide_x0` (lib_klora.guidance.refine) with ``iters=1``: TAESD decode to 512 px,
  CLIP ViT-B/32 and DINO ViT-S/16 at 224 px, and the backward pass to the latent (random weights throughout).

Both are timed side by side in interleaved repeats; the figure is the ratio of the median step times
(target ≤ 2). diffusers is a bench-only dependency (``pip install diffusers``).

    python bench/guidance_bench_part.py [--size 64] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_klora.fusion.scores import resolve_device
from lib_klora.guidance.encoders import ClipImageEncoder, DinoEncoder
from lib_klora.guidance.refine import GuidanceConfig, GuidanceEncoders, ReferenceSet, guide_x0
from lib_klora.guidance.taesd import TaesdDecoder, decoder_from_state_dict

# runwayml/stable-diffusion-v1-5 unet/config.json, written out so the bench needs no download.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
CFG_SCALE = 7.0


def _unet(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        raise RuntimeError(
            "the guidance bench needs diffusers for its SD1.5 UNet: pip install diffusers"
        ) from exc
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(device)
    if dtype != torch.float32:  # a float32 .to(dtype) only draws a diffusers warning
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guided_vs_unguided(
    size: int = 64,
    *,
    repeats: int = 5,
    device: str | torch.device | None = None,
    verbose: bool = True,
) -> float:
    """Median guided step time / median unguided step time (one image, CFG batch 2, latent ``size``²)."""
    dev = resolve_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = _unet(dev, dtype)
        taesd = decoder_from_state_dict(TaesdDecoder().state_dict()).to(dev, dtype)
        encoders = GuidanceEncoders(
            clip=ClipImageEncoder("ViT-B-32", None, device=dev, dtype=dtype),
            dino=DinoEncoder("vit_small_patch16_224.dino", pretrained=False, device=dev, dtype=dtype),
        )
        x = torch.randn(1, 4, size, size, device=dev, dtype=dtype)
        context = torch.randn(2, 77, 768, device=dev, dtype=dtype)
        ref_images = torch.rand(2, 3, 256, 256, device=dev)
    cfg = GuidanceConfig(style_clip=1.0, subject_dino=1.0, iters=1)
    with torch.no_grad():  # references are embedded once per job, outside the timed steps
        refs = ReferenceSet(
            style_clip=encoders.clip.embed(ref_images[:1], exact=True),
            subject_dino=encoders.dino.embed(ref_images[1:], exact=True),
        )
    sigma = 5.0
    timestep = torch.tensor([500.0] * 2, device=dev)

    def unguided() -> torch.Tensor:
        with torch.no_grad():
            x_in = torch.cat([x, x]) / (sigma**2 + 1) ** 0.5
            eps_cond, eps_uncond = unet(x_in, timestep, encoder_hidden_states=context).sample.chunk(2)
            eps = eps_uncond + CFG_SCALE * (eps_cond - eps_uncond)
            return x - sigma * eps  # k-diffusion's denoised x̂0

    def guided() -> torch.Tensor:
        with torch.no_grad():
            return guide_x0(unguided(), sigma, taesd, encoders, refs, cfg)

    def timed(fn: Callable[[], torch.Tensor]) -> float:
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        return time.perf_counter() - start

    timed(unguided)  # warm-up: allocator, kernels, lazy inits
    timed(guided)
    plain, with_guidance = [], []
    for i in range(repeats):  # interleaved, alternating the order, so drift and contention hit both alike
        first, second = (unguided, guided) if i % 2 == 0 else (guided, unguided)
        a, b = timed(first), timed(second)
        plain.append(a if first is unguided else b)
        with_guidance.append(b if first is unguided else a)
    ratio = statistics.median(with_guidance) / statistics.median(plain)
    if verbose:
        print(
            f"guidance bench ({dev}, {str(dtype).replace('torch.', '')}, latent {size}x{size} -> "
            f"{8 * size}px, {repeats} repeats): unguided {statistics.median(plain) * 1e3:.0f} ms, "
            f"guided {statistics.median(with_guidance) * 1e3:.0f} ms, ratio x{ratio:.3f}   [target <= 2]"
        )
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px, SD1.5's native size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: CUDA if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratio = guided_vs_unguided(args.size, repeats=args.repeats, device=args.device)
    print(f"RESULT guided_vs_unguided={ratio:.4f}")


if __name__ == "__main__":
    main()
