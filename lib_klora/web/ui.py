"""The K-LoRA accordion, for gradio 3.41 (A1111, reForge) and gradio 4.40 (Forge).

Only gradio is imported here, never the WebUI's `modules`: the host glue passes in what it knows (the
LoRA list, the defaults). :func:`build_ui` creates components and wires events and does nothing else,
because the WebUI's API calls a script's ``ui()`` again inside a throw-away ``gr.Blocks`` for defaults.

Event handlers are plain module-level functions returning ``gr.update`` dicts, so tests run them
without a browser. Hover help and the "K-LoRA subject/style" buttons on LoRA cards live in
``javascript/klora.js``; the help texts reach it through a hidden HTML block (one source: FIELD_HELP).

Reference images come from two ``gr.File(type="binary")`` boxes: gradio 3.41 and 4.40 both hand the
script a list of raw ``bytes`` (or None), which KLoraParams turns into base64 text. No infotext holds
them, so they stay out of the paste wiring and a paste leaves them alone.
"""

from __future__ import annotations

import html
import inspect
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from lib_klora.fusion.options import Method
from lib_klora.fusion.schedule import DEFAULT_BETA, default_beta
from lib_klora.params.fields import (
    ALPHA_LIMIT,
    BETA_LIMIT,
    CHOICES,
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    ETA_LIMIT,
    FIELD_HELP,
    FIELD_LABELS,
    INFOTEXT_KEYS,
    INFOTEXT_NAMES_KEY,
    MAX_GUIDANCE_EVERY,
    MAX_GUIDANCE_ITERS,
    REFERENCE_FIELDS,
    TEMPERATURE_LIMIT,
)
from lib_klora.params.model import POSITIONAL_FIELDS, KLoraParams
from lib_klora.params.parsing import ParamsError

__all__ = [
    "GRADIO_MAJOR",
    "GUIDANCE_GROUP_LABEL",
    "GUIDANCE_WEIGHT_SLIDER",
    "GUIDANCE_WINDOW_SLIDER",
    "NUMBER_STEP",
    "SAME",
    "STRENGTH_SLIDER",
    "KLoraUI",
    "PasteKey",
    "apply_card_pick",
    "beta_after_pattern_change",
    "build_ui",
    "choices_for",
    "dynamic_group_visibility",
    "elem_id",
    "guidance_group_update",
    "hires_beta_after_pattern_change",
    "hires_group_visibility",
    "infotext_key",
    "method_visibility",
    "paste_value",
    "refresh_lora_choices",
    "seed_visibility",
    "ui_value",
]

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
# gradio 3.41 would show a (label, value) pair as the text "('K-LoRA', 'klora')"; 4.x shows the label.
_LABELLED_CHOICES = GRADIO_MAJOR >= 4
_DROPDOWN_CUSTOM = "allow_custom_value" in inspect.signature(gr.Dropdown.__init__).parameters

# The UI's word for "unset: keep the first pass's value" in hires choices; params reads it as None.
SAME = "same"
_SAME_LABEL = "Same as first pass"

# The model accepts strengths of -5..5 (API, tags); the sliders cover everyday use.
STRENGTH_SLIDER = (0.0, 2.0, 0.05)
# Same for the guidance weights (the model accepts 0..10), and the guidance window (a fraction of steps).
GUIDANCE_WEIGHT_SLIDER = (0.0, 2.0, 0.05)
GUIDANCE_WINDOW_SLIDER = (0.0, 1.0, 0.01)
_GUIDANCE_WEIGHTS = ("guidance_style", "guidance_subject", "guidance_subject_clip", "guidance_text")
NUMBER_STEP = 0.05  # arrow increment of the float boxes
# (low, high, arrow step); a low bound the model excludes (alpha > 0) is left to the model's message.
_NUMBER_LIMITS: dict[str, tuple[float, float, float]] = {
    "alpha": (0.0, ALPHA_LIMIT, NUMBER_STEP),
    "beta": (-BETA_LIMIT, BETA_LIMIT, NUMBER_STEP),
    "hires_alpha": (0.0, ALPHA_LIMIT, NUMBER_STEP),
    "hires_beta": (-BETA_LIMIT, BETA_LIMIT, NUMBER_STEP),
    "kl_temperature": (0.0, TEMPERATURE_LIMIT, 0.1),
    "guidance_eta": (0.0, ETA_LIMIT, 0.01),
}
_INT_LIMITS: dict[str, tuple[int, int]] = {
    "guidance_every": (1, MAX_GUIDANCE_EVERY),
    "guidance_iters": (1, MAX_GUIDANCE_ITERS),
}
GUIDANCE_GROUP_LABEL = "Reference guidance"
_GUIDANCE_ON_LABEL = f"{GUIDANCE_GROUP_LABEL} (on)"  # the closed section still tells that guidance runs

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


def _labelled(name: str) -> list[Any]:
    values = choices_for(name)
    if not _LABELLED_CHOICES:
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


# ---------------------------------------------------------------- event handlers (pure functions)


def _keep_if_listed(value: Any, names: Sequence[str]) -> str:
    return value if isinstance(value, str) and value in names else ""


NO_LORA_LABEL = "(none)"


def lora_choices(names: Sequence[str]) -> list[Any]:
    """The LoRA dropdowns' choices: an explicit empty choice first, then the names.

    gradio 4 replaces an empty value that is not among the choices with the first choice when the page
    loads, which would silently pick a LoRA; with "" listed, an untouched dropdown stays empty.
    """
    empty: Any = (NO_LORA_LABEL, "") if _LABELLED_CHOICES else ""
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


def _method_used(wanted: Method, method: Any, hires: Any, hires_method: Any) -> bool:
    """Whether the first pass, or a hires pass with its own settings, runs method `wanted`."""
    return method == wanted or (hires == "separate" and hires_method == wanted)


def seed_visibility(method: Any, hires: Any = "same", hires_method: Any = None) -> dict:
    """The seed matters only to the random baseline, in the first or the separate hires pass."""
    return gr.update(visible=_method_used(Method.RANDOM, method, hires, hires_method))


def dynamic_group_visibility(method: Any, hires: Any = "same", hires_method: Any = None) -> dict:
    """The KL settings matter only where method "dynamic" runs, in the first or the separate hires pass."""
    return gr.update(visible=_method_used(Method.DYNAMIC, method, hires, hires_method))


def method_visibility(method: Any, hires: Any, hires_method: Any) -> tuple[dict, dict]:
    """Updates for the seed box and the "Dynamic fusion" group after a method or hires change."""
    return seed_visibility(method, hires, hires_method), dynamic_group_visibility(method, hires, hires_method)


def hires_group_visibility(hires: Any) -> dict:
    return gr.update(visible=hires == "separate")


def guidance_group_update(guidance: Any) -> dict:
    """Guidance switched on (by a click or a pasted infotext): open its section, which shows the upload
    boxes the infotext could not fill, and say "on" in its title, which stays visible when closed."""
    if guidance is True:
        return gr.update(open=True, label=_GUIDANCE_ON_LABEL)
    return gr.update(label=GUIDANCE_GROUP_LABEL)


# ---------------------------------------------------------------- infotext paste


class PasteKey(str):
    """An infotext field name that is also the paste function for its component.

    A1111 and Forge call a callable target with the parsed infotext (so paste goes through
    KLoraParams.from_infotext, one parser for every field), while "Send to img2img" copies only the
    fields whose name is in ``paste_field_names``: being a `str`, this key matches there too.
    """

    field_name: str
    _reader: _InfotextReader
    _raw_none: bool

    def __new__(cls, key: str, field_name: str, reader: _InfotextReader, raw_none: bool) -> PasteKey:
        self = super().__new__(cls, key)
        self.field_name = field_name
        self._reader = reader
        self._raw_none = raw_none
        return self

    def __call__(self, entries: Mapping[str, Any]) -> Any:
        params = self._reader.read(entries)
        value = _NO_CHANGE if params is _UNREADABLE else paste_value(params, self.field_name)
        if value is _NO_CHANGE:
            return None  # the host leaves the component as it is
        # The host casts plain values to type(component.value); a component created empty (None)
        # would swallow them, so those get an update dict, which A1111 and Forge pass through.
        # gradio 3 turns any update of a Number into one with step=1 (its Number.update default), so
        # there the float boxes get their arrow step again. Only there: Forge's API `infotext` reads
        # gradio 3's "generic_update" dicts but would choke on gradio 4's.
        step = _NUMBER_LIMITS[self.field_name][2] if self.field_name in _NUMBER_LIMITS else None
        if step is not None and GRADIO_MAJOR < 4:
            return gr.update(value=value, step=step)
        return gr.update(value=value) if self._raw_none else value


_NO_CHANGE = object()


def paste_value(params: KLoraParams | None, name: str) -> Any:
    """What pasting an infotext puts in the component of `name`.

    `params` is ``KLoraParams.from_infotext(...)``: None means the image was made without K-LoRA, which
    switches K-LoRA off and leaves every other control alone. The reference images are never in an
    infotext, so their upload boxes are always left alone.
    """
    if name in REFERENCE_FIELDS:
        return _NO_CHANGE
    if params is None:
        return False if name == "enabled" else _NO_CHANGE
    return ui_value(params, name)


class _InfotextReader:
    """Parses one pasted infotext once, although every component's PasteKey asks for it.

    The host calls all targets with the same dict object, so the cache holds a reference to it and
    compares by identity. One tuple attribute, swapped whole, keeps concurrent pastes consistent.
    """

    def __init__(self) -> None:
        self._cache: tuple[Mapping[str, Any], Any] | None = None

    def read(self, entries: Mapping[str, Any]) -> Any:
        """KLoraParams, None (no K-LoRA in the infotext) or _UNREADABLE (K-LoRA entries that do not parse)."""
        cached = self._cache
        if cached is not None and cached[0] is entries:
            return cached[1]
        try:
            params: Any = KLoraParams.from_infotext(entries)
        except ParamsError as exc:
            # Reported once per paste; every K-LoRA control then stays as it is.
            print(f"K-LoRA: cannot paste these parameters: {exc}", file=sys.stderr)
            params = _UNREADABLE
        self._cache = (entries, params)
        return params


_UNREADABLE: Any = object()


# ---------------------------------------------------------------- building the accordion


@dataclass
class KLoraUI:
    """What ``Script.ui()`` needs: the components in POSITIONAL_FIELDS order, plus paste wiring.

    The script entry returns `components` and assigns `infotext_fields` / `paste_field_names` to the
    attributes of the same names.
    """

    components: list[Any]
    infotext_fields: list[tuple[Any, str | Callable[[Mapping[str, Any]], Any]]]
    paste_field_names: list[str]
    by_field: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # accordion, refresh button, hidden helpers


def _help_html() -> str:
    """FIELD_HELP as a data attribute; klora.js turns it into hover titles (one source for the texts)."""
    data = html.escape(json.dumps(FIELD_HELP, ensure_ascii=False), quote=True)
    return f'<div class="klora-help-data" data-help="{data}"></div>'


def _dropdown(name: str, value: Any, choices: list[Any], is_img2img: bool, **kwargs: Any) -> Any:
    custom = kwargs.pop("allow_custom_value", False)
    if _DROPDOWN_CUSTOM:  # every gradio the hosts ship has it; older ones would reject the keyword
        kwargs["allow_custom_value"] = custom
    return gr.Dropdown(
        label=FIELD_LABELS[name], choices=choices, value=value, elem_id=elem_id(is_img2img, name), **kwargs
    )


def _number(name: str, value: Any, is_img2img: bool, **kwargs: Any) -> Any:
    low, high, step = _NUMBER_LIMITS[name]
    return gr.Number(
        label=FIELD_LABELS[name],
        value=value,
        minimum=low,
        maximum=high,
        step=step,  # the arrows' increment; any other value can still be typed
        elem_id=elem_id(is_img2img, name),
        **kwargs,
    )


def _integer(name: str, value: Any, is_img2img: bool) -> Any:
    low, high = _INT_LIMITS[name]
    return gr.Number(
        label=FIELD_LABELS[name],
        value=value,
        precision=0,
        minimum=low,
        maximum=high,
        elem_id=elem_id(is_img2img, name),
    )


def _slider(name: str, value: Any, limits: tuple[float, float, float], is_img2img: bool) -> Any:
    low, high, step = limits
    return gr.Slider(
        label=FIELD_LABELS[name],
        minimum=low,
        maximum=high,
        step=step,
        value=value,
        elem_id=elem_id(is_img2img, name),
    )


def _radio(name: str, value: Any, is_img2img: bool) -> Any:
    return gr.Radio(
        label=FIELD_LABELS[name], choices=_labelled(name), value=value, elem_id=elem_id(is_img2img, name)
    )


def _checkbox(name: str, value: Any, is_img2img: bool) -> Any:
    return gr.Checkbox(label=FIELD_LABELS[name], value=value, elem_id=elem_id(is_img2img, name))


def _model_box(name: str, value: Any, placeholder: str, is_img2img: bool) -> Any:
    return gr.Textbox(
        label=FIELD_LABELS[name],
        value=value,
        lines=1,
        max_lines=1,
        placeholder=placeholder,
        elem_id=elem_id(is_img2img, name),
    )


def _reference_box(name: str, is_img2img: bool) -> Any:
    # type="binary": gradio 3.41 and 4.40 both pass a list of the files' bytes (None when empty).
    return gr.File(
        label=FIELD_LABELS[name],
        value=None,
        file_count="multiple",
        file_types=["image"],
        type="binary",
        elem_id=elem_id(is_img2img, name),
    )


def build_ui(
    is_img2img: bool, lora_names: Callable[[], list[str]], defaults: KLoraParams | None = None
) -> KLoraUI:
    """Create the K-LoRA accordion inside the current gradio Blocks context.

    `lora_names` is called now for the dropdowns and again by the refresh button and card picks.
    """
    params = defaults if defaults is not None else KLoraParams()
    names = list(lora_names())
    comps: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    eid = lambda name: elem_id(is_img2img, name)  # noqa: E731

    def value(name: str) -> Any:
        return ui_value(params, name)

    def name_dropdown(name: str) -> Any:
        # Custom values let a pasted or configured name of a LoRA not on this machine still show
        # (the generation then reports it); gradio 4 would otherwise reject a value outside choices.
        return _dropdown(name, value(name) or "", lora_choices(names), is_img2img, allow_custom_value=True)

    with gr.Accordion("K-LoRA", open=False, elem_id=eid("accordion")) as accordion:
        extras["accordion"] = accordion
        with gr.Row():
            comps["enabled"] = gr.Checkbox(
                label=FIELD_LABELS["enabled"], value=value("enabled"), elem_id=eid("enabled")
            )
            comps["show_map"] = gr.Checkbox(
                label=FIELD_LABELS["show_map"], value=value("show_map"), elem_id=eid("show_map")
            )
        with gr.Row(elem_classes=["klora-lora-row"]):
            comps["subject"] = name_dropdown("subject")
            comps["style"] = name_dropdown("style")
            extras["refresh"] = gr.Button(
                value="\U0001f504", elem_id=eid("refresh"), elem_classes=["tool", "klora-refresh"]
            )
        with gr.Row():
            low, high, step = STRENGTH_SLIDER
            for name in ("subject_strength", "style_strength"):
                comps[name] = gr.Slider(
                    label=FIELD_LABELS[name],
                    minimum=low,
                    maximum=high,
                    step=step,
                    value=value(name),
                    elem_id=eid(name),
                )
        with gr.Row():
            comps["method"] = _dropdown("method", value("method"), _labelled("method"), is_img2img)
            comps["pattern"] = gr.Radio(
                label=FIELD_LABELS["pattern"],
                choices=_labelled("pattern"),
                value=value("pattern"),
                elem_id=eid("pattern"),
            )
            comps["gamma"] = _dropdown("gamma", value("gamma"), _labelled("gamma"), is_img2img)
        with gr.Row():
            comps["alpha"] = _number("alpha", value("alpha"), is_img2img)
            comps["beta"] = _number("beta", value("beta"), is_img2img)
            comps["seed"] = gr.Number(
                label=FIELD_LABELS["seed"],
                value=value("seed"),
                precision=0,
                minimum=0,
                elem_id=eid("seed"),
                visible=_method_used(Method.RANDOM, value("method"), value("hires"), value("hires_method")),
            )
            comps["te_policy"] = _dropdown(
                "te_policy", value("te_policy"), _labelled("te_policy"), is_img2img
            )
        # Method "dynamic" only; shared by both passes, so it also shows for a separate dynamic hires pass.
        with gr.Accordion(
            "Dynamic fusion",
            open=True,
            visible=_method_used(Method.DYNAMIC, value("method"), value("hires"), value("hires_method")),
            elem_id=eid("dynamic_group"),
        ) as dynamic_group:
            extras["dynamic_group"] = dynamic_group
            with gr.Row():
                comps["kl_temperature"] = _number("kl_temperature", value("kl_temperature"), is_img2img)
                comps["kl_direction"] = _radio("kl_direction", value("kl_direction"), is_img2img)
                comps["kl_per_sample"] = _checkbox("kl_per_sample", value("kl_per_sample"), is_img2img)
                comps["kl_hybrid"] = _checkbox("kl_hybrid", value("kl_hybrid"), is_img2img)
        comps["hires"] = gr.Radio(
            label=FIELD_LABELS["hires"],
            choices=_labelled("hires"),
            value=value("hires"),
            elem_id=eid("hires"),
        )
        with gr.Accordion(
            "Hires pass settings", open=True, visible=value("hires") == "separate", elem_id=eid("hires_group")
        ) as hires_group:
            extras["hires_group"] = hires_group
            with gr.Row():
                comps["hires_method"] = _dropdown(
                    "hires_method", value("hires_method"), _labelled("hires_method"), is_img2img
                )
                comps["hires_pattern"] = gr.Radio(
                    label=FIELD_LABELS["hires_pattern"],
                    choices=_labelled("hires_pattern"),
                    value=value("hires_pattern"),
                    elem_id=eid("hires_pattern"),
                )
                comps["hires_alpha"] = _number("hires_alpha", value("hires_alpha"), is_img2img)
                comps["hires_beta"] = _number("hires_beta", value("hires_beta"), is_img2img)
        guided = value("guidance") is True
        with gr.Accordion(
            _GUIDANCE_ON_LABEL if guided else GUIDANCE_GROUP_LABEL,
            open=guided,
            elem_id=eid("guidance_group"),
        ) as guidance_group:
            extras["guidance_group"] = guidance_group
            with gr.Row():
                comps["guidance"] = _checkbox("guidance", value("guidance"), is_img2img)
                comps["guidance_decoder"] = _radio("guidance_decoder", value("guidance_decoder"), is_img2img)
            with gr.Row():
                for name in REFERENCE_FIELDS:
                    comps[name] = _reference_box(name, is_img2img)
            # Two weights a row: four sliders do not fit the settings column side by side.
            for pair in (_GUIDANCE_WEIGHTS[:2], _GUIDANCE_WEIGHTS[2:]):
                with gr.Row():
                    for name in pair:
                        comps[name] = _slider(name, value(name), GUIDANCE_WEIGHT_SLIDER, is_img2img)
            with gr.Row():
                for name in ("guidance_start", "guidance_end"):
                    comps[name] = _slider(name, value(name), GUIDANCE_WINDOW_SLIDER, is_img2img)
            with gr.Row():
                comps["guidance_eta"] = _number("guidance_eta", value("guidance_eta"), is_img2img)
                for name in ("guidance_every", "guidance_iters"):
                    comps[name] = _integer(name, value(name), is_img2img)
            with gr.Row():
                comps["clip_model"] = _model_box(
                    "clip_model", value("clip_model"), DEFAULT_CLIP_MODEL, is_img2img
                )
                comps["dino_model"] = _model_box(
                    "dino_model", value("dino_model"), DEFAULT_DINO_MODEL, is_img2img
                )
        # Invisible helpers for klora.js (gradio renders invisible blocks hidden, so JS can reach them).
        extras["help"] = gr.HTML(value=_help_html(), visible=False, elem_id=eid("help_data"))
        extras["card_pick"] = gr.Textbox(value="", visible=False, elem_id=eid("card_pick"))
        extras["card_pick_apply"] = gr.Button(
            value="K-LoRA card pick", visible=False, elem_id=eid("card_pick_apply")
        )

    missing = [name for name in POSITIONAL_FIELDS if name not in comps]
    if missing:  # a field added to KLoraParams needs a control here too
        raise RuntimeError(f"K-LoRA UI has no component for {missing}")
    components = [comps[name] for name in POSITIONAL_FIELDS]

    _wire_events(comps, extras, lora_names)

    reader = _InfotextReader()
    infotext_fields: list[tuple[Any, str | Callable[[Mapping[str, Any]], Any]]] = []
    for name in POSITIONAL_FIELDS:
        key_text = infotext_key(name)
        if key_text is None:
            # The upload boxes stay out of the paste wiring: a paste then never touches them, and
            # "Send to img2img" does not copy them (gr.File cannot take bytes back as its value).
            continue
        raw_none = getattr(comps[name], "value", None) is None
        key = PasteKey(key_text, name, reader, raw_none)
        infotext_fields.append((comps[name], key))
    paste_field_names = [str(key) for _, key in infotext_fields]
    by_field = {name: comps[name] for name in POSITIONAL_FIELDS}
    return KLoraUI(components, infotext_fields, paste_field_names, by_field, extras)


def _wire_events(comps: dict[str, Any], extras: dict[str, Any], lora_names: Callable[[], list[str]]) -> None:
    # Quick UI-only updates: no progress overlay, no queue, and no endpoints in the app's API.
    quiet: dict[str, Any] = {"show_progress": "hidden", "queue": False, "api_name": False}

    def refresh(subject: Any, style: Any) -> tuple[dict, dict]:
        return refresh_lora_choices(subject, style, lora_names())

    def pick(payload: Any, subject: Any, style: Any) -> tuple[dict, dict, dict]:
        return apply_card_pick(payload, subject, style, lora_names())

    extras["refresh"].click(
        fn=refresh,
        inputs=[comps["subject"], comps["style"]],
        outputs=[comps["subject"], comps["style"]],
        **quiet,
    )
    extras["card_pick_apply"].click(
        fn=pick,
        inputs=[extras["card_pick"], comps["subject"], comps["style"]],
        outputs=[comps["subject"], comps["style"], comps["enabled"]],
        **quiet,
    )
    # `.input` fires on user edits only: a pasted infotext sets pattern and beta together, and a
    # `.change` handler would overwrite the pasted beta with the pattern default.
    comps["pattern"].input(
        fn=beta_after_pattern_change,
        inputs=[comps["pattern"], comps["beta"]],
        outputs=[comps["beta"]],
        **quiet,
    )
    comps["hires_pattern"].input(
        fn=hires_beta_after_pattern_change,
        inputs=[comps["hires_pattern"], comps["hires_beta"]],
        outputs=[comps["hires_beta"]],
        **quiet,
    )
    # Visibility follows every change, pasted ones included.
    methods = [comps["method"], comps["hires"], comps["hires_method"]]
    for trigger in methods:
        trigger.change(
            fn=method_visibility, inputs=methods, outputs=[comps["seed"], extras["dynamic_group"]], **quiet
        )
    comps["hires"].change(
        fn=hires_group_visibility, inputs=[comps["hires"]], outputs=[extras["hires_group"]], **quiet
    )
    comps["guidance"].change(
        fn=guidance_group_update, inputs=[comps["guidance"]], outputs=[extras["guidance_group"]], **quiet
    )
