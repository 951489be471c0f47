"""KLoraParams: one model for UI, API, infotext and X/Y/Z. Runs without torch, under pydantic 1 and 2."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from lib_klora.params.fields import CHOICES, FIELD_HELP, FIELD_LABELS, INFOTEXT_KEYS
from lib_klora.params.model import POSITIONAL_FIELDS, KLoraParams
from lib_klora.params.parsing import ParamsError, clip_model_parts
from lib_klora.params.xyz import XYZ_AXES, apply_xyz

EXPECTED_ORDER = (
    "enabled",
    "subject",
    "style",
    "subject_strength",
    "style_strength",
    "method",
    "pattern",
    "alpha",
    "beta",
    "gamma",
    "seed",
    "te_policy",
    "hires",
    "hires_method",
    "hires_pattern",
    "hires_alpha",
    "hires_beta",
    "show_map",
    "kl_temperature",
    "kl_direction",
    "kl_per_sample",
    "kl_hybrid",
    "guidance",
    "guidance_style",
    "guidance_subject",
    "guidance_subject_clip",
    "guidance_text",
    "guidance_eta",
    "guidance_start",
    "guidance_end",
    "guidance_every",
    "guidance_iters",
    "guidance_decoder",
    "clip_model",
    "dino_model",
    "style_refs",
    "subject_refs",
)


def png_base64(color: tuple[int, int, int] = (200, 30, 40), size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


REF = png_base64()

FULL = {
    "enabled": True,
    "subject": "sbu_dog, v2",
    "style": "szn ink [watercolor]",
    "subject_strength": 0.75,
    "style_strength": -1.25,
    "method": "random",
    "pattern": "s*",
    "alpha": 2.0,
    "beta": 0.1,
    "gamma": "paper",
    "seed": 4242,
    "te_policy": "none",
    "hires": "separate",
    "hires_method": "dynamic",
    "hires_pattern": "s",
    "hires_alpha": 0.3,
    "hires_beta": -0.7,
    "show_map": True,
    "kl_temperature": 2.5,
    "kl_direction": "symmetric",
    "kl_per_sample": True,
    "kl_hybrid": True,
    "guidance": True,
    "guidance_style": 0.5,
    "guidance_subject": 2.0,
    "guidance_subject_clip": 0.25,
    "guidance_text": 0.1,
    "guidance_eta": 0.2,
    "guidance_start": 0.1,
    "guidance_end": 0.8,
    "guidance_every": 2,
    "guidance_iters": 3,
    "guidance_decoder": "vae",
    "clip_model": "ViT-L-14:openai",
    "dino_model": "vit_base_patch16_224.dino",
    "style_refs": (REF,),
    "subject_refs": (REF, png_base64((1, 2, 3))),
}


def enabled(**kw: object) -> KLoraParams:
    return KLoraParams(**{"enabled": True, "subject": "dog", "style": "ink", **kw})


def test_field_order_is_the_positional_contract() -> None:
    assert POSITIONAL_FIELDS == EXPECTED_ORDER
    assert set(FULL) == set(EXPECTED_ORDER)


def test_defaults() -> None:
    p = KLoraParams()
    assert p.to_dict() == {
        "enabled": False,
        "subject": "",
        "style": "",
        "subject_strength": 1.0,
        "style_strength": 1.0,
        "method": "klora",
        "pattern": "s",
        "alpha": 1.5,
        "beta": None,
        "gamma": "official",
        "seed": 0,
        "te_policy": "both",
        "hires": "same",
        "hires_method": None,
        "hires_pattern": None,
        "hires_alpha": None,
        "hires_beta": None,
        "show_map": False,
        "kl_temperature": 1.0,
        "kl_direction": "forward",
        "kl_per_sample": False,
        "kl_hybrid": False,
        "guidance": False,
        "guidance_style": 1.0,
        "guidance_subject": 1.0,
        "guidance_subject_clip": 0.0,
        "guidance_text": 0.0,
        "guidance_eta": 0.05,
        "guidance_start": 0.0,
        "guidance_end": 0.9,
        "guidance_every": 1,
        "guidance_iters": 1,
        "guidance_decoder": "taesd",
        "clip_model": "ViT-B-32:laion2b_s34b_b79k",
        "dino_model": "vit_small_patch16_224.dino",
        "style_refs": (),
        "subject_refs": (),
    }
    assert KLoraParams.from_any([]) == p
    assert KLoraParams.from_any(()) == p


def test_model_is_immutable() -> None:
    p = KLoraParams()
    with pytest.raises(TypeError):
        p.alpha = 2.0  # type: ignore[misc]


def test_positional_round_trip() -> None:
    p = KLoraParams(**FULL)
    positional = p.to_positional()
    assert positional == [FULL[name] for name in EXPECTED_ORDER]
    assert KLoraParams.from_any(positional) == p
    assert KLoraParams.from_any(tuple(positional)) == p


def test_fewer_positional_args_keep_defaults() -> None:
    p = KLoraParams.from_any([True, "dog", "ink", 0.5])
    assert (p.enabled, p.subject, p.style, p.subject_strength) == (True, "dog", "ink", 0.5)
    assert p.style_strength == 1.0 and p.method == "klora" and p.show_map is False


def test_too_many_positional_args() -> None:
    with pytest.raises(ParamsError, match="at most 37 positional"):
        KLoraParams.from_any([*KLoraParams().to_positional(), "extra"])


def test_dict_input_from_api_ignores_the_ui_defaults_after_it() -> None:
    # The API copies {"args": [{...}]} into the first slot; the other slots keep UI defaults.
    args = [{"enabled": True, "subject": "dog", "style": "ink", "alpha": 2}, "ignored", 3.0, None]
    p = KLoraParams.from_any(args)
    assert (p.enabled, p.subject, p.style, p.alpha) == (True, "dog", "ink", 2.0)
    assert KLoraParams.from_any({"enabled": True, "subject": "dog", "style": "ink"}).enabled
    assert KLoraParams.from_any([p]) is p and KLoraParams.from_any(p) is p


def test_from_any_rejects_non_sequences() -> None:
    for bad in ("dog", 3, None):
        with pytest.raises(ParamsError, match="list or a dict"):
            KLoraParams.from_any(bad)  # type: ignore[arg-type]


def test_dict_round_trip_is_json_able() -> None:
    p = KLoraParams(**FULL)
    text = json.dumps(p.to_dict())
    assert KLoraParams.from_any([json.loads(text)]) == p
    assert list(p.to_dict()) == list(EXPECTED_ORDER)


def test_coercion_from_gradio_strings_and_numbers() -> None:
    p = KLoraParams.from_any(
        ["true", " dog ", "ink", "0.8", 1, "MERGE", "S_star", "2", "", "Paper", 7.0, "Style", "OFF", "", None]
    )
    assert p.enabled is True and p.subject == "dog"
    assert p.subject_strength == 0.8 and isinstance(p.style_strength, float) and p.style_strength == 1.0
    assert (p.method, p.pattern, p.alpha, p.beta, p.gamma) == ("merge", "s*", 2.0, None, "paper")
    assert p.seed == 7 and isinstance(p.seed, int)
    assert (p.te_policy, p.hires, p.hires_method, p.hires_pattern) == ("style", "off", None, None)


@pytest.mark.parametrize("spelling", ["s*", "S*", "s_star", "S_STAR", "sstar", " s* "])
def test_pattern_spellings(spelling: str) -> None:
    assert KLoraParams(pattern=spelling).pattern == "s*"
    assert KLoraParams(hires_pattern=spelling).hires_pattern == "s*"


def test_enum_members_are_accepted() -> None:
    from lib_klora.fusion.options import Pattern

    assert KLoraParams(pattern=Pattern.S_STAR).pattern == "s*"


def test_none_means_unset() -> None:
    # An empty gradio dropdown sends None: names become "", other fields keep their defaults.
    p = KLoraParams.from_any([None, None, None, None, None, None, None, None, None])
    assert p == KLoraParams()
    assert KLoraParams(beta="default").beta is None
    assert KLoraParams(hires_method="same").hires_method is None
    assert KLoraParams(alpha=None, method=None, show_map=None) == KLoraParams()


def test_seed_accepts_whole_floats_only() -> None:
    assert KLoraParams(seed="12").seed == 12
    assert KLoraParams(seed=12.0).seed == 12
    assert KLoraParams(seed="12.0").seed == 12
    assert KLoraParams(seed=2**32 - 1).seed == 2**32 - 1


INVALID_CASES = [
    ("enabled", "maybe", "true or false"),
    ("enabled", 2, "true or false"),
    ("subject", "loras/dog", "not a path"),
    ("subject", "..", "not a path"),
    ("subject", "C:\\dog", "not a path"),
    ("subject", "a:b", "not a path"),
    ("subject", "dog>", "not a path"),
    ("subject", "<dog", "not a path"),
    ("subject", "x" * 256, "at most 255"),
    ("subject", "dog\nink", "control characters"),
    ("subject", 12, "LoRA name"),
    ("style", "../../etc/passwd", "not a path"),
    ("style", "styles\\ink", "not a path"),
    ("subject_strength", "abc", "must be a number"),
    ("subject_strength", 5.5, "<= 5"),
    ("subject_strength", -6, ">= -5"),
    ("subject_strength", "nan", "finite"),
    ("style_strength", "inf", "finite"),
    ("style_strength", True, "not a boolean"),
    ("style_strength", [1], "must be a number"),
    ("method", "topk2", "one of 'klora'"),
    ("method", 3, "one of"),
    ("pattern", "z", "one of 's', 's*'"),
    ("alpha", 0, "> 0"),
    ("alpha", -1, "> 0"),
    ("alpha", 10.5, "<= 10"),
    ("alpha", float("inf"), "finite"),
    ("beta", 11, "<= 10"),
    ("beta", "-nan", "finite"),
    ("gamma", "mean", "one of 'official', 'paper'"),
    ("seed", -1, "0 to 4294967295"),
    ("seed", 2**32, "0 to 4294967295"),
    ("seed", 3.7, "whole number"),
    ("seed", "x", "must be a number"),
    ("seed", False, "not a boolean"),
    ("te_policy", "all", "one of 'both'"),
    ("hires", "on", "one of 'same', 'off', 'separate'"),
    ("hires_method", "bogus", "one of 'klora'"),
    ("hires_pattern", "t", "one of 's', 's*'"),
    ("hires_alpha", 0, "> 0"),
    ("hires_beta", "11", "<= 10"),
    ("show_map", "perhaps", "true or false"),
    ("kl_temperature", 0, "> 0"),
    ("kl_temperature", 101, "<= 100"),
    ("kl_direction", "backward", "must be one of"),
    ("kl_per_sample", "sometimes", "true or false"),
    ("kl_hybrid", 3, "true or false"),
    ("guidance", "maybe", "true or false"),
    ("guidance_style", -0.1, ">= 0"),
    ("guidance_subject", 11, "<= 10"),
    ("guidance_subject_clip", "x", "must be a number"),
    ("guidance_text", float("nan"), "finite"),
    ("guidance_eta", 0, "> 0"),
    ("guidance_eta", 1.5, "<= 1"),
    ("guidance_start", -0.1, ">= 0"),
    ("guidance_end", 1.1, "<= 1"),
    ("guidance_every", 0, "from 1 to 1000"),
    ("guidance_every", 2.5, "whole number"),
    ("guidance_iters", 11, "from 1 to 10"),
    ("guidance_decoder", "full", "must be one of"),
    ("clip_model", "", "model name"),
    ("clip_model", "../../etc/passwd", "not a model name"),
    ("dino_model", "vit small", "not a model name"),
    ("dino_model", "timm/vit:dino", "not a model name"),
    ("style_refs", ["not base64 !!"], "image 1: not valid base64"),
    ("style_refs", [base64.b64encode(b"plain text, not an image").decode()], "image 1: not a readable image"),
    ("subject_refs", [REF, 42], "image 2: must be a base64 string"),
    ("subject_refs", {"a": REF}, "list of images"),
    ("subject_refs", [REF] * 17, "at most 16"),
]


@pytest.mark.parametrize(("field", "value", "reason"), INVALID_CASES)
def test_invalid_values_name_the_field(field: str, value: object, reason: str) -> None:
    with pytest.raises(ParamsError) as info:
        KLoraParams(**{field: value})
    message = str(info.value)
    assert f"K-LoRA parameter '{field}'" in message
    assert reason in message
    assert info.value.fields == (field,)
    assert isinstance(info.value, ValueError)


def test_error_message_format() -> None:
    with pytest.raises(ParamsError) as info:
        KLoraParams(alpha=-1)
    assert str(info.value) == "K-LoRA parameter 'alpha': must be > 0 (got -1)"


def test_every_field_has_an_invalid_case() -> None:
    # Guards the table above against a field added later without a validation test.
    covered = {field for field, _, _ in INVALID_CASES}
    assert covered == set(EXPECTED_ORDER)


def test_all_errors_are_reported_together() -> None:
    with pytest.raises(ParamsError) as info:
        KLoraParams(alpha=-1, method="nope", seed="x")
    assert set(info.value.fields) == {"alpha", "method", "seed"}


def test_unknown_key_is_named() -> None:
    with pytest.raises(ParamsError, match=r"'alhpa': unknown parameter \(did you mean 'alpha'\?\)"):
        KLoraParams(alhpa=2)
    with pytest.raises(ParamsError, match="'guidanse': unknown parameter"):
        KLoraParams.from_any([{"enabled": False, "guidanse": True}])


def test_enabled_requires_both_names() -> None:
    with pytest.raises(ParamsError) as info:
        KLoraParams(enabled=True)
    assert info.value.fields == ("subject", "style")
    with pytest.raises(ParamsError, match="'style': a style LoRA is required"):
        KLoraParams(enabled=True, subject="dog")
    with pytest.raises(ParamsError, match="'subject': a subject LoRA is required"):
        KLoraParams(enabled=True, style="ink", subject="  ")
    # Disabled: half-filled accordions are fine.
    assert KLoraParams(enabled=False, subject="dog").subject == "dog"


def test_subject_and_style_must_differ() -> None:
    with pytest.raises(ParamsError, match="'style': must be a different LoRA from the subject"):
        enabled(style="dog")
    with pytest.raises(ParamsError, match="different LoRA"):
        enabled(style=" dog ")  # names are compared after trimming
    assert KLoraParams(subject="dog", style="dog").enabled is False  # only checked when enabled


def test_names_allow_ordinary_characters() -> None:
    p = enabled(subject="my lora (v1.5) [SDXL], by x", style="ink=wash")
    assert p.subject == "my lora (v1.5) [SDXL], by x"


def test_paramserror_accepts_a_plain_message() -> None:
    err = ParamsError("K-LoRA: something general")
    assert str(err) == "K-LoRA: something general" and err.fields == ()


# ---------------------------------------------------------------- schema and help


def test_schema_lists_every_field_with_help_and_enums() -> None:
    schema = KLoraParams.json_schema()
    props = schema["properties"]
    assert list(props) == list(EXPECTED_ORDER)
    assert schema.get("additionalProperties") is False
    for name, prop in props.items():
        assert prop["description"] == FIELD_HELP[name]
        assert prop["title"] == FIELD_LABELS[name]
    for name, choices in CHOICES.items():
        assert props[name]["enum"] == list(choices), name
    assert props["alpha"]["exclusiveMinimum"] == 0 and props["alpha"]["maximum"] == 10
    assert props["subject_strength"]["minimum"] == -5 and props["subject_strength"]["maximum"] == 5
    assert props["subject"]["maxLength"] == 255
    json.dumps(schema)  # JSON-able


def test_help_and_labels_cover_exactly_the_fields() -> None:
    assert set(FIELD_HELP) == set(EXPECTED_ORDER) == set(FIELD_LABELS)
    assert all(text.strip() for text in (*FIELD_HELP.values(), *FIELD_LABELS.values()))


def test_choices_and_field_types_come_from_the_fusion_vocabulary() -> None:
    from typing import get_args

    from lib_klora.fusion.options import GammaVariant, Method, Pattern
    from lib_klora.params.fields import GammaName, MethodName, PatternName

    for field, enum_type, literal in (
        ("method", Method, MethodName),
        ("hires_method", Method, MethodName),
        ("pattern", Pattern, PatternName),
        ("gamma", GammaVariant, GammaName),
    ):
        assert CHOICES[field] == tuple(member.value for member in enum_type)
        assert get_args(literal) == CHOICES[field]
    assert "dynamic" in CHOICES["method"] and not Method.DYNAMIC.precomputed


def test_a_plan_refuses_the_method_that_decides_during_sampling() -> None:
    plan = pytest.importorskip("lib_klora.fusion.plan", reason="needs torch")
    with pytest.raises(ValueError, match="no precomputed plan"):
        plan.PlanSettings(method="dynamic")


def test_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "import lib_klora.params.model, lib_klora.params.prompt_tag\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------- passes and the engine


def test_effective_beta() -> None:
    assert KLoraParams().effective_beta == 0.5
    assert KLoraParams(pattern="s*").effective_beta == 1.3
    assert KLoraParams(pattern="s*", beta=0.2).effective_beta == 0.2
    assert KLoraParams(beta=0).effective_beta == 0.0


def test_for_pass() -> None:
    p = enabled(method="fixed", alpha=2.0, hires_method="merge", hires_alpha=3.0)
    assert p.for_pass(False) is p
    assert p.for_pass(True) is p  # hires == "same": the hires_* values are ignored
    assert p.with_overrides({"hires": "off"}).for_pass(True) is None
    assert p.with_overrides({"hires": "off"}).for_pass(False) == p.with_overrides({"hires": "off"})
    assert KLoraParams().for_pass(False) is None  # disabled: no pass uses K-LoRA


def test_for_pass_separate_merges_only_the_set_fields() -> None:
    p = enabled(method="fixed", pattern="s", alpha=2.0, beta=0.4, hires="separate", hires_pattern="s*")
    hr = p.for_pass(True)
    assert hr is not None
    assert (hr.method, hr.pattern, hr.alpha, hr.beta) == ("fixed", "s*", 2.0, 0.4)
    assert (hr.subject, hr.style, hr.seed) == (p.subject, p.style, p.seed)
    full = p.with_overrides({"hires_method": "merge", "hires_alpha": 1.0, "hires_beta": -0.5}).for_pass(True)
    assert full is not None
    assert (full.method, full.pattern, full.alpha, full.beta) == ("merge", "s*", 1.0, -0.5)
    first = p.for_pass(False)
    assert first is not None and first.pattern == "s"
    assert enabled(hires="separate").for_pass(True) == enabled(hires="separate")


def test_to_plan_settings() -> None:
    plan = pytest.importorskip("lib_klora.fusion.plan", reason="needs torch")
    from lib_klora.fusion.options import Pattern

    p = enabled(
        subject_strength=0.8,
        method="random",
        pattern="s*",
        alpha=2.0,
        gamma="paper",
        seed=9,
        hires="separate",
    ).with_overrides({"hires_method": "merge", "hires_beta": 0.25})
    settings = p.to_plan_settings()
    assert settings == plan.PlanSettings(
        method=plan.Method.RANDOM,
        pattern=Pattern.S_STAR,
        alpha=2.0,
        beta=None,
        gamma=plan.GammaVariant.PAPER,
        strengths=(0.8, 1.0),
        seed=9,
    )
    assert settings.resolved_beta == p.effective_beta == 1.3
    hires = p.to_plan_settings(is_hires=True)
    assert hires is not None and hires.method is plan.Method.MERGE and hires.beta == 0.25
    assert p.with_overrides({"hires": "off"}).to_plan_settings(is_hires=True) is None


# ---------------------------------------------------------------- infotext


def test_infotext_minimal() -> None:
    p = enabled()
    assert p.to_infotext() == {"K-LoRA": "dog:ink"}
    assert KLoraParams.from_infotext(p.to_infotext()) == p
    assert KLoraParams().to_infotext() == {}


def test_infotext_full_round_trip() -> None:
    p = KLoraParams(**FULL)
    text = p.to_infotext()
    assert text == {
        "K-LoRA": "sbu_dog, v2:szn ink [watercolor]",
        "K-LoRA strengths": "0.75:-1.25",
        "K-LoRA method": "random",
        "K-LoRA pattern": "s*",
        "K-LoRA alpha": "2",
        "K-LoRA beta": "0.1",
        "K-LoRA gamma": "paper",
        "K-LoRA seed": "4242",
        "K-LoRA TE": "none",
        "K-LoRA hires": "separate",
        "K-LoRA hires method": "dynamic",
        "K-LoRA hires pattern": "s",
        "K-LoRA hires alpha": "0.3",
        "K-LoRA hires beta": "-0.7",
        "K-LoRA map": "true",
        "K-LoRA KL temperature": "2.5",
        "K-LoRA KL direction": "symmetric",
        "K-LoRA KL per image": "true",
        "K-LoRA KL hybrid": "true",
        "K-LoRA guidance": "true",
        "K-LoRA guidance style": "0.5",
        "K-LoRA guidance subject": "2",
        "K-LoRA guidance subject CLIP": "0.25",
        "K-LoRA guidance text": "0.1",
        "K-LoRA guidance eta": "0.2",
        "K-LoRA guidance start": "0.1",
        "K-LoRA guidance end": "0.8",
        "K-LoRA guidance every": "2",
        "K-LoRA guidance iters": "3",
        "K-LoRA guidance decoder": "vae",
        "K-LoRA CLIP": "ViT-L-14:openai",
        "K-LoRA DINO": "vit_base_patch16_224.dino",
    }
    assert set(text) == {"K-LoRA", *INFOTEXT_KEYS.values()}
    # The reference images never go into an image's metadata; everything else round-trips.
    assert not any(REF in value for value in text.values())
    pasted = KLoraParams.from_infotext(text)
    assert pasted == KLoraParams(**{**FULL, "style_refs": (), "subject_refs": ()}, _references_follow=True)


@pytest.mark.parametrize(
    "changes",
    [
        {"subject_strength": 0.1 + 0.2},  # a float whose shortest text is long
        {"style_strength": 1 / 3, "beta": -1e-7},
        # an explicit default β that a hires pass with another pattern inherits must stay explicit
        {"beta": 0.5, "hires": "separate", "hires_pattern": "s*"},
        {"hires": "off"},
        {"hires_alpha": 4.0},  # set but unused (hires == "same") still round-trips
        {"seed": 2**32 - 1},
        {"subject_strength": -0.0},
    ],
)
def test_infotext_round_trip_is_exact(changes: dict) -> None:
    p = enabled(**changes)
    back = KLoraParams.from_infotext(p.to_infotext())
    assert back == p
    for name in changes:
        assert getattr(back, name) == getattr(p, name) and type(getattr(back, name)) is type(getattr(p, name))


@pytest.mark.parametrize("changes", [{"beta": 0.5}, {"pattern": "s*", "beta": 1.3}])
def test_infotext_leaves_out_a_beta_equal_to_the_pattern_default(changes: dict) -> None:
    # The accordion always sends β resolved; repeating the default in every image's infotext is noise.
    p = enabled(**changes)
    assert "K-LoRA beta" not in p.to_infotext()
    back = KLoraParams.from_infotext(p.to_infotext())
    assert back.effective_beta == p.effective_beta
    assert back.to_plan_settings() == p.to_plan_settings()
    assert back.to_plan_settings(is_hires=True) == p.to_plan_settings(is_hires=True)


def test_infotext_survives_host_quoting() -> None:
    # The host JSON-quotes values holding ',' or ':'; accept both the quoted and the unquoted form.
    p = enabled(subject="dog, v2", subject_strength=0.5)
    quoted = {
        key: json.dumps(value) if ("," in value or ":" in value) else value
        for key, value in p.to_infotext().items()
    }
    assert quoted["K-LoRA"] == '"dog, v2:ink"'
    assert KLoraParams.from_infotext(quoted) == p


def test_infotext_absent_and_unknown_keys() -> None:
    assert KLoraParams.from_infotext({"Steps": "20", "Sampler": "Euler a"}) is None
    p = KLoraParams.from_infotext({"K-LoRA": "dog:ink", "K-LoRA future": "x", "Steps": "20"})
    assert p == enabled()


def test_infotext_errors_name_the_key() -> None:
    with pytest.raises(ParamsError, match="infotext 'K-LoRA alpha': must be > 0"):
        KLoraParams.from_infotext({"K-LoRA": "dog:ink", "K-LoRA alpha": "-1"})
    with pytest.raises(ParamsError, match="K-LoRA: expected '<subject>:<style>'"):
        KLoraParams.from_infotext({"K-LoRA": "dog"})
    with pytest.raises(ParamsError, match="K-LoRA strengths: expected"):
        KLoraParams.from_infotext({"K-LoRA": "dog:ink", "K-LoRA strengths": "1"})
    with pytest.raises(ParamsError, match="infotext 'K-LoRA strengths': must be a number"):
        KLoraParams.from_infotext({"K-LoRA": "dog:ink", "K-LoRA strengths": "1:x"})
    with pytest.raises(ParamsError, match="infotext 'K-LoRA': must be a different LoRA"):
        KLoraParams.from_infotext({"K-LoRA": "dog:dog"})


def test_infotext_numbers_are_short() -> None:
    text = enabled(subject_strength=1.0, style_strength=0.8, alpha=3.0).to_infotext()
    assert text["K-LoRA strengths"] == "1:0.8" and text["K-LoRA alpha"] == "3"
    assert math.isclose(float(text["K-LoRA strengths"].split(":")[1]), 0.8)


# ---------------------------------------------------------------- X/Y/Z


def test_xyz_axes_declaration() -> None:
    fields = [axis.field for axis in XYZ_AXES]
    assert fields == [
        "enabled",
        "subject",
        "style",
        "method",
        "pattern",
        "alpha",
        "beta",
        "subject_strength",
        "style_strength",
        "kl_temperature",
        "kl_direction",
        "guidance",
        "guidance_eta",
        "guidance_style",
        "guidance_subject",
        "guidance_end",
    ]
    for axis in XYZ_AXES:
        label, field, value_type, choices = axis  # plain tuples for the host glue
        assert label.startswith("[K-LoRA] ") and field in EXPECTED_ORDER
        assert value_type in ("str", "float", "bool")
        if field in CHOICES:
            assert choices == CHOICES[field]
    assert len({axis.label for axis in XYZ_AXES}) == len(XYZ_AXES)
    by_field = {axis.field: axis for axis in XYZ_AXES}
    assert by_field["pattern"].label == "[K-LoRA] Pattern"
    assert by_field["alpha"].value_type == "float" and by_field["enabled"].value_type == "bool"


def test_apply_xyz_validates_and_does_not_mutate() -> None:
    overrides: dict = {}
    first = apply_xyz(overrides, "pattern", " S_STAR ")
    assert first == {"pattern": "s*"} and overrides == {}
    second = apply_xyz(first, "alpha", "2.5")
    assert second == {"pattern": "s*", "alpha": 2.5}
    assert apply_xyz(second, "beta", "") == {**second, "beta": None}
    assert apply_xyz({}, "enabled", "true") == {"enabled": True}
    assert apply_xyz({}, "subject", " dog ") == {"subject": "dog"}
    merged = KLoraParams.from_any([True, "dog", "ink"]).with_overrides(second)
    assert (merged.pattern, merged.alpha, merged.subject) == ("s*", 2.5, "dog")


def test_apply_xyz_errors() -> None:
    with pytest.raises(ParamsError, match="X/Y/Z axis value for 'alpha': must be > 0"):
        apply_xyz({}, "alpha", "-2")
    with pytest.raises(ParamsError, match="'pattern': must be one of"):
        apply_xyz({}, "pattern", "q")
    with pytest.raises(ParamsError, match=r"'subject': .*not a path"):
        apply_xyz({}, "subject", "a/b")
    with pytest.raises(ParamsError, match="'nope': unknown parameter"):
        apply_xyz({}, "nope", 1)


def test_with_overrides_checks_cross_field_rules() -> None:
    with pytest.raises(ParamsError, match="different LoRA"):
        enabled().with_overrides({"style": "dog"})


# ---------------------------------------------------------------- dynamic method and guidance


def test_guidance_without_references_is_an_error_naming_the_fix() -> None:
    with pytest.raises(ParamsError, match="'guidance': guidance is on but there are no reference images"):
        enabled(guidance=True)
    with pytest.raises(ParamsError, match="every term with reference images has weight 0"):
        enabled(guidance=True, style_refs=[REF], guidance_style=0)
    # A prompt term needs no image, and a disabled job ignores everything.
    assert enabled(guidance=True, guidance_text=0.5).guidance_terms() == {"text_clip": 0.5}
    assert not KLoraParams(guidance=True).uses_guidance


def test_guidance_terms_follow_weights_and_references() -> None:
    p = enabled(guidance=True, style_refs=[REF], subject_refs=[REF], guidance_subject_clip=0.5)
    assert p.guidance_terms() == {"style_clip": 1.0, "subject_dino": 1.0, "subject_clip": 0.5}
    assert p.uses_guidance
    only_style = enabled(guidance=True, style_refs=[REF])
    assert only_style.guidance_terms() == {"style_clip": 1.0}  # a missing reference disables its term
    assert not enabled(style_refs=[REF]).uses_guidance  # references alone do not switch guidance on


def test_guidance_window_must_be_ordered() -> None:
    with pytest.raises(ParamsError, match="'guidance_end': must be greater than guidance_start"):
        enabled(guidance=True, style_refs=[REF], guidance_start=0.5, guidance_end=0.5)
    enabled(guidance_start=0.5, guidance_end=0.5)  # guidance off: not checked


def test_references_accept_bytes_data_urls_and_a_single_string() -> None:
    raw = base64.b64decode(REF)
    p = enabled(style_refs=[raw], subject_refs=f"data:image/png;base64,{REF}")
    assert p.style_refs == (REF,)  # raw uploads become base64 text: the params stay JSON-able
    assert p.subject_refs == (f"data:image/png;base64,{REF}",)
    json.dumps(p.to_dict())
    assert enabled(style_refs=None).style_refs == () and enabled(style_refs="").style_refs == ()


def test_unused_feature_settings_stay_out_of_the_infotext() -> None:
    p = enabled(kl_temperature=3.0, guidance_eta=0.3, clip_model="ViT-L-14:openai")
    assert p.to_infotext() == {"K-LoRA": "dog:ink"}
    dyn = enabled(method="dynamic", kl_temperature=3.0)
    assert dyn.to_infotext() == {
        "K-LoRA": "dog:ink",
        "K-LoRA method": "dynamic",
        "K-LoRA KL temperature": "3",
    }


def test_pasted_guidance_waits_for_the_reference_images() -> None:
    text = {"K-LoRA": "dog:ink", "K-LoRA guidance": "true", "K-LoRA guidance eta": "0.1"}
    pasted = KLoraParams.from_infotext(text)
    assert pasted is not None and pasted.guidance and pasted.guidance_eta == 0.1
    assert not pasted.uses_guidance
    with pytest.raises(ParamsError, match="no reference images"):
        pasted.with_overrides({})  # a job from it still needs the images
    assert pasted.with_overrides({"style_refs": [REF]}).uses_guidance


def test_dynamic_has_no_precomputed_plan() -> None:
    pytest.importorskip("torch")
    with pytest.raises(ParamsError, match="'method': 'dynamic' decides from the activations"):
        enabled(method="dynamic").to_plan_settings()
    # hires "separate" with a static hires method still plans its own pass.
    p = enabled(method="dynamic", hires="separate", hires_method="klora")
    assert p.to_plan_settings(is_hires=True) is not None


def test_model_names_accept_both_separators() -> None:
    assert enabled(clip_model="ViT-L-14/openai").clip_model == "ViT-L-14/openai"
    assert clip_model_parts(enabled(clip_model=" ViT-B-16:openai ").clip_model) == ("ViT-B-16", "openai")
    assert clip_model_parts("ViT-L-14/openai") == ("ViT-L-14", "openai")
    for bad in ("ViT-B-32", "hf-hub:laion/CLIP-ViT-B-32", "a:b:c"):  # weights are always named
        with pytest.raises(ParamsError, match="not a model name"):
            enabled(clip_model=bad)


@pytest.mark.parametrize("value", ["yes", "no", "1", "0", 1, 0, 1.0, "maybe", "y", "t", "on", "off", " ON "])
@pytest.mark.parametrize("field", ["enabled", "show_map", "kl_per_sample", "kl_hybrid", "guidance"])
def test_booleans_are_strict_on_every_route(field: str, value: object) -> None:
    """Only a bool, or true/false in text: pydantic v1's coercion of "yes"/1 never runs, and "on"/"off" get
    the same message as "yes" from the API dict, the tag, an X/Y/Z cell and the library's settings dict."""
    with pytest.raises(ParamsError, match=f"{field}.*must be true or false"):
        KLoraParams.from_any([{field: value, "subject": "a", "style": "b"}])
    if not isinstance(value, str):
        return
    if field != "enabled":  # a tag always enables
        from lib_klora.params.prompt_tag import params_from_tag

        with pytest.raises(ParamsError, match=f"'{field}'.*must be true or false"):
            params_from_tag(["a", "b"], {field: value}, KLoraParams())
    with pytest.raises(ParamsError, match=f"X/Y/Z axis value for '{field}': must be true or false"):
        apply_xyz({}, field, value)
    with pytest.raises(ParamsError, match=f"{field}.*must be true or false"):
        KLoraParams(**{"enabled": True, "subject": "a", "style": "b", field: value})


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("FALSE", False), (" True ", True)])
def test_boolean_words_in_text(text: str, expected: bool) -> None:
    assert KLoraParams.from_any([{"show_map": text}]).show_map is expected
    assert KLoraParams.from_any([{"show_map": expected}]).show_map is expected


def test_infotexts_write_true_false_and_old_on_off_infotexts_still_paste() -> None:
    params = enabled(show_map=True, method="dynamic", kl_per_sample=True, kl_hybrid=True)
    text = params.to_infotext()
    assert text["K-LoRA map"] == "true" and text["K-LoRA KL per image"] == "true"
    assert KLoraParams.from_infotext(text) == params
    old = {"K-LoRA": "dog:ink", "K-LoRA map": "on", "K-LoRA method": "dynamic", "K-LoRA KL hybrid": "Off"}
    pasted = KLoraParams.from_infotext(old)
    assert pasted is not None and pasted.show_map is True and pasted.kl_hybrid is False
    # the legacy words are an infotext's only: a non-boolean entry saying "on" is still an error
    with pytest.raises(ParamsError, match="infotext 'K-LoRA method'"):
        KLoraParams.from_infotext({"K-LoRA": "dog:ink", "K-LoRA method": "on"})
    with pytest.raises(ParamsError, match="infotext 'K-LoRA map': must be true or false"):
        KLoraParams.from_infotext({"K-LoRA": "dog:ink", "K-LoRA map": "yes"})
