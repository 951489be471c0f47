"""The parameters every engine and host stand-in test fuses with: LoRAs named `subject` and `style`."""

from __future__ import annotations

from typing import Any

from lib_klora.params.model import KLoraParams

SUBJECT_STRENGTH, STYLE_STRENGTH = 0.8, 0.6


def fused_params(**overrides: Any) -> KLoraParams:
    """K-LoRA on, fusing the stand-ins' `subject` and `style` at the test strengths; overrides win."""
    values: dict[str, Any] = {
        "enabled": True,
        "subject": "subject",
        "style": "style",
        "subject_strength": SUBJECT_STRENGTH,
        "style_strength": STYLE_STRENGTH,
    }
    return KLoraParams(**(values | overrides))
