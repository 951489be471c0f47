"""Event handlers of the accordion: plain functions returning ``gr.update`` dicts."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import gradio as gr

from lib_klora.fusion.options import Method
from lib_klora.fusion.schedule import DEFAULT_BETA, default_beta
from lib_klora.web.ui_values import (
    GUIDANCE_GROUP_LABEL,
    GUIDANCE_ON_LABEL,
    LABELLED_CHOICES,
    NUMBER_STEP,
    SAME,
)


def _keep_if_listed(value: Any, names: Sequence[str]) -> str:
    return value if isinstance(value, str) and value in names else ""


NO_LORA_LABEL = "(none)"


def lora_choices(names: Sequence[str]) -> list[Any]:
    """The LoRA dropdowns' choices: an explicit empty choice first, then the names.

    gradio 4 replaces an empty value that is not among the choices with the first choice when the page
    loads, which would silently pick a LoRA; with "" listed, an untouched dropdown stays empty.
    """
    empty: Any = (NO_LORA_LABEL, "") if LABELLED_CHOICES else ""
    return [empty, *names]


def refresh_lora_choices(subject: Any, style: Any, names: Sequence[str]) -> tuple[dict, dict]:
    """Updates for the subject and style dropdowns after the LoRA list was re-read.

    A selection that vanished from the list is cleared rather than kept as a dangling custom value.
    """
    names = list(names)
    return (
        gr.update(choices=lora_choices(names), value=_keep_if_listed(subject, names)),
        gr.update(choices=lora_choices(names), value=_keep_if_listed(style, names)),
    )


def apply_card_pick(payload: Any, subject: Any, style: Any, names: Sequence[str]) -> tuple[dict, dict, dict]:
    """A click on a LoRA card's "K-LoRA subject/style" button (klora.js writes `payload`).

    `payload` is JSON ``{"role": "subject" | "style", "name": ...}``. The picked name goes to its
    dropdown and K-LoRA is switched on; both dropdowns get the fresh list, since the card may show a
    LoRA added after the page loaded. An unknown name or role changes nothing.
    """
    unchanged = (gr.update(), gr.update(), gr.update())
    try:
        data = json.loads(payload) if isinstance(payload, str) else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("role") not in ("subject", "style"):
        return unchanged
    names = list(names)
    name = data.get("name")
    if not isinstance(name, str) or name not in names:
        return unchanged
    if data["role"] == "subject":
        subject = name
    else:
        style = name
    return (
        gr.update(choices=lora_choices(names), value=_keep_if_listed(subject, names)),
        gr.update(choices=lora_choices(names), value=_keep_if_listed(style, names)),
        gr.update(value=True),
    )


def _is_pattern_default(beta: Any) -> bool:
    """True for an unset beta or one still equal to a pattern default (i.e. not edited by hand)."""
    if beta is None or beta == "":
        return True
    try:
        number = float(beta)
    except (TypeError, ValueError):
        return False
    return any(math.isclose(number, d, abs_tol=1e-9) for d in DEFAULT_BETA.values())


def beta_after_pattern_change(pattern: Any, beta: Any) -> dict:
    """The user picked another pattern: move beta to its default unless beta was edited by hand."""
    if not _is_pattern_default(beta):
        return gr.update()
    try:
        # gradio 3's Number update resets the arrow step to 1 unless it is given again
        return gr.update(value=default_beta(pattern), step=NUMBER_STEP)
    except (KeyError, ValueError):
        return gr.update()


def hires_beta_after_pattern_change(pattern: Any, beta: Any) -> dict:
    """Same for the hires pass; SAME pattern puts an untouched beta back to "same as first pass"."""
    if not _is_pattern_default(beta):
        return gr.update()
    if pattern in (None, "", SAME):
        return gr.update(value=None, step=NUMBER_STEP)
    return beta_after_pattern_change(pattern, None)


def method_used(wanted: Method, method: Any, hires: Any, hires_method: Any) -> bool:
    """Whether the first pass, or a hires pass with its own settings, runs method `wanted`."""
    return method == wanted or (hires == "separate" and hires_method == wanted)


def seed_visibility(method: Any, hires: Any = "same", hires_method: Any = None) -> dict:
    """The seed matters only to the random baseline, in the first or the separate hires pass."""
    return gr.update(visible=method_used(Method.RANDOM, method, hires, hires_method))


def dynamic_group_visibility(method: Any, hires: Any = "same", hires_method: Any = None) -> dict:
    """The KL settings matter only where method "dynamic" runs, in the first or the separate hires pass."""
    return gr.update(visible=method_used(Method.DYNAMIC, method, hires, hires_method))


def method_visibility(method: Any, hires: Any, hires_method: Any) -> tuple[dict, dict]:
    """Updates for the seed box and the "Dynamic fusion" group after a method or hires change."""
    return seed_visibility(method, hires, hires_method), dynamic_group_visibility(method, hires, hires_method)


def hires_group_visibility(hires: Any) -> dict:
    return gr.update(visible=hires == "separate")


def guidance_group_update(guidance: Any) -> dict:
    """Guidance switched on (by a click or a pasted infotext): open its section, which shows the upload
    boxes the infotext could not fill, and say "on" in its title, which stays visible when closed."""
    if guidance is True:
        return gr.update(open=True, label=GUIDANCE_ON_LABEL)
    return gr.update(label=GUIDANCE_GROUP_LABEL)
