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
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from lib_klora.fusion.options import Method
from lib_klora.params.fields import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    FIELD_HELP,
    FIELD_LABELS,
    REFERENCE_FIELDS,
)
from lib_klora.params.model import POSITIONAL_FIELDS, KLoraParams
from lib_klora.web.ui_events import (
    apply_card_pick,
    beta_after_pattern_change,
    guidance_group_update,
    hires_beta_after_pattern_change,
    hires_group_visibility,
    lora_choices,
    method_used,
    method_visibility,
    refresh_lora_choices,
)
from lib_klora.web.ui_paste import InfotextReader, PasteKey
from lib_klora.web.ui_values import (
    DROPDOWN_CUSTOM,
    GUIDANCE_GROUP_LABEL,
    GUIDANCE_ON_LABEL,
    GUIDANCE_WEIGHT_SLIDER,
    GUIDANCE_WEIGHTS,
    GUIDANCE_WINDOW_SLIDER,
    INT_LIMITS,
    NUMBER_LIMITS,
    STRENGTH_SLIDER,
    elem_id,
    infotext_key,
    labelled,
    ui_value,
)


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
    if DROPDOWN_CUSTOM:  # every gradio the hosts ship has it; older ones would reject the keyword
        kwargs["allow_custom_value"] = custom
    return gr.Dropdown(
        label=FIELD_LABELS[name], choices=choices, value=value, elem_id=elem_id(is_img2img, name), **kwargs
    )


def _number(name: str, value: Any, is_img2img: bool, **kwargs: Any) -> Any:
    low, high, step = NUMBER_LIMITS[name]
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
    low, high = INT_LIMITS[name]
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
        label=FIELD_LABELS[name], choices=labelled(name), value=value, elem_id=elem_id(is_img2img, name)
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
            comps["method"] = _dropdown("method", value("method"), labelled("method"), is_img2img)
            comps["pattern"] = gr.Radio(
                label=FIELD_LABELS["pattern"],
                choices=labelled("pattern"),
                value=value("pattern"),
                elem_id=eid("pattern"),
            )
            comps["gamma"] = _dropdown("gamma", value("gamma"), labelled("gamma"), is_img2img)
        with gr.Row():
            comps["alpha"] = _number("alpha", value("alpha"), is_img2img)
            comps["beta"] = _number("beta", value("beta"), is_img2img)
            comps["seed"] = gr.Number(
                label=FIELD_LABELS["seed"],
                value=value("seed"),
                precision=0,
                minimum=0,
                elem_id=eid("seed"),
                visible=method_used(Method.RANDOM, value("method"), value("hires"), value("hires_method")),
            )
            comps["te_policy"] = _dropdown("te_policy", value("te_policy"), labelled("te_policy"), is_img2img)
        # Method "dynamic" only; shared by both passes, so it also shows for a separate dynamic hires pass.
        with gr.Accordion(
            "Dynamic fusion",
            open=True,
            visible=method_used(Method.DYNAMIC, value("method"), value("hires"), value("hires_method")),
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
            choices=labelled("hires"),
            value=value("hires"),
            elem_id=eid("hires"),
        )
        with gr.Accordion(
            "Hires pass settings", open=True, visible=value("hires") == "separate", elem_id=eid("hires_group")
        ) as hires_group:
            extras["hires_group"] = hires_group
            with gr.Row():
                comps["hires_method"] = _dropdown(
                    "hires_method", value("hires_method"), labelled("hires_method"), is_img2img
                )
                comps["hires_pattern"] = gr.Radio(
                    label=FIELD_LABELS["hires_pattern"],
                    choices=labelled("hires_pattern"),
                    value=value("hires_pattern"),
                    elem_id=eid("hires_pattern"),
                )
                comps["hires_alpha"] = _number("hires_alpha", value("hires_alpha"), is_img2img)
                comps["hires_beta"] = _number("hires_beta", value("hires_beta"), is_img2img)
        guided = value("guidance") is True
        with gr.Accordion(
            GUIDANCE_ON_LABEL if guided else GUIDANCE_GROUP_LABEL,
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
            for pair in (GUIDANCE_WEIGHTS[:2], GUIDANCE_WEIGHTS[2:]):
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

    reader = InfotextReader()
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
