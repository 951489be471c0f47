"""The K-LoRA accordion under gradio 3.41 (A1111) and 4.40 (Forge), without a browser or a WebUI.

Skipped where gradio is not installed (the core's CI venvs). Meant for a venv with gradio 3.41.2 +
pydantic 1.10 and one with gradio 4.40.0 + pydantic 2 (+ huggingface_hub<0.26); torch is not needed,
so there: ``python -m pytest --noconftest tests/test_ui.py tests/test_xyz.py``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

from lib_klora.params.fields import CHOICES, FIELD_HELP, FIELD_LABELS, REFERENCE_FIELDS
from lib_klora.params.model import POSITIONAL_FIELDS, KLoraParams
from lib_klora.params.parsing import ParamsError

gr = pytest.importorskip("gradio")

from lib_klora.web import ui, ui_events, ui_paste, ui_values  # noqa: E402  (after the skip: they import gradio)

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["alpha_dog", "beta_style", "gamma ink"]
CHOICE_FIELDS = (
    "method",
    "pattern",
    "gamma",
    "te_policy",
    "hires",
    "hires_method",
    "hires_pattern",
    "kl_direction",
    "guidance_decoder",
)
NEW_FIELDS = POSITIONAL_FIELDS[POSITIONAL_FIELDS.index("show_map") + 1 :]
PASTED_FIELDS = tuple(name for name in POSITIONAL_FIELDS if name not in REFERENCE_FIELDS)


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


STYLE_PNG = png_bytes()
SUBJECT_PNG = png_bytes((10, 120, 240), (5, 7))
CUSTOM = KLoraParams(
    enabled=True,
    subject="alpha_dog",
    style="beta_style",
    subject_strength=0.8,
    style_strength=1.25,
    method="random",
    pattern="s*",
    alpha=2.0,
    gamma="paper",
    seed=42,
    te_policy="style",
    hires="separate",
    hires_method="merge",
    hires_pattern="s",
    hires_alpha=1.75,
    hires_beta=0.7,
    show_map=True,
)
# Every setting added with method "dynamic" and reference guidance, none at its default.
GUIDED = KLoraParams(
    enabled=True,
    subject="alpha_dog",
    style="beta_style",
    method="dynamic",
    pattern="s*",
    kl_temperature=0.35,
    kl_direction="symmetric",
    kl_per_sample=True,
    kl_hybrid=True,
    guidance=True,
    guidance_style=0.7,
    guidance_subject=1.45,
    guidance_subject_clip=0.25,
    guidance_text=0.1,
    guidance_eta=0.02,
    guidance_start=0.1,
    guidance_end=0.8,
    guidance_every=2,
    guidance_iters=3,
    guidance_decoder="vae",
    clip_model="ViT-L-14:openai",
    dino_model="vit_base_patch16_224.dino",
    style_refs=[STYLE_PNG],
    subject_refs=[SUBJECT_PNG, STYLE_PNG],
)
# Only the separate hires pass runs "dynamic": the KL settings still apply (and reach the infotext).
HIRES_DYNAMIC = KLoraParams(
    enabled=True,
    subject="alpha_dog",
    style="beta_style",
    hires="separate",
    hires_method="dynamic",
    kl_temperature=4.0,
    kl_direction="symmetric",
)


def build(is_img2img: bool = False, defaults: KLoraParams | None = None, names: list[str] | None = None):
    listed = list(NAMES if names is None else names)
    with gr.Blocks() as demo:
        built = ui.build_ui(is_img2img, lambda: listed, defaults)
    return demo, built


def choice_values(component: Any) -> list[Any]:
    """Values of a dropdown/radio whatever the gradio version stores (str, or (label, value) pairs)."""
    return [c[1] if isinstance(c, (tuple, list)) else c for c in component.choices]


def values_of(built: ui.KLoraUI) -> list[Any]:
    return [component.value for component in built.components]


def blocks_config(demo: Any) -> dict:
    return demo.config if getattr(demo, "config", None) else demo.get_config_file()


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("is_img2img", [False, True])
def test_components_follow_positional_fields(is_img2img: bool) -> None:
    _, built = build(is_img2img)
    tab = "img2img" if is_img2img else "txt2img"
    assert len(built.components) == len(POSITIONAL_FIELDS)
    assert [c.elem_id for c in built.components] == [f"klora_{tab}_{name}" for name in POSITIONAL_FIELDS]
    assert list(built.by_field.values()) == built.components


def test_every_new_field_has_its_control_in_the_right_section() -> None:
    _, built = build()
    kinds = {
        "kl_temperature": gr.Number,
        "kl_direction": gr.Radio,
        "kl_per_sample": gr.Checkbox,
        "kl_hybrid": gr.Checkbox,
        "guidance": gr.Checkbox,
        "guidance_style": gr.Slider,
        "guidance_subject": gr.Slider,
        "guidance_subject_clip": gr.Slider,
        "guidance_text": gr.Slider,
        "guidance_eta": gr.Number,
        "guidance_start": gr.Slider,
        "guidance_end": gr.Slider,
        "guidance_every": gr.Number,
        "guidance_iters": gr.Number,
        "guidance_decoder": gr.Radio,
        "clip_model": gr.Textbox,
        "dino_model": gr.Textbox,
        "style_refs": gr.File,
        "subject_refs": gr.File,
    }
    assert set(kinds) == set(NEW_FIELDS)  # a field added to the model needs a line here
    for name, kind in kinds.items():
        assert isinstance(built.by_field[name], kind), name
        assert built.by_field[name].label == FIELD_LABELS[name]

    def inside(group: Any) -> set[str]:
        found, todo = set(), list(group.children)
        while todo:
            block = todo.pop()
            found.add(getattr(block, "elem_id", None))
            todo.extend(getattr(block, "children", []))
        return found

    dynamic = inside(built.extras["dynamic_group"])
    guidance = inside(built.extras["guidance_group"])
    for name in NEW_FIELDS:
        assert (ui_values.elem_id(False, name) in dynamic) == name.startswith("kl_"), name
        assert (ui_values.elem_id(False, name) in guidance) == (not name.startswith("kl_")), name


def test_guidance_controls_ranges() -> None:
    _, built = build()
    for name in ("guidance_style", "guidance_subject", "guidance_subject_clip", "guidance_text"):
        slider = built.by_field[name]
        assert (slider.minimum, slider.maximum, slider.step) == ui_values.GUIDANCE_WEIGHT_SLIDER
    for name in ("guidance_start", "guidance_end"):
        slider = built.by_field[name]
        assert (slider.minimum, slider.maximum, slider.step) == ui_values.GUIDANCE_WINDOW_SLIDER
    for name, high in (("guidance_every", 1000), ("guidance_iters", 10)):
        box = built.by_field[name]
        assert (box.precision, box.minimum, box.maximum) == (0, 1, high)
        assert isinstance(box.value, int)
    assert (built.by_field["guidance_eta"].minimum, built.by_field["guidance_eta"].maximum) == (0.0, 1.0)
    assert (built.by_field["kl_temperature"].minimum, built.by_field["kl_temperature"].maximum) == (
        0.0,
        100.0,
    )
    for name in ("clip_model", "dino_model"):
        assert built.by_field[name].max_lines == 1
        assert built.by_field[name].lines == 1


@pytest.mark.parametrize("name", REFERENCE_FIELDS)
def test_reference_boxes_take_several_images_as_bytes(name: str) -> None:
    _, built = build()
    box = built.by_field[name]
    assert (box.file_count, box.file_types, box.type) == ("multiple", ["image"], "binary")
    assert box.value is None


def test_every_element_id_is_unique_across_both_tabs() -> None:
    _, a = build(False)
    _, b = build(True)
    ids = [c.elem_id for c in a.components + b.components]
    ids += [x.elem_id for x in list(a.extras.values()) + list(b.extras.values())]
    assert all(ids) and len(ids) == len(set(ids))


def test_building_twice_in_one_blocks_has_no_side_effects() -> None:
    # The WebUI's API calls ui() again inside a throw-away Blocks for its defaults.
    calls: list[int] = []

    def names() -> list[str]:
        calls.append(1)
        return NAMES

    with gr.Blocks():
        first = ui.build_ui(False, names)
    with gr.Blocks():
        second = ui.build_ui(False, names)
    assert len(calls) == 2  # read once per build, nothing else
    assert values_of(first) == values_of(second)


def test_no_gradio_warnings_while_building() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build(False, CUSTOM)
        build(True)


# ---------------------------------------------------------------- defaults and choices


def test_defaults_are_the_model_defaults() -> None:
    _, built = build()
    shown = KLoraParams.from_any(values_of(built))
    defaults = KLoraParams()
    # beta is shown resolved (the pattern default) instead of empty
    assert shown.to_dict() == {**defaults.to_dict(), "beta": defaults.effective_beta}
    assert built.by_field["beta"].value == 0.5
    assert built.by_field["hires_method"].value == ui_values.SAME
    assert built.by_field["hires_alpha"].value is None
    assert built.by_field["style_refs"].value is None and built.by_field["subject_refs"].value is None


def test_custom_defaults_round_trip() -> None:
    _, built = build(defaults=CUSTOM)
    assert KLoraParams.from_any(values_of(built)).to_dict() == {**CUSTOM.to_dict(), "beta": 1.3}
    assert built.by_field["seed"].visible is True  # random method
    assert built.extras["hires_group"].visible is True  # separate hires


def test_seed_and_hires_group_hidden_by_default() -> None:
    _, built = build()
    assert built.by_field["seed"].visible is False
    assert built.extras["hires_group"].visible is False
    assert built.extras["dynamic_group"].visible is False


def test_guidance_section_closed_by_default() -> None:
    _, built = build()
    group = built.extras["guidance_group"]
    assert group.open is False
    assert group.label == ui_values.GUIDANCE_GROUP_LABEL == "Reference guidance"
    assert group.visible is not False


@pytest.mark.parametrize("params", [GUIDED, HIRES_DYNAMIC])
def test_dynamic_defaults_show_their_group(params: KLoraParams) -> None:
    _, built = build(defaults=params)
    assert built.extras["dynamic_group"].visible is True
    assert built.by_field["seed"].visible is False


def test_a_random_hires_pass_shows_the_seed_from_the_start() -> None:
    _, built = build(defaults=KLoraParams(hires="separate", hires_method="random"))
    assert built.by_field["seed"].visible is True
    assert built.extras["dynamic_group"].visible is False


def test_new_custom_defaults_round_trip() -> None:
    # The upload boxes start empty whatever the defaults hold (a gr.File value is a file path)...
    _, built = build(defaults=GUIDED)
    values = dict(zip(POSITIONAL_FIELDS, values_of(built), strict=True))
    assert values["style_refs"] is None and values["subject_refs"] is None
    # ...everything else shows the configured value.
    values.update(style_refs=[STYLE_PNG], subject_refs=[SUBJECT_PNG, STYLE_PNG])
    assert KLoraParams.from_any(list(values.values())).to_dict() == {**GUIDED.to_dict(), "beta": 1.3}
    assert built.extras["guidance_group"].open is True  # guidance on: its section is not hidden away
    assert built.extras["guidance_group"].label == "Reference guidance (on)"
    _, built = build(defaults=HIRES_DYNAMIC)
    assert KLoraParams.from_any(values_of(built)).to_dict() == {**HIRES_DYNAMIC.to_dict(), "beta": 0.5}


@pytest.mark.parametrize("name", CHOICE_FIELDS)
def test_choice_values_are_model_values_and_hold_the_default(name: str) -> None:
    _, built = build()
    component = built.by_field[name]
    values = choice_values(component)
    assert component.value in values
    unset = name in ("hires_method", "hires_pattern")  # SAME stands for "keep the first pass's value"
    assert values == ([ui_values.SAME] if unset else []) + list(CHOICES[name])
    for value in values:  # each one is accepted by the model
        parsed = KLoraParams(**{name: value})
        assert getattr(parsed, name) == (None if unset and value == ui_values.SAME else value)


def test_labelled_choices_on_gradio_4_plain_values_on_gradio_3() -> None:
    _, built = build()
    choices = built.by_field["method"].choices
    if ui_values.GRADIO_MAJOR >= 4:
        assert ("Direct merge (baseline)", "merge") in [tuple(c) for c in choices]
        assert ("Dynamic (KL on activations)", "dynamic") in [tuple(c) for c in choices]
        assert ("Dynamic (KL on activations)", "dynamic") in [
            tuple(c) for c in built.by_field["hires_method"].choices
        ]
        assert [tuple(c)[1] for c in built.by_field["kl_direction"].choices] == ["forward", "symmetric"]
    else:  # gradio 3.41 would print "('K-LoRA', 'klora')"
        assert choices == list(CHOICES["method"])


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_every_choice_has_a_label(name: str) -> None:
    # gradio 4 shows these labels; a value without one would show as its bare model word
    assert set(ui_values._VALUE_LABELS[name]) == set(CHOICES[name])


def test_lora_dropdowns_list_the_names_and_start_empty() -> None:
    _, built = build()
    for name in ("subject", "style"):
        component = built.by_field[name]
        assert choice_values(component) == ["", *NAMES]  # an explicit empty choice keeps gradio 4 empty
        assert component.value == ""


def test_lora_dropdowns_show_a_configured_name() -> None:
    _, built = build(defaults=CUSTOM)
    assert built.by_field["subject"].value == "alpha_dog"
    assert built.by_field["style"].value == "beta_style"


def test_empty_lora_list_builds() -> None:
    _, built = build(names=[])
    assert choice_values(built.by_field["subject"]) == [""]


def test_strength_sliders_cover_zero_to_two() -> None:
    _, built = build()
    for name in ("subject_strength", "style_strength"):
        slider = built.by_field[name]
        assert (slider.minimum, slider.maximum, slider.step) == ui_values.STRENGTH_SLIDER


# ---------------------------------------------------------------- event handlers


def test_refresh_keeps_values_still_listed() -> None:
    subject, style = ui_events.refresh_lora_choices("alpha_dog", "removed", ["alpha_dog", "new_one"])
    assert subject["choices"] == style["choices"] == ui_events.lora_choices(["alpha_dog", "new_one"])
    assert subject["value"] == "alpha_dog"
    assert style["value"] == ""


def test_refresh_clears_none_values() -> None:
    subject, style = ui_events.refresh_lora_choices(None, "", NAMES)
    assert subject["value"] == style["value"] == ""


@pytest.mark.parametrize("role", ["subject", "style"])
def test_card_pick_sets_the_dropdown_and_enables(role: str) -> None:
    payload = json.dumps({"role": role, "name": "gamma ink"})
    subject, style, enabled = ui_events.apply_card_pick(payload, "alpha_dog", "beta_style", NAMES)
    picked, other = (subject, style) if role == "subject" else (style, subject)
    assert picked["value"] == "gamma ink"
    assert other["value"] == ("beta_style" if role == "subject" else "alpha_dog")
    assert subject["choices"] == ui_events.lora_choices(NAMES) and style["choices"] == ui_events.lora_choices(
        NAMES
    )
    assert enabled["value"] is True


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps({"role": "subject", "name": "not listed"}),
        json.dumps({"role": "negative", "name": "alpha_dog"}),
        json.dumps(["subject", "alpha_dog"]),
        "not json",
        "",
        None,
    ],
)
def test_card_pick_ignores_bad_payloads(payload: Any) -> None:
    for update in ui_events.apply_card_pick(payload, "alpha_dog", "", NAMES):
        assert "value" not in update and "choices" not in update


@pytest.mark.parametrize(
    ("pattern", "beta", "expected"),
    [("s*", 0.5, 1.3), ("s", 1.3, 0.5), ("s*", None, 1.3), ("s", "", 0.5), ("s*", 1.3, 1.3)],
)
def test_pattern_change_moves_an_untouched_beta(pattern: str, beta: Any, expected: float) -> None:
    assert ui_events.beta_after_pattern_change(pattern, beta)["value"] == expected


@pytest.mark.parametrize(("pattern", "beta"), [("s*", 0.9), ("s", 0.0), ("bogus", 0.5), (None, 0.5)])
def test_pattern_change_keeps_an_edited_beta(pattern: Any, beta: Any) -> None:
    assert "value" not in ui_events.beta_after_pattern_change(pattern, beta)


def test_hires_pattern_change() -> None:
    assert ui_events.hires_beta_after_pattern_change("s*", None)["value"] == 1.3
    assert ui_events.hires_beta_after_pattern_change("s", 1.3)["value"] == 0.5
    assert (
        ui_events.hires_beta_after_pattern_change(ui_values.SAME, 1.3)["value"] is None
    )  # back to "same as first pass"
    assert "value" not in ui_events.hires_beta_after_pattern_change("s*", 0.77)
    assert "value" not in ui_events.hires_beta_after_pattern_change(ui_values.SAME, 0.77)


def test_visibility_handlers() -> None:
    assert ui_events.seed_visibility("random")["visible"] is True
    assert ui_events.seed_visibility("klora")["visible"] is False
    assert ui_events.hires_group_visibility("separate")["visible"] is True
    assert ui_events.hires_group_visibility("same")["visible"] is False


@pytest.mark.parametrize(
    ("method", "hires", "hires_method", "dynamic", "seed"),
    [
        ("klora", "same", ui_values.SAME, False, False),
        ("dynamic", "same", ui_values.SAME, True, False),
        ("dynamic", "off", "merge", True, False),  # the first pass still runs dynamic
        ("klora", "separate", "dynamic", True, False),
        ("klora", "same", "dynamic", False, False),  # hires method ignored unless "separate"
        ("klora", "off", "dynamic", False, False),
        ("dynamic", "separate", "random", True, True),
        ("klora", "separate", "random", False, True),  # the hires pass uses the seed
        ("random", "separate", ui_values.SAME, False, True),
        ("klora", "separate", ui_values.SAME, False, False),
        (None, None, None, False, False),
    ],
)
def test_method_visibility(method: Any, hires: Any, hires_method: Any, dynamic: bool, seed: bool) -> None:
    assert ui_events.dynamic_group_visibility(method, hires, hires_method) == gr.update(visible=dynamic)
    assert ui_events.seed_visibility(method, hires, hires_method) == gr.update(visible=seed)
    assert ui_events.method_visibility(method, hires, hires_method) == (
        gr.update(visible=seed),
        gr.update(visible=dynamic),
    )


def test_dynamic_visibility_defaults_to_the_first_pass() -> None:
    assert ui_events.dynamic_group_visibility("dynamic")["visible"] is True
    assert ui_events.dynamic_group_visibility("merge")["visible"] is False


def test_guidance_switch_opens_and_titles_its_section() -> None:
    on = ui_events.guidance_group_update(True)
    assert on["open"] is True and on["label"] == "Reference guidance (on)"
    for value in (False, None):
        off = ui_events.guidance_group_update(value)
        assert off["label"] == "Reference guidance"
        assert "open" not in off  # switching off leaves the section as the user has it


def dependencies(demo: Any) -> dict[tuple[str, str], list[tuple[list[str], list[str]]]]:
    """(trigger elem_id, event) -> [(input elem_ids, output elem_ids), ...], from either gradio's config."""
    config = blocks_config(demo)
    ids = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    wiring: dict[tuple[str, str], list[tuple[list[str], list[str]]]] = {}
    for dep in config["dependencies"]:
        for target in dep["targets"]:
            # gradio 4: [id, event] pairs; gradio 3: bare ids with the event in "trigger"
            block, event = (
                (target[0], target[1]) if isinstance(target, (list, tuple)) else (target, dep["trigger"])
            )
            wiring.setdefault((ids[block], event), []).append(
                ([ids[i] for i in dep["inputs"]], [ids[o] for o in dep["outputs"]])
            )
    return wiring


def test_events_are_wired_to_the_right_components() -> None:
    demo, _ = build()
    e = "klora_txt2img_"
    wiring = dependencies(demo)
    assert wiring[(e + "refresh", "click")] == [([e + "subject", e + "style"], [e + "subject", e + "style"])]
    assert wiring[(e + "card_pick_apply", "click")] == [
        ([e + "card_pick", e + "subject", e + "style"], [e + "subject", e + "style", e + "enabled"])
    ]
    # user edits only: a pasted infotext must not reset the pasted beta
    assert wiring[(e + "pattern", "input")] == [([e + "pattern", e + "beta"], [e + "beta"])]
    assert wiring[(e + "hires_pattern", "input")] == [
        ([e + "hires_pattern", e + "hires_beta"], [e + "hires_beta"])
    ]
    # `.change`, so a pasted method or hires mode updates what is shown too
    methods = ([e + "method", e + "hires", e + "hires_method"], [e + "seed", e + "dynamic_group"])
    assert wiring[(e + "method", "change")] == [methods]
    assert wiring[(e + "hires_method", "change")] == [methods]
    assert wiring[(e + "hires", "change")] == [methods, ([e + "hires"], [e + "hires_group"])]
    assert wiring[(e + "guidance", "change")] == [([e + "guidance"], [e + "guidance_group"])]
    assert not [key for key in wiring if key[1] == "change" and key[0] == e + "pattern"]
    # nothing reacts to the upload boxes (their bytes are read once, by the generation)
    assert not [key for key in wiring if key[0] in (e + "style_refs", e + "subject_refs")]


def run_event(demo: Any, trigger: str, inputs: list[Any], output: str | None = None) -> list[Any]:
    """Run one event through gradio's own pre/postprocessing, as a browser request would.

    With several events on `trigger`, `output` (an elem_id) picks the one that updates it.
    """
    config = blocks_config(demo)
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    index = next(
        i
        for i, dep in enumerate(config["dependencies"])
        if ids[trigger] in [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]
        and (output is None or ids[output] in dep["outputs"])
    )
    try:
        from gradio.state_holder import SessionState  # gradio 4

        state: Any = SessionState(demo)
    except ImportError:  # gradio 3
        state = {}
    return asyncio.run(demo.process_api(index, inputs, state))["data"]


def test_refresh_button_through_gradio() -> None:
    names = ["alpha_dog"]
    with gr.Blocks() as demo:
        ui.build_ui(False, lambda: names, CUSTOM)
    names[:] = ["alpha_dog", "delta"]
    subject, style = run_event(demo, "klora_txt2img_refresh", ["alpha_dog", "beta_style"])
    assert subject["value"] == "alpha_dog" and style["value"] == ""
    values = [c[1] if isinstance(c, (list, tuple)) else c for c in subject["choices"]]
    assert values == ["", "alpha_dog", "delta"]


def test_card_pick_through_gradio() -> None:
    demo, _ = build()
    payload = json.dumps({"role": "style", "name": "gamma ink"})
    subject, style, enabled = run_event(demo, "klora_txt2img_card_pick_apply", [payload, "alpha_dog", ""])
    assert (subject["value"], style["value"], enabled["value"]) == ("alpha_dog", "gamma ink", True)


def test_hires_visibility_through_gradio() -> None:
    demo, _ = build()
    assert (
        run_event(demo, "klora_txt2img_hires", ["separate"], "klora_txt2img_hires_group")[0]["visible"]
        is True
    )


def test_method_visibility_through_gradio() -> None:
    demo, _ = build()
    e = "klora_txt2img_"
    seed, dynamic = run_event(demo, e + "method", ["dynamic", "same", ui_values.SAME])
    assert (seed["visible"], dynamic["visible"]) == (False, True)
    seed, dynamic = run_event(demo, e + "hires_method", ["klora", "separate", "random"])
    assert (seed["visible"], dynamic["visible"]) == (True, False)
    seed, dynamic = run_event(demo, e + "hires", ["klora", "separate", "dynamic"], e + "dynamic_group")
    assert (seed["visible"], dynamic["visible"]) == (False, True)


def test_guidance_switch_through_gradio() -> None:
    demo, _ = build()
    (group,) = run_event(demo, "klora_txt2img_guidance", [True])
    assert group["open"] is True and group["label"] == "Reference guidance (on)"


# ---------------------------------------------------------------- infotext paste


def paste_like_a1111(built: ui.KLoraUI, entries: dict[str, str]) -> list[Any]:
    """What A1111/Forge `connect_paste` hands each component, following their conversion rules."""
    results = []
    for component, key in built.infotext_fields:
        value = key(entries) if callable(key) else entries.get(key)
        if value is None:
            results.append(gr.update())
        elif isinstance(value, dict):
            results.append(value)
        else:
            value_type = type(component.value)
            if value_type is bool and value == "False":
                value = False
            elif value_type is int:
                value = float(value)
            else:
                value = value_type(value)  # a NoneType component would fail here: none may get here
            results.append(gr.update(value=value))
    return results


def infotext_entries(params: KLoraParams) -> dict[str, str]:
    return {"Steps": "20", "Sampler": "Euler a", **params.to_infotext()}


def uploads_of(params: KLoraParams, name: str) -> list[bytes] | None:
    """What a reference box hands the script for the images of `params`: the files' bytes, or None."""
    return [base64.b64decode(text) for text in getattr(params, name)] or None


@pytest.mark.parametrize(
    "params", [CUSTOM, KLoraParams(enabled=True, subject="a", style="b"), GUIDED, HIRES_DYNAMIC]
)
def test_paste_restores_every_field(params: KLoraParams) -> None:
    _, built = build()
    updates = paste_like_a1111(built, infotext_entries(params))
    assert all("value" in update for update in updates)
    field_of = {id(component): name for name, component in built.by_field.items()}
    fields = [field_of[id(component)] for component, _ in built.infotext_fields]
    assert fields == list(PASTED_FIELDS)
    values = dict(zip(fields, [update["value"] for update in updates], strict=True))
    # The upload boxes keep what the user put there; with the images of `params` the settings are complete.
    values.update({name: uploads_of(params, name) for name in REFERENCE_FIELDS})
    pasted = KLoraParams.from_any([values[name] for name in POSITIONAL_FIELDS])
    assert pasted.to_dict() == {**params.to_dict(), "beta": params.effective_beta}


def test_paste_brings_the_new_settings_into_their_controls() -> None:
    _, built = build()
    updates = paste_like_a1111(built, infotext_entries(GUIDED))
    shown = {
        str(key): update["value"] for (_, key), update in zip(built.infotext_fields, updates, strict=True)
    }
    assert shown["K-LoRA method"] == "dynamic"
    assert shown["K-LoRA KL temperature"] == 0.35
    assert shown["K-LoRA KL direction"] == "symmetric"
    assert shown["K-LoRA KL per image"] is True and shown["K-LoRA KL hybrid"] is True
    assert shown["K-LoRA guidance"] is True
    assert shown["K-LoRA guidance every"] == 2 and shown["K-LoRA guidance iters"] == 3
    assert shown["K-LoRA guidance decoder"] == "vae"
    assert shown["K-LoRA CLIP"] == "ViT-L-14:openai"
    assert shown["K-LoRA DINO"] == "vit_base_patch16_224.dino"


def test_pasted_numbers_keep_their_arrow_step() -> None:
    _, built = build()
    updates = paste_like_a1111(built, infotext_entries(GUIDED))
    by_name = {
        key.field_name: (component, update)
        for (component, key), update in zip(built.infotext_fields, updates, strict=True)
    }
    for name in ("alpha", "beta", "kl_temperature", "guidance_eta", "hires_alpha"):
        component, update = by_name[name]
        sent = update
        if ui_values.GRADIO_MAJOR < 4:
            # what gradio 3 sends the browser for this update (its Number.update would add step=1)
            from gradio.blocks import postprocess_update_dict

            sent = postprocess_update_dict(component, update, True)
        assert sent.get("step", component.step) == component.step != 1, name
    if ui_values.GRADIO_MAJOR >= 4:  # plain values there: Forge's API `infotext` casts them to the box's type
        assert by_name["kl_temperature"][1] == {"__type__": "update", "value": 0.35}  # the helper's wrapping
        key = next(key for _, key in built.infotext_fields if key.field_name == "kl_temperature")
        assert key(infotext_entries(GUIDED)) == 0.35


@pytest.mark.parametrize("params", [CUSTOM, GUIDED, HIRES_DYNAMIC])
def test_api_infotext_reads_every_pasted_value(params: KLoraParams) -> None:
    """A1111's and Forge's API `infotext` (api.py apply_infotext.get_field_value) on our paste targets."""
    _, built = build()
    entries = infotext_entries(params)
    read: dict[str, Any] = {}
    for component, key in built.infotext_fields:
        value = key(entries)
        target_type = type(component.value)
        if value is None or target_type is type(None):
            continue  # the host leaves the script argument at its default
        if isinstance(value, dict) and value.get("__type__") == "generic_update":  # gradio 3's gr.update
            value = value.get("value")
        if value is not None and not isinstance(value, target_type):
            value = target_type(value)  # a gradio 4 update dict here would raise
        read[key.field_name] = value
    assert read["kl_temperature"] == params.kl_temperature
    assert read["guidance_eta"] == params.guidance_eta
    assert read["guidance_every"] == params.guidance_every
    assert read["clip_model"] == params.clip_model
    assert not set(read) & set(REFERENCE_FIELDS)


def test_paste_of_an_infotext_without_the_new_keys_resets_them() -> None:
    # An older image (no KL / guidance keys) gives the defaults, as every other absent key does.
    _, built = build(defaults=GUIDED)
    updates = paste_like_a1111(built, infotext_entries(CUSTOM))
    shown = {
        str(key): update["value"] for (_, key), update in zip(built.infotext_fields, updates, strict=True)
    }
    defaults = KLoraParams()
    assert shown["K-LoRA guidance"] is False
    assert shown["K-LoRA KL temperature"] == defaults.kl_temperature
    assert shown["K-LoRA guidance decoder"] == defaults.guidance_decoder
    assert shown["K-LoRA CLIP"] == defaults.clip_model


@pytest.mark.parametrize(
    "entries",
    [
        infotext_entries(GUIDED),
        infotext_entries(CUSTOM),
        {"Steps": "20"},  # no K-LoRA: K-LoRA switches off, the uploads stay
        {"K-LoRA": "same:same"},  # broken K-LoRA entries
        {**infotext_entries(GUIDED), "K-LoRA style refs": base64.b64encode(STYLE_PNG).decode()},
    ],
)
def test_paste_never_touches_the_reference_boxes(entries: dict[str, str]) -> None:
    _, built = build()
    targets = [component for component, _ in built.infotext_fields]
    for name in REFERENCE_FIELDS:
        # The host's paste (and "Send to img2img", and the API's `infotext`) only reaches listed targets.
        assert all(component is not built.by_field[name] for component in targets)
        assert ui_values.infotext_key(name) is None
        assert name not in [key.field_name for _, key in built.infotext_fields]
    updates = paste_like_a1111(built, entries)
    assert len(updates) == len(POSITIONAL_FIELDS) - len(REFERENCE_FIELDS)


def test_paste_value_leaves_references_alone() -> None:
    for params in (GUIDED, None):
        for name in REFERENCE_FIELDS:
            assert ui_paste.paste_value(params, name) is ui_paste._NO_CHANGE
            assert ui_values.ui_value(GUIDED, name) is None  # a box shows files, never base64 text


@pytest.mark.parametrize("defaults", [CUSTOM, GUIDED])
def test_paste_without_klora_disables_and_leaves_the_rest(defaults: KLoraParams) -> None:
    _, built = build(defaults=defaults)
    updates = paste_like_a1111(built, {"Steps": "20"})
    assert updates[0]["value"] is False
    assert all("value" not in update for update in updates[1:])


def test_paste_of_broken_klora_entries_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    _, built = build()
    updates = paste_like_a1111(built, {"K-LoRA": "same:same"})
    assert all("value" not in update for update in updates)
    assert capsys.readouterr().err.count("cannot paste") == 1  # one paste, one message


def test_paste_parses_the_infotext_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _, built = build()
    calls = []
    original = KLoraParams.from_infotext.__func__

    def counting(cls: Any, entries: Any) -> Any:
        calls.append(entries)
        return original(cls, entries)

    monkeypatch.setattr(KLoraParams, "from_infotext", classmethod(counting))
    paste_like_a1111(built, infotext_entries(CUSTOM))
    paste_like_a1111(built, infotext_entries(CUSTOM))
    assert len(calls) == 2  # once per pasted dict, not once per component


def test_paste_field_names_send_every_field_to_the_other_tab() -> None:
    _, txt = build(False)
    _, img = build(True)
    names = txt.paste_field_names
    assert len(names) == len(set(names)) == len(PASTED_FIELDS)
    assert names[0] == "K-LoRA"
    # A1111's "Send to img2img" copies fields whose name is listed, source and target in the same order
    source = [c for c, name in txt.infotext_fields if name in names]
    target = [c for c, name in img.infotext_fields if name in names]
    assert source == [txt.by_field[name] for name in PASTED_FIELDS]
    assert target == [img.by_field[name] for name in PASTED_FIELDS]
    # The upload boxes are not copied: a gr.File cannot take the bytes it hands out back as its value.
    for name in REFERENCE_FIELDS:
        assert all(c is not txt.by_field[name] for c in source)
        assert all(c is not img.by_field[name] for c in target)
    for _, key in txt.infotext_fields:
        assert isinstance(key, str) and callable(key)
        assert {key: 1}[str(key)] == 1  # hashes as its text (the host builds dicts keyed by it)


# ---------------------------------------------------------------- reference uploads


def upload_payload(paths: list[Path]) -> list[dict[str, Any]]:
    """What the browser sends for a multiple-file box after uploading `paths`, in each gradio's format."""
    if ui_values.GRADIO_MAJOR >= 4:
        return [
            {
                "path": str(p),
                "orig_name": p.name,
                "size": p.stat().st_size,
                "meta": {"_type": "gradio.FileData"},
            }
            for p in paths
        ]
    return [
        {"name": str(p), "orig_name": p.name, "size": p.stat().st_size, "data": None, "is_file": True}
        for p in paths
    ]


def test_upload_values_reach_the_model_as_bytes_through_gradio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gradio 4 only reads files from its upload folder (where the browser's upload put them).
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    style = tmp_path / "style.png"
    style.write_bytes(STYLE_PNG)
    subject = [tmp_path / "subject one.png", tmp_path / "subject_2.png"]
    subject[0].write_bytes(SUBJECT_PNG)
    subject[1].write_bytes(STYLE_PNG)

    received: list[tuple[Any, ...]] = []
    with gr.Blocks() as demo:
        built = ui.build_ui(False, lambda: NAMES, GUIDED)
        probe = gr.Button(elem_id="probe_generate")
        probe.click(fn=lambda *args: received.append(args), inputs=built.components, outputs=[])
    inputs = [component.value for component in built.components]
    index = POSITIONAL_FIELDS.index
    inputs[index("style_refs")] = upload_payload([style])
    inputs[index("subject_refs")] = upload_payload(subject)
    run_event(demo, "probe_generate", inputs)

    (args,) = received
    refs = {name: args[index(name)] for name in REFERENCE_FIELDS}
    assert refs == {"style_refs": [STYLE_PNG], "subject_refs": [SUBJECT_PNG, STYLE_PNG]}
    assert all(type(item) is bytes for images in refs.values() for item in images)
    assert KLoraParams.from_any(list(args)).to_dict() == {**GUIDED.to_dict(), "beta": 1.3}


def test_empty_upload_boxes_reach_the_model_as_no_references() -> None:
    received: list[tuple[Any, ...]] = []
    with gr.Blocks() as demo:
        built = ui.build_ui(False, lambda: NAMES, CUSTOM)
        probe = gr.Button(elem_id="probe_generate")
        probe.click(fn=lambda *args: received.append(args), inputs=built.components, outputs=[])
    run_event(demo, "probe_generate", [component.value for component in built.components])
    (args,) = received
    assert [args[POSITIONAL_FIELDS.index(name)] for name in REFERENCE_FIELDS] == [None, None]
    params = KLoraParams.from_any(list(args))
    assert params.style_refs == params.subject_refs == ()


def test_ui_value_of_uploads_passes_through_the_model() -> None:
    _, built = build()
    values = values_of(built)
    values[POSITIONAL_FIELDS.index("style_refs")] = [STYLE_PNG]
    values[POSITIONAL_FIELDS.index("subject_refs")] = [bytearray(SUBJECT_PNG), STYLE_PNG]
    params = KLoraParams.from_any(values)
    assert params.style_refs == (base64.b64encode(STYLE_PNG).decode("ascii"),)
    assert [base64.b64decode(text) for text in params.subject_refs] == [SUBJECT_PNG, STYLE_PNG]
    assert json.loads(json.dumps(params.to_dict()))["style_refs"] == list(params.style_refs)  # JSON-able


def test_an_upload_that_is_not_an_image_names_the_field() -> None:
    _, built = build()
    values = values_of(built)
    values[POSITIONAL_FIELDS.index("subject_refs")] = [SUBJECT_PNG, b"%PDF-1.4 not an image"]
    with pytest.raises(ParamsError) as info:
        KLoraParams.from_any(values)
    assert info.value.fields == ("subject_refs",)
    assert "image 2" in str(info.value)


# ---------------------------------------------------------------- the JavaScript side


def test_help_data_carries_field_help() -> None:
    _, built = build()
    text = built.extras["help"].value
    match = re.search(r'data-help="([^"]*)"', text)
    assert match
    import html

    assert json.loads(html.unescape(match.group(1))) == FIELD_HELP
    assert set(FIELD_HELP) == set(POSITIONAL_FIELDS)  # every control gets hover help


@pytest.mark.parametrize("is_img2img", [False, True])
def test_every_help_text_finds_its_control(is_img2img: bool) -> None:
    # klora.js looks each FIELD_HELP key up as "klora_" + tab + "_" + key
    _, built = build(is_img2img)
    tab = "img2img" if is_img2img else "txt2img"
    for name in FIELD_HELP:
        assert built.by_field[name].elem_id == f"klora_{tab}_{name}"
    for name in NEW_FIELDS:
        assert FIELD_HELP[name]
    assert "Not stored in the infotext" in FIELD_HELP["style_refs"]


def test_javascript_uses_the_ids_the_ui_builds() -> None:
    script = (ROOT / "javascript" / "klora.js").read_text(encoding="utf-8")
    _, built = build()
    for suffix in ("help_data", "card_pick", "card_pick_apply", "accordion"):
        assert f'tab + "_{suffix}' in script, suffix
        assert built.extras[{"help_data": "help"}.get(suffix, suffix)].elem_id == f"klora_txt2img_{suffix}"
    assert '"klora_" + tab + "_"' in script and "_lora_cards" in script


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_javascript_parses() -> None:
    subprocess.run(["node", "--check", str(ROOT / "javascript" / "klora.js")], check=True)


def test_the_empty_lora_choice_is_labelled_on_gradio_4() -> None:
    first = ui_events.lora_choices(["a"])[0]
    assert first == ((ui_events.NO_LORA_LABEL, "") if ui_values.GRADIO_MAJOR >= 4 else "")
