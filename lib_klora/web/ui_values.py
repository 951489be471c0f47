"""What the accordion's components show: gradio-version switches, limits, labels and each field's value."""

from __future__ import annotations

import inspect
from typing import Any

import gradio as gr

from lib_klora.params.fields import (
    ALPHA_LIMIT,
    BETA_LIMIT,
    CHOICES,
    ETA_LIMIT,
    INFOTEXT_KEYS,
    INFOTEXT_NAMES_KEY,
    MAX_GUIDANCE_EVERY,
    MAX_GUIDANCE_ITERS,
    REFERENCE_FIELDS,
    TEMPERATURE_LIMIT,
)
from lib_klora.params.model import KLoraParams

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
# gradio 3.41 would show a (label, value) pair as the text "('K-LoRA', 'klora')"; 4.x shows the label.
LABELLED_CHOICES = GRADIO_MAJOR >= 4
DROPDOWN_CUSTOM = "allow_custom_value" in inspect.signature(gr.Dropdown.__init__).parameters

# The UI's word for "unset: keep the first pass's value" in hires choices; params reads it as None.
SAME = "same"
_SAME_LABEL = "Same as first pass"

# The model accepts strengths of -5..5 (API, tags); the sliders cover everyday use.
STRENGTH_SLIDER = (0.0, 2.0, 0.05)
# Same for the guidance weights (the model accepts 0..10), and the guidance window (a fraction of steps).
GUIDANCE_WEIGHT_SLIDER = (0.0, 2.0, 0.05)
GUIDANCE_WINDOW_SLIDER = (0.0, 1.0, 0.01)
GUIDANCE_WEIGHTS = ("guidance_style", "guidance_subject", "guidance_subject_clip", "guidance_text")
NUMBER_STEP = 0.05  # arrow increment of the float boxes
# (low, high, arrow step); a low bound the model excludes (alpha > 0) is left to the model's message.
NUMBER_LIMITS: dict[str, tuple[float, float, float]] = {
    "alpha": (0.0, ALPHA_LIMIT, NUMBER_STEP),
    "beta": (-BETA_LIMIT, BETA_LIMIT, NUMBER_STEP),
    "hires_alpha": (0.0, ALPHA_LIMIT, NUMBER_STEP),
    "hires_beta": (-BETA_LIMIT, BETA_LIMIT, NUMBER_STEP),
    "kl_temperature": (0.0, TEMPERATURE_LIMIT, 0.1),
    "guidance_eta": (0.0, ETA_LIMIT, 0.01),
}
INT_LIMITS: dict[str, tuple[int, int]] = {
    "guidance_every": (1, MAX_GUIDANCE_EVERY),
    "guidance_iters": (1, MAX_GUIDANCE_ITERS),
}
GUIDANCE_GROUP_LABEL = "Reference guidance"
GUIDANCE_ON_LABEL = f"{GUIDANCE_GROUP_LABEL} (on)"  # the closed section still tells that guidance runs

_VALUE_LABELS: dict[str, dict[str, str]] = {
    "method": {
        "klora": "K-LoRA",
        "merge": "Direct merge (baseline)",
        "fixed": "Fixed selection (baseline)",
        "random": "Random selection (baseline)",
        "dynamic": "Dynamic (KL on activations)",
    },
    "pattern": {"s": "S", "s*": "S*"},
    "gamma": {"official": "Official code (mean of layer ratios)", "paper": "Paper (ratio of sums)"},
    "te_policy": {
        "both": "Both LoRAs",
        "subject": "Subject LoRA only",
        "style": "Style LoRA only",
        "none": "None",
    },
    "hires": {"same": "Same as first pass", "off": "Off (no K-LoRA)", "separate": "Separate settings"},
    "kl_direction": {"forward": "Forward KL(base‖LoRA)", "symmetric": "Symmetric (both directions)"},
    "guidance_decoder": {"taesd": "TAESD (fast)", "vae": "Full VAE (slow, more memory)"},
}
_VALUE_LABELS["hires_method"] = _VALUE_LABELS["method"]
_VALUE_LABELS["hires_pattern"] = _VALUE_LABELS["pattern"]
_HIRES_UNSET_FIELDS = ("hires_method", "hires_pattern")  # choice fields where SAME stands for None

# Infotext names of the components that have no key of their own (subject and style share "K-LoRA").
_EXTRA_KEYS = {
    "enabled": INFOTEXT_NAMES_KEY,
    "subject": f"{INFOTEXT_NAMES_KEY} subject",
    "style": f"{INFOTEXT_NAMES_KEY} style",
    "subject_strength": f"{INFOTEXT_NAMES_KEY} subject strength",
    "style_strength": f"{INFOTEXT_NAMES_KEY} style strength",
}


def elem_id(is_img2img: bool, name: str) -> str:
    """DOM id of a K-LoRA element; klora.js builds the same ids."""
    return f"klora_{'img2img' if is_img2img else 'txt2img'}_{name}"


def infotext_key(name: str) -> str | None:
    """Infotext name of a field's component; None for the reference images, which no infotext holds."""
    if name in REFERENCE_FIELDS:
        return None
    return INFOTEXT_KEYS.get(name) or _EXTRA_KEYS[name]


# ---------------------------------------------------------------- values shown by the components


def choices_for(name: str) -> list[str]:
    """Values of a choice field as the component holds them (hires fields add SAME for "unset")."""
    values = list(CHOICES[name])
    return [SAME, *values] if name in _HIRES_UNSET_FIELDS else values


def labelled(name: str) -> list[Any]:
    values = choices_for(name)
    if not LABELLED_CHOICES:
        return values
    labels = _VALUE_LABELS.get(name, {})
    return [(_SAME_LABEL if v == SAME else labels.get(v, v), v) for v in values]


def ui_value(params: KLoraParams, name: str) -> Any:
    """The value a component shows for one field of `params`.

    An unset beta shows the pattern's default (the number the user would otherwise have to look up);
    unset hires choices show SAME; names and numbers pass through. The upload boxes of the reference
    images always start empty (None): a gr.File value is a file path, not image data.
    """
    if name in REFERENCE_FIELDS:
        return None
    value = getattr(params, name)
    if name == "beta" and value is None:
        return params.effective_beta
    if name in _HIRES_UNSET_FIELDS and value is None:
        return SAME
    return value
