"""The K-LoRA accordion under gradio 3.41 (A1111) and 4.40 (Forge), without a browser or a WebUI.

Skipped where gradio is not installed (the core's CI venvs). Meant for a venv with gradio 3.41.2 +
pydantic 1.10 and one with gradio 4.40.0 + pydantic 2 (+ huggingface_hub<0.26); torch is not needed,
so there: ``python -m pytest --noconftest tests/test_ui.py tests/test_xyz.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

gr = pytest.importorskip("gradio")

from lib_klora import ui  # noqa: E402  (after the skip: ui imports gradio)
from lib_klora.params import CHOICES, FIELD_HELP, POSITIONAL_FIELDS, KLoraParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["alpha_dog", "beta_style", "gamma ink"]
CHOICE_FIELDS = ("method", "pattern", "gamma", "te_policy", "hires", "hires_method", "hires_pattern")
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
    assert built.by_field["hires_method"].value == ui.SAME
    assert built.by_field["hires_alpha"].value is None


def test_custom_defaults_round_trip() -> None:
    _, built = build(defaults=CUSTOM)
    assert KLoraParams.from_any(values_of(built)).to_dict() == {**CUSTOM.to_dict(), "beta": 1.3}
    assert built.by_field["seed"].visible is True  # random method
    assert built.extras["hires_group"].visible is True  # separate hires


def test_seed_and_hires_group_hidden_by_default() -> None:
    _, built = build()
    assert built.by_field["seed"].visible is False
    assert built.extras["hires_group"].visible is False


@pytest.mark.parametrize("name", CHOICE_FIELDS)
def test_choice_values_are_model_values_and_hold_the_default(name: str) -> None:
    _, built = build()
    component = built.by_field[name]
    values = choice_values(component)
    assert component.value in values
    unset = name in ("hires_method", "hires_pattern")  # SAME stands for "keep the first pass's value"
    assert values == ([ui.SAME] if unset else []) + list(CHOICES[name])
    for value in values:  # each one is accepted by the model
        parsed = KLoraParams(**{name: value})
        assert getattr(parsed, name) == (None if unset and value == ui.SAME else value)


def test_labelled_choices_on_gradio_4_plain_values_on_gradio_3() -> None:
    _, built = build()
    choices = built.by_field["method"].choices
    if ui.GRADIO_MAJOR >= 4:
        assert ("Direct merge (baseline)", "merge") in [tuple(c) for c in choices]
    else:  # gradio 3.41 would print "('K-LoRA', 'klora')"
        assert choices == list(CHOICES["method"])


def test_lora_dropdowns_list_the_names_and_start_empty() -> None:
    _, built = build()
    for name in ("subject", "style"):
        component = built.by_field[name]
        assert choice_values(component) == NAMES
        assert component.value == ""


def test_lora_dropdowns_show_a_configured_name() -> None:
    _, built = build(defaults=CUSTOM)
    assert built.by_field["subject"].value == "alpha_dog"
    assert built.by_field["style"].value == "beta_style"


def test_empty_lora_list_builds() -> None:
    _, built = build(names=[])
    assert built.by_field["subject"].choices == []


def test_strength_sliders_cover_zero_to_two() -> None:
    _, built = build()
    for name in ("subject_strength", "style_strength"):
        slider = built.by_field[name]
        assert (slider.minimum, slider.maximum, slider.step) == ui.STRENGTH_SLIDER


# ---------------------------------------------------------------- event handlers


def test_refresh_keeps_values_still_listed() -> None:
    subject, style = ui.refresh_lora_choices("alpha_dog", "removed", ["alpha_dog", "new_one"])
    assert subject["choices"] == style["choices"] == ["alpha_dog", "new_one"]
    assert subject["value"] == "alpha_dog"
    assert style["value"] == ""


def test_refresh_clears_none_values() -> None:
    subject, style = ui.refresh_lora_choices(None, "", NAMES)
    assert subject["value"] == style["value"] == ""


@pytest.mark.parametrize("role", ["subject", "style"])
def test_card_pick_sets_the_dropdown_and_enables(role: str) -> None:
    payload = json.dumps({"role": role, "name": "gamma ink"})
    subject, style, enabled = ui.apply_card_pick(payload, "alpha_dog", "beta_style", NAMES)
    picked, other = (subject, style) if role == "subject" else (style, subject)
    assert picked["value"] == "gamma ink"
    assert other["value"] == ("beta_style" if role == "subject" else "alpha_dog")
    assert subject["choices"] == NAMES and style["choices"] == NAMES
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
    for update in ui.apply_card_pick(payload, "alpha_dog", "", NAMES):
        assert "value" not in update and "choices" not in update


@pytest.mark.parametrize(
    ("pattern", "beta", "expected"),
    [("s*", 0.5, 1.3), ("s", 1.3, 0.5), ("s*", None, 1.3), ("s", "", 0.5), ("s*", 1.3, 1.3)],
)
def test_pattern_change_moves_an_untouched_beta(pattern: str, beta: Any, expected: float) -> None:
    assert ui.beta_after_pattern_change(pattern, beta)["value"] == expected


@pytest.mark.parametrize(("pattern", "beta"), [("s*", 0.9), ("s", 0.0), ("bogus", 0.5), (None, 0.5)])
def test_pattern_change_keeps_an_edited_beta(pattern: Any, beta: Any) -> None:
    assert "value" not in ui.beta_after_pattern_change(pattern, beta)


def test_hires_pattern_change() -> None:
    assert ui.hires_beta_after_pattern_change("s*", None)["value"] == 1.3
    assert ui.hires_beta_after_pattern_change("s", 1.3)["value"] == 0.5
    assert ui.hires_beta_after_pattern_change(ui.SAME, 1.3)["value"] is None  # back to "same as first pass"
    assert "value" not in ui.hires_beta_after_pattern_change("s*", 0.77)
    assert "value" not in ui.hires_beta_after_pattern_change(ui.SAME, 0.77)


def test_visibility_handlers() -> None:
    assert ui.seed_visibility("random")["visible"] is True
    assert ui.seed_visibility("klora")["visible"] is False
    assert ui.hires_group_visibility("separate")["visible"] is True
    assert ui.hires_group_visibility("same")["visible"] is False


def dependencies(demo: Any) -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    """(trigger elem_id, event) -> (input elem_ids, output elem_ids), from either gradio's config."""
    config = blocks_config(demo)
    ids = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    wiring = {}
    for dep in config["dependencies"]:
        for target in dep["targets"]:
            # gradio 4: [id, event] pairs; gradio 3: bare ids with the event in "trigger"
            block, event = (
                (target[0], target[1]) if isinstance(target, (list, tuple)) else (target, dep["trigger"])
            )
            wiring[(ids[block], event)] = ([ids[i] for i in dep["inputs"]], [ids[o] for o in dep["outputs"]])
    return wiring


def test_events_are_wired_to_the_right_components() -> None:
    demo, _ = build()
    e = "klora_txt2img_"
    wiring = dependencies(demo)
    assert wiring[(e + "refresh", "click")] == ([e + "subject", e + "style"], [e + "subject", e + "style"])
    assert wiring[(e + "card_pick_apply", "click")] == (
        [e + "card_pick", e + "subject", e + "style"],
        [e + "subject", e + "style", e + "enabled"],
    )
    # user edits only: a pasted infotext must not reset the pasted beta
    assert wiring[(e + "pattern", "input")] == ([e + "pattern", e + "beta"], [e + "beta"])
    assert wiring[(e + "hires_pattern", "input")] == (
        [e + "hires_pattern", e + "hires_beta"],
        [e + "hires_beta"],
    )
    assert wiring[(e + "method", "change")] == ([e + "method"], [e + "seed"])
    assert wiring[(e + "hires", "change")] == ([e + "hires"], [e + "hires_group"])
    assert not [key for key in wiring if key[1] == "change" and key[0] == e + "pattern"]


def run_event(demo: Any, trigger: str, inputs: list[Any]) -> list[Any]:
    """Run one event through gradio's own pre/postprocessing, as a browser request would."""
    config = blocks_config(demo)
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    index = next(
        i
        for i, dep in enumerate(config["dependencies"])
        if ids[trigger] in [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]
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
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in subject["choices"]] == ["alpha_dog", "delta"]


def test_card_pick_through_gradio() -> None:
    demo, _ = build()
    payload = json.dumps({"role": "style", "name": "gamma ink"})
    subject, style, enabled = run_event(demo, "klora_txt2img_card_pick_apply", [payload, "alpha_dog", ""])
    assert (subject["value"], style["value"], enabled["value"]) == ("alpha_dog", "gamma ink", True)


def test_hires_visibility_through_gradio() -> None:
    demo, _ = build()
    assert run_event(demo, "klora_txt2img_hires", ["separate"])[0]["visible"] is True


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


@pytest.mark.parametrize("params", [CUSTOM, KLoraParams(enabled=True, subject="a", style="b")])
def test_paste_restores_every_field(params: KLoraParams) -> None:
    _, built = build()
    updates = paste_like_a1111(built, infotext_entries(params))
    assert all("value" in update for update in updates)
    pasted = KLoraParams.from_any([update["value"] for update in updates])
    assert pasted.to_dict() == {**params.to_dict(), "beta": params.effective_beta}


def test_paste_without_klora_disables_and_leaves_the_rest() -> None:
    _, built = build(defaults=CUSTOM)
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
    assert len(names) == len(set(names)) == len(POSITIONAL_FIELDS)
    assert names[0] == "K-LoRA"
    # A1111's "Send to img2img" copies fields whose name is listed, source and target in the same order
    source = [c for c, name in txt.infotext_fields if name in names]
    target = [c for c, name in img.infotext_fields if name in names]
    assert source == txt.components and target == img.components
    for _, key in txt.infotext_fields:
        assert isinstance(key, str) and callable(key)
        assert {key: 1}[str(key)] == 1  # hashes as its text (the host builds dicts keyed by it)


# ---------------------------------------------------------------- the JavaScript side


def test_help_data_carries_field_help() -> None:
    _, built = build()
    text = built.extras["help"].value
    match = re.search(r'data-help="([^"]*)"', text)
    assert match
    import html

    assert json.loads(html.unescape(match.group(1))) == FIELD_HELP
    assert set(FIELD_HELP) == set(POSITIONAL_FIELDS)  # every control gets hover help


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
