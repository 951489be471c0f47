from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_klora.fusion.cache import ScoreCache
from lib_klora.tools.synthetic import make_lora_tensors, write_lora

# A few real SD1.5 UNet layers (diffusers path -> (out, in)), small enough for fast tests.
SMALL_SHAPES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (320, 320),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
    "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2": (640, 2560),
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v": (1280, 1280),
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0": (320, 320),
}


@pytest.fixture
def cache() -> ScoreCache:
    return ScoreCache()


@pytest.fixture
def lora_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A kohya subject LoRA (rank 4, alpha 2) and a diffusers-format style LoRA (rank 8)."""
    subject = write_lora(
        tmp_path / "subject.safetensors",
        make_lora_tensors(SMALL_SHAPES, 4, seed=1, key_format="kohya", alpha=2.0),
    )
    style = write_lora(
        tmp_path / "style.safetensors", make_lora_tensors(SMALL_SHAPES, 8, seed=2, key_format="diffusers")
    )
    return subject, style
