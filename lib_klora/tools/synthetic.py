"""Synthetic LoRA files with real SD1.5 / SDXL layer shapes, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

# (channels, transformer blocks per attention module) for every attention module, in diffusers naming.
_SD15_ATTENTIONS = (
    [(f"down_blocks.{b}.attentions.{a}", c, 1) for b, c in enumerate((320, 640, 1280)) for a in range(2)]
    + [("mid_block.attentions.0", 1280, 1)]
    + [
        (f"up_blocks.{b}.attentions.{a}", c, 1)
        for b, c in zip((1, 2, 3), (1280, 640, 320), strict=True)
        for a in range(3)
    ]
)
_SDXL_ATTENTIONS = (
    [(f"down_blocks.1.attentions.{a}", 640, 2) for a in range(2)]
    + [(f"down_blocks.2.attentions.{a}", 1280, 10) for a in range(2)]
    + [("mid_block.attentions.0", 1280, 10)]
    + [(f"up_blocks.0.attentions.{a}", 1280, 10) for a in range(3)]
    + [(f"up_blocks.1.attentions.{a}", 640, 2) for a in range(3)]
)
_CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}


def unet_layer_shapes(arch: str = "sd15", feed_forward: bool = True) -> dict[str, tuple[int, int]]:
    """Diffusers module path -> (out_features, in_features) of the transformer-block linears."""
    attentions = {"sd15": _SD15_ATTENTIONS, "sdxl": _SDXL_ATTENTIONS}[arch]
    context = _CONTEXT_DIM[arch]
    shapes: dict[str, tuple[int, int]] = {}
    for prefix, c, blocks in attentions:
        for t in range(blocks):
            block = f"{prefix}.transformer_blocks.{t}"
            for attn, kv_in in (("attn1", c), ("attn2", context)):
                shapes[f"{block}.{attn}.to_q"] = (c, c)
                shapes[f"{block}.{attn}.to_k"] = (c, kv_in)
                shapes[f"{block}.{attn}.to_v"] = (c, kv_in)
                shapes[f"{block}.{attn}.to_out.0"] = (c, c)
            if feed_forward:
                shapes[f"{block}.ff.net.0.proj"] = (8 * c, c)  # GEGLU: two 4c halves
                shapes[f"{block}.ff.net.2"] = (c, 4 * c)
    return shapes


def _kohya_stem(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def make_lora_tensors(
    shapes: dict[str, tuple[int, int]],
    rank: int,
    *,
    seed: int = 0,
    key_format: str = "kohya",
    alpha: float | None = None,
    layer_gain: Callable[[str], float] | None = None,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Random low-rank factors (both non-zero, unlike a freshly initialised LoRA) in a file format.

    key_format: "kohya" (lora_unet_*.lora_down/up + alpha), "diffusers" (the official K-LoRA script's
    doubled `unet.unet.` prefix, .lora.down/up) or "peft" (base_model.model.*.lora_A/B).
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, (out_features, in_features) in shapes.items():
        gain = layer_gain(path) if layer_gain else 1.0
        down = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        up = torch.randn(out_features, rank, generator=generator) * (gain / math.sqrt(rank))
        if key_format == "kohya":
            stem = _kohya_stem(path)
            tensors[f"{stem}.lora_down.weight"] = down.to(dtype)
            tensors[f"{stem}.lora_up.weight"] = up.to(dtype)
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        elif key_format == "diffusers":
            tensors[f"unet.unet.{path}.lora.down.weight"] = down.to(dtype)
            tensors[f"unet.unet.{path}.lora.up.weight"] = up.to(dtype)
        elif key_format == "peft":
            tensors[f"base_model.model.{path}.lora_A.weight"] = down.to(dtype)
            tensors[f"base_model.model.{path}.lora_B.weight"] = up.to(dtype)
        else:
            raise ValueError(f"unknown key format {key_format!r}")
    return tensors


def write_lora(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def depth_gain(favour: str, strength: float = 0.25) -> Callable[[str], float]:
    """A per-layer gain that makes a LoRA stronger in the encoder ("down") or decoder ("up") half,
    with some per-projection variation, so demo plans show layers switching at different steps."""

    def gain(path: str) -> float:
        half = "down" if path.startswith("down_blocks") else "up" if path.startswith("up_blocks") else "mid"
        base = 1.0 + (strength if half == favour else -strength / 2 if half != "mid" else 0.0)
        wobble = (sum(map(ord, path)) % 7) / 14.0  # deterministic spread over projections
        return base * (0.8 + wobble)

    return gain
