"""One typed parameter model for the UI, the API, infotexts, the prompt tag and X/Y/Z axes.

Every entry point (gradio components, ``alwayson_scripts`` args, a pasted infotext, ``<klora:...>``,
an X/Y/Z cell) ends in :class:`KLoraParams`, so a value is checked by the same rule wherever it comes
from, and every mistake surfaces as :class:`ParamsError` naming the field.

Pydantic: A1111 v1.10.1 pins pydantic 1.10 and Forge ships pydantic 2. Both provide the v1 API as
``pydantic.v1``, so the model is written against that API once and behaves identically on both.

This module must stay importable without torch (the API middleware and the tests of the model use it
on their own), so enum values are mirrored as ``Literal`` strings and :mod:`lib_klora.fusion.plan` is
imported lazily by :meth:`KLoraParams.to_plan_settings`.
"""

from __future__ import annotations

import base64
import difflib
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

try:  # pydantic 2 (Forge), and pydantic >= 1.10.17 (A1111), expose the v1 API under this name
    from pydantic.v1 import BaseModel, Field, ValidationError, validate_model, validator
except ImportError:  # older pydantic 1.x
    from pydantic import BaseModel, Field, ValidationError, validate_model, validator  # type: ignore[no-redef]

from lib_klora.errors import KLoraError
from lib_klora.fusion.schedule import DEFAULT_ALPHA, default_beta
from lib_klora.params.references import ReferenceImageError, decode_reference_image

if TYPE_CHECKING:
    from lib_klora.fusion.plan import PlanSettings

__all__ = [
    "CHOICES",
    "FIELD_HELP",
    "FIELD_LABELS",
    "INFOTEXT_KEYS",
    "INFOTEXT_NAMES_KEY",
    "MAX_NAME_LENGTH",
    "POSITIONAL_FIELDS",
    "XYZ_AXES",
    "KLoraParams",
    "ParamsError",
    "XyzAxis",
    "apply_xyz",
]

# Mirrors of fusion.plan.Method / GammaVariant and fusion.schedule.Pattern (tests keep them equal).
MethodName = Literal["klora", "merge", "fixed", "random", "dynamic"]
PatternName = Literal["s", "s*"]
GammaName = Literal["official", "paper"]
TePolicy = Literal["both", "subject", "style", "none"]
HiresMode = Literal["same", "off", "separate"]
KlDirection = Literal["forward", "symmetric"]
DecoderName = Literal["taesd", "vae"]

CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("klora", "merge", "fixed", "random", "dynamic"),
    "pattern": ("s", "s*"),
    "gamma": ("official", "paper"),
    "te_policy": ("both", "subject", "style", "none"),
    "hires": ("same", "off", "separate"),
    "hires_method": ("klora", "merge", "fixed", "random", "dynamic"),
    "hires_pattern": ("s", "s*"),
    "kl_direction": ("forward", "symmetric"),
    "guidance_decoder": ("taesd", "vae"),
}

MAX_NAME_LENGTH = 255
MAX_SEED = 2**32 - 1  # the WebUI's own seed range
STRENGTH_LIMIT = 5.0
ALPHA_LIMIT = 10.0
BETA_LIMIT = 10.0
TEMPERATURE_LIMIT = 100.0
GUIDANCE_WEIGHT_LIMIT = 10.0
ETA_LIMIT = 1.0
MAX_GUIDANCE_EVERY = 1000
MAX_GUIDANCE_ITERS = 10
MAX_REFERENCES = 16  # per kind; each one is embedded once per job
MAX_REFERENCE_TEXT = 48 * 1024 * 1024  # base64 characters of one reference (about 36 MB of file)
MAX_MODEL_NAME = 120
DEFAULT_CLIP_MODEL = "ViT-B-32:laion2b_s34b_b79k"  # open_clip MODEL:PRETRAINED
DEFAULT_DINO_MODEL = "vit_small_patch16_224.dino"  # timm model name

FIELD_LABELS: dict[str, str] = {
    "enabled": "Enable K-LoRA",
    "subject": "Subject LoRA",
    "style": "Style LoRA",
    "subject_strength": "Subject strength",
    "style_strength": "Style strength",
    "method": "Method",
    "pattern": "Time-scale pattern",
    "alpha": "Alpha (slope)",
    "beta": "Beta (offset)",
    "gamma": "Balance factor γ",
    "seed": "Random-baseline seed",
    "te_policy": "Text-encoder LoRAs",
    "hires": "Hires pass",
    "hires_method": "Hires method",
    "hires_pattern": "Hires pattern",
    "hires_alpha": "Hires alpha",
    "hires_beta": "Hires beta",
    "show_map": "Show selection map",
    "kl_temperature": "KL temperature",
    "kl_direction": "KL direction",
    "kl_per_sample": "Decide per image",
    "kl_hybrid": "Hybrid with K-LoRA time scale",
    "guidance": "Enable reference guidance",
    "guidance_style": "Style weight (CLIP)",
    "guidance_subject": "Subject weight (DINO)",
    "guidance_subject_clip": "Subject weight (CLIP)",
    "guidance_text": "Prompt weight (CLIP text)",
    "guidance_eta": "Step size η",
    "guidance_start": "Guidance start",
    "guidance_end": "Guidance end",
    "guidance_every": "Guide every k-th step",
    "guidance_iters": "Gradient steps per guided step",
    "guidance_decoder": "Decoder for guidance",
    "clip_model": "CLIP model",
    "dino_model": "DINO model",
    "style_refs": "Style reference images",
    "subject_refs": "Subject reference images",
}

FIELD_HELP: dict[str, str] = {
    "enabled": "Fuse the subject LoRA and the style LoRA layer by layer for this generation.",
    "subject": "LoRA of the content (a person, an object): a name from the WebUI's LoRA list, not a path.",
    "style": "LoRA of the look: a name from the WebUI's LoRA list, not a path; must differ from the subject.",
    "subject_strength": "Multiplier of the subject LoRA, as in <lora:name:strength> (-5 to 5).",
    "style_strength": "Multiplier of the style LoRA, as in <lora:name:strength> (-5 to 5).",
    "method": (
        "klora: per-layer choice by Top-K scores and a time scale (the paper). merge: both LoRAs everywhere. "
        "fixed: switch by time only. random: a seeded random choice per layer (baselines for comparison). "
        "dynamic: per layer and step, the LoRA whose output differs more (KL) from the base output."
    ),
    "pattern": "s: subject early, style late. s*: style first, a wrap back to the subject, then style again.",
    "alpha": "Slope of the time scale S(r) = alpha·r + beta; larger hands layers to the style sooner (0-10).",
    "beta": "Offset of the time scale; empty uses the pattern's default (0.5 for s, 1.3 for s*).",
    "gamma": "official: mean of per-layer ratios without outliers (released code); paper: ratio of sums.",
    "seed": "Seed of the random baseline only; other methods ignore it (0 to 4294967295).",
    "te_policy": "Which LoRAs' text-encoder parts apply: both, the subject's, the style's, or none.",
    "hires": "Hires fix pass: same settings, no K-LoRA at all, or the separate hires settings below.",
    "hires_method": "Method for the hires pass when 'separate'; empty keeps the first pass's method.",
    "hires_pattern": "Pattern for the hires pass when 'separate'; empty keeps the first pass's pattern.",
    "hires_alpha": "Alpha for the hires pass when 'separate'; empty keeps the first pass's alpha.",
    "hires_beta": "Beta for the hires pass when 'separate'; empty keeps the first pass's beta.",
    "show_map": "Append an image of which LoRA each layer used at each step to the outputs.",
    "kl_temperature": "Method dynamic: softmax temperature of the distributions KL compares (>0-100).",
    "kl_direction": "Method dynamic: forward KL(base‖LoRA), or symmetric (both directions added).",
    "kl_per_sample": "Method dynamic: decide per image of the batch (cond and uncond may then differ).",
    "kl_hybrid": "Method dynamic: scale the style divergence by K-LoRA's S(t) (pattern, alpha, beta).",
    "guidance": (
        "Nudge each step's denoised image towards the reference images (CLIP for style, DINO for subject). "
        "Works with every method; slower (a decode and two encoders with gradients per guided step)."
    ),
    "guidance_style": "Weight of CLIP image similarity to the style references (0 = off, max 10).",
    "guidance_subject": "Weight of DINO similarity to the subject references (0 = off, max 10).",
    "guidance_subject_clip": "Weight of CLIP image similarity to the subject references (default off).",
    "guidance_text": "Weight of CLIP similarity to the prompt (default off; needs no reference image).",
    "guidance_eta": "Size of each nudge, in units of the latent's RMS, scaled down with the noise (>0-1).",
    "guidance_start": "First guided point of each pass, as a fraction of its steps (0-1).",
    "guidance_end": "Guidance stops at this fraction of each pass's steps (0-1; late nudges add artefacts).",
    "guidance_every": "Guide every k-th step inside the window (1 = every step; 1-1000).",
    "guidance_iters": "Gradient steps per guided step (1-10).",
    "guidance_decoder": "taesd: the tiny decoder (fast). vae: the checkpoint's full VAE (slow, more memory).",
    "clip_model": "open_clip model and weights as MODEL:PRETRAINED, e.g. ViT-B-32:laion2b_s34b_b79k.",
    "dino_model": "timm DINO model, e.g. vit_small_patch16_224.dino.",
    "style_refs": "Images of the style (API: a list of base64 strings). Not stored in the infotext.",
    "subject_refs": "Images of the subject (API: a list of base64 strings). Not stored in the infotext.",
}

_NAME_FIELDS = ("subject", "style")
_BOOL_FIELDS = ("enabled", "show_map", "kl_per_sample", "kl_hybrid", "guidance")
REFERENCE_FIELDS = ("style_refs", "subject_refs")
_INT_RANGES: dict[str, tuple[int, int]] = {
    "seed": (0, MAX_SEED),
    "guidance_every": (1, MAX_GUIDANCE_EVERY),
    "guidance_iters": (1, MAX_GUIDANCE_ITERS),
}
# open_clip MODEL:PRETRAINED (or MODEL/PRETRAINED, writable in a tag); timm model names.
_MODEL_NAME_PATTERNS = {
    "clip_model": re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]*[:/][A-Za-z0-9][A-Za-z0-9._+@-]*"),
    "dino_model": re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*"),
}
# field -> (low, low is allowed, high): every float is finite and at most `high`
_FLOAT_RANGES: dict[str, tuple[float, bool, float]] = {
    "subject_strength": (-STRENGTH_LIMIT, True, STRENGTH_LIMIT),
    "style_strength": (-STRENGTH_LIMIT, True, STRENGTH_LIMIT),
    "alpha": (0.0, False, ALPHA_LIMIT),
    "beta": (-BETA_LIMIT, True, BETA_LIMIT),
    "hires_alpha": (0.0, False, ALPHA_LIMIT),
    "hires_beta": (-BETA_LIMIT, True, BETA_LIMIT),
    "kl_temperature": (0.0, False, TEMPERATURE_LIMIT),
    "guidance_style": (0.0, True, GUIDANCE_WEIGHT_LIMIT),
    "guidance_subject": (0.0, True, GUIDANCE_WEIGHT_LIMIT),
    "guidance_subject_clip": (0.0, True, GUIDANCE_WEIGHT_LIMIT),
    "guidance_text": (0.0, True, GUIDANCE_WEIGHT_LIMIT),
    "guidance_eta": (0.0, False, ETA_LIMIT),
    "guidance_start": (0.0, True, 1.0),
    "guidance_end": (0.0, True, 1.0),
}
_OPTIONAL_FIELDS = frozenset({"beta", "hires_method", "hires_pattern", "hires_alpha", "hires_beta"})
# What "not set" looks like in a text box, a dropdown or a tag; only optional fields accept it.
_UNSET_WORDS = frozenset({"", "none", "null", "default", "auto", "same"})
_TRUE_WORDS = frozenset({"true", "1", "yes", "y", "on", "t"})
_FALSE_WORDS = frozenset({"false", "0", "no", "n", "off", "f"})
_FORBIDDEN_NAME_PARTS = ("/", "\\", ":", "<", ">", "..")


def _default_label(field: str) -> str:
    return f"K-LoRA parameter '{field}'"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ParamsError(KLoraError):
    """Any invalid K-LoRA parameter, from any source.

    ``problems`` lists (field, reason) pairs; a plain string is one problem not tied to a field.
    """

    def __init__(
        self,
        problems: str | Iterable[tuple[str, str]],
        *,
        context: str = "",
        label: Callable[[str], str] = _default_label,
    ) -> None:
        self.problems: tuple[tuple[str, str], ...] = (
            (("", problems),) if isinstance(problems, str) else tuple(problems)
        )
        self.context = context
        # A problem without a field (field "") is about the arguments as a whole.
        text = "; ".join(f"{label(f)}: {msg}" if f else msg for f, msg in self.problems)
        super().__init__(f"{context}: {text}" if context else text)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self.problems if f)

    def relabel(self, *, context: str = "", label: Callable[[str], str] = _default_label) -> ParamsError:
        """The same problems, described in the caller's terms (tag keys, infotext keys)."""
        return ParamsError(self.problems, context=context, label=label)


# ---------------------------------------------------------------- value parsers (raise ValueError)


def _parse_float(value: object) -> float:
    if isinstance(value, bool):  # bool is an int subclass; True as "1.0" would hide a wrong slot
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError("must be a number") from None
    else:
        raise ValueError("must be a number")
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _parse_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    # gradio's Number hands over 3.0 for 3; only whole numbers pass, 3.7 must not become 3 silently
    number = _parse_float(value)
    if not number.is_integer():
        raise ValueError("must be a whole number")
    return int(number)


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise ValueError("must be true or false")


def _parse_choice(field: str, value: object) -> str:
    allowed = CHOICES[field]  # str-based enums (Method.KLORA) pass as their text
    if not isinstance(value, str):
        raise ValueError(f"must be one of {', '.join(map(repr, allowed))}")
    text = value.strip().lower()
    if field in ("pattern", "hires_pattern"):  # same spellings as schedule.parse_pattern
        text = text.replace("_star", "*").replace("star", "*")
    if text not in allowed:
        raise ValueError(f"must be one of {', '.join(map(repr, allowed))}")
    return text


def _parse_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a LoRA name (text)")
    name = value.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"must be at most {MAX_NAME_LENGTH} characters")
    # Names resolve only through the WebUI's LoRA list; anything path-like is refused outright,
    # and ':' '<' '>' cannot be written in a <klora:...> tag or an infotext value anyway.
    for part in _FORBIDDEN_NAME_PARTS:
        if part in name:
            raise ValueError(f"must be a LoRA name from the WebUI's list, not a path (contains {part!r})")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("must not contain control characters")
    return name


def clip_model_parts(spec: str) -> tuple[str, str]:
    """("ViT-B-32", "laion2b_s34b_b79k") from either spelling of a validated clip_model."""
    model, _, tag = spec.replace("/", ":").partition(":")
    return model, tag


def _parse_model_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a model name (text)")
    name = value.strip()
    if len(name) > MAX_MODEL_NAME or not _MODEL_NAME_PATTERNS[field].fullmatch(name) or ".." in name:
        example = DEFAULT_CLIP_MODEL if field == "clip_model" else DEFAULT_DINO_MODEL
        raise ValueError(f"is not a model name like {example!r}")
    return name


@functools.lru_cache(maxsize=64)
def _check_reference_text(text: str) -> None:
    """Decode once: the same upload is validated again by every copy of the parameters (hires, X/Y/Z)."""
    decode_reference_image(text, name="image")


def _parse_references(value: object) -> tuple[str, ...]:
    """Uploads as base64 text (API: strings, data URLs allowed) or raw bytes (the accordion's file boxes).

    Every item must decode to an image; the result is base64 text, so the parameters stay JSON-able.
    """
    if value is None or value == "":
        return ()
    if isinstance(value, (str, bytes, bytearray)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("must be a list of images (base64 strings)")
    if len(value) > MAX_REFERENCES:
        raise ValueError(f"at most {MAX_REFERENCES} images, got {len(value)}")
    out: list[str] = []
    for number, item in enumerate(value, 1):
        if isinstance(item, (bytes, bytearray)):
            item = base64.b64encode(bytes(item)).decode("ascii")
        if not isinstance(item, str):
            raise ValueError(f"image {number}: must be a base64 string, got {type(item).__name__}")
        if len(item) > MAX_REFERENCE_TEXT:
            limit = MAX_REFERENCE_TEXT // (1024 * 1024)
            raise ValueError(f"image {number}: larger than {limit} MB of base64")
        try:
            _check_reference_text(item)
        except ReferenceImageError as exc:
            raise ValueError(f"image {number}: {str(exc).removeprefix('image: ')}") from None
        out.append(item)
    return tuple(out)


def _is_unset(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _UNSET_WORDS)


def _parse_field(field: str, value: object) -> object:
    """The one conversion rule per field, shared by every entry point."""
    if field in _OPTIONAL_FIELDS and _is_unset(value):
        return None
    if field in _NAME_FIELDS:
        return _parse_name(value)
    if field in _BOOL_FIELDS:
        return _parse_bool(value)
    if field in _INT_RANGES:
        low, high = _INT_RANGES[field]
        number = _parse_int(value)
        if not low <= number <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return number
    if field in _MODEL_NAME_PATTERNS:
        return _parse_model_name(field, value)
    if field in REFERENCE_FIELDS:
        return _parse_references(value)
    if field in CHOICES:
        return _parse_choice(field, value)
    if field in _FLOAT_RANGES:
        low, low_allowed, high = _FLOAT_RANGES[field]
        number = _parse_float(value)
        if number < low or (number == low and not low_allowed):
            raise ValueError(f"must be {'>=' if low_allowed else '>'} {low:g}")
        if number > high:
            raise ValueError(f"must be <= {high:g}")
        return number
    raise ValueError("is not a K-LoRA parameter")  # unreachable: every field is listed above


def _format_number(value: float) -> str:
    """Shortest text that reads back to the same float: 1.0 -> "1", 0.8 -> "0.8"."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


# ---------------------------------------------------------------- the model


def _weight_field(name: str, default: float) -> Any:
    return Field(
        default, title=FIELD_LABELS[name], description=FIELD_HELP[name], ge=0, le=GUIDANCE_WEIGHT_LIMIT
    )


class KLoraParams(BaseModel):
    """Settings of one K-LoRA generation. Field order = the WebUI script's positional argument order."""

    enabled: bool = Field(False, title=FIELD_LABELS["enabled"], description=FIELD_HELP["enabled"])
    subject: str = Field(
        "", title=FIELD_LABELS["subject"], description=FIELD_HELP["subject"], max_length=MAX_NAME_LENGTH
    )
    style: str = Field(
        "", title=FIELD_LABELS["style"], description=FIELD_HELP["style"], max_length=MAX_NAME_LENGTH
    )
    subject_strength: float = Field(
        1.0,
        title=FIELD_LABELS["subject_strength"],
        description=FIELD_HELP["subject_strength"],
        ge=-STRENGTH_LIMIT,
        le=STRENGTH_LIMIT,
    )
    style_strength: float = Field(
        1.0,
        title=FIELD_LABELS["style_strength"],
        description=FIELD_HELP["style_strength"],
        ge=-STRENGTH_LIMIT,
        le=STRENGTH_LIMIT,
    )
    method: MethodName = Field("klora", title=FIELD_LABELS["method"], description=FIELD_HELP["method"])
    pattern: PatternName = Field("s", title=FIELD_LABELS["pattern"], description=FIELD_HELP["pattern"])
    alpha: float = Field(
        DEFAULT_ALPHA, title=FIELD_LABELS["alpha"], description=FIELD_HELP["alpha"], gt=0, le=ALPHA_LIMIT
    )
    beta: float | None = Field(
        None, title=FIELD_LABELS["beta"], description=FIELD_HELP["beta"], ge=-BETA_LIMIT, le=BETA_LIMIT
    )
    gamma: GammaName = Field("official", title=FIELD_LABELS["gamma"], description=FIELD_HELP["gamma"])
    seed: int = Field(0, title=FIELD_LABELS["seed"], description=FIELD_HELP["seed"], ge=0, le=MAX_SEED)
    te_policy: TePolicy = Field("both", title=FIELD_LABELS["te_policy"], description=FIELD_HELP["te_policy"])
    hires: HiresMode = Field("same", title=FIELD_LABELS["hires"], description=FIELD_HELP["hires"])
    hires_method: MethodName | None = Field(
        None, title=FIELD_LABELS["hires_method"], description=FIELD_HELP["hires_method"]
    )
    hires_pattern: PatternName | None = Field(
        None, title=FIELD_LABELS["hires_pattern"], description=FIELD_HELP["hires_pattern"]
    )
    hires_alpha: float | None = Field(
        None,
        title=FIELD_LABELS["hires_alpha"],
        description=FIELD_HELP["hires_alpha"],
        gt=0,
        le=ALPHA_LIMIT,
    )
    hires_beta: float | None = Field(
        None,
        title=FIELD_LABELS["hires_beta"],
        description=FIELD_HELP["hires_beta"],
        ge=-BETA_LIMIT,
        le=BETA_LIMIT,
    )
    show_map: bool = Field(False, title=FIELD_LABELS["show_map"], description=FIELD_HELP["show_map"])
    # Method "dynamic" (feature-level KL selection)
    kl_temperature: float = Field(
        1.0, title=FIELD_LABELS["kl_temperature"], description=FIELD_HELP["kl_temperature"], gt=0, le=100
    )
    kl_direction: KlDirection = Field(
        "forward", title=FIELD_LABELS["kl_direction"], description=FIELD_HELP["kl_direction"]
    )
    kl_per_sample: bool = Field(
        False, title=FIELD_LABELS["kl_per_sample"], description=FIELD_HELP["kl_per_sample"]
    )
    kl_hybrid: bool = Field(False, title=FIELD_LABELS["kl_hybrid"], description=FIELD_HELP["kl_hybrid"])
    # Reference guidance (latent-level refinement), with any method
    guidance: bool = Field(False, title=FIELD_LABELS["guidance"], description=FIELD_HELP["guidance"])
    guidance_style: float = _weight_field("guidance_style", 1.0)
    guidance_subject: float = _weight_field("guidance_subject", 1.0)
    guidance_subject_clip: float = _weight_field("guidance_subject_clip", 0.0)
    guidance_text: float = _weight_field("guidance_text", 0.0)
    guidance_eta: float = Field(
        0.05, title=FIELD_LABELS["guidance_eta"], description=FIELD_HELP["guidance_eta"], gt=0, le=ETA_LIMIT
    )
    guidance_start: float = Field(
        0.0, title=FIELD_LABELS["guidance_start"], description=FIELD_HELP["guidance_start"], ge=0, le=1
    )
    guidance_end: float = Field(
        0.9, title=FIELD_LABELS["guidance_end"], description=FIELD_HELP["guidance_end"], ge=0, le=1
    )
    guidance_every: int = Field(
        1,
        title=FIELD_LABELS["guidance_every"],
        description=FIELD_HELP["guidance_every"],
        ge=1,
        le=MAX_GUIDANCE_EVERY,
    )
    guidance_iters: int = Field(
        1,
        title=FIELD_LABELS["guidance_iters"],
        description=FIELD_HELP["guidance_iters"],
        ge=1,
        le=MAX_GUIDANCE_ITERS,
    )
    guidance_decoder: DecoderName = Field(
        "taesd", title=FIELD_LABELS["guidance_decoder"], description=FIELD_HELP["guidance_decoder"]
    )
    clip_model: str = Field(
        DEFAULT_CLIP_MODEL,
        title=FIELD_LABELS["clip_model"],
        description=FIELD_HELP["clip_model"],
        max_length=MAX_MODEL_NAME,
    )
    dino_model: str = Field(
        DEFAULT_DINO_MODEL,
        title=FIELD_LABELS["dino_model"],
        description=FIELD_HELP["dino_model"],
        max_length=MAX_MODEL_NAME,
    )
    style_refs: tuple[str, ...] = Field(
        (), title=FIELD_LABELS["style_refs"], description=FIELD_HELP["style_refs"], maxItems=MAX_REFERENCES
    )
    subject_refs: tuple[str, ...] = Field(
        (),
        title=FIELD_LABELS["subject_refs"],
        description=FIELD_HELP["subject_refs"],
        maxItems=MAX_REFERENCES,
    )

    class Config:
        extra = "forbid"
        frozen = True  # one object is shared by every hook of a job; nothing may change it midway
        title = "K-LoRA parameters"

    # One pre-validator for all fields, so pydantic's own coercions (3.7 -> 3, True -> 1.0) never run first.
    @validator("*", pre=True)
    def _check_field(cls, value: object, field: Any) -> object:
        return _parse_field(field.name, value)

    def __init__(self, **data: Any) -> None:
        # An infotext never holds the reference images, so a pasted "guidance on" cannot be complete yet.
        references_follow = bool(data.pop("_references_follow", False))
        clean = _prepare(data)
        try:
            super().__init__(**clean)
        except ValidationError as exc:
            raise _from_validation_error(exc, clean) from None
        problems = self._cross_field_problems(check_references=not references_follow)
        if problems:
            raise ParamsError(problems)

    def _cross_field_problems(self, *, check_references: bool = True) -> list[tuple[str, str]]:
        if not self.enabled:  # a disabled accordion may hold half-filled values; they do nothing
            return []
        problems = []
        for name in _NAME_FIELDS:
            if not getattr(self, name):
                problems.append((name, f"a {name} LoRA is required when K-LoRA is enabled"))
        if self.subject and self.subject == self.style:
            problems.append(("style", f"must be a different LoRA from the subject ({self.subject!r})"))
        if self.guidance:
            if self.guidance_start >= self.guidance_end:
                problems.append(
                    ("guidance_end", f"must be greater than guidance_start ({self.guidance_start:g})")
                )
            if check_references and not self.guidance_terms():
                problems.append(("guidance", self._no_guidance_target()))
        return problems

    def guidance_terms(self) -> dict[str, float]:
        """The guidance terms that will run: a positive weight and something to compare with."""
        terms = {
            "style_clip": self.guidance_style if self.style_refs else 0.0,
            "subject_dino": self.guidance_subject if self.subject_refs else 0.0,
            "subject_clip": self.guidance_subject_clip if self.subject_refs else 0.0,
            "text_clip": self.guidance_text,
        }
        return {term: weight for term, weight in terms.items() if weight > 0}

    def _no_guidance_target(self) -> str:
        if not self.style_refs and not self.subject_refs:
            return (
                "guidance is on but there are no reference images: add style and/or subject reference "
                "images (API: style_refs / subject_refs as base64 strings), or switch guidance off"
            )
        return (
            "guidance is on but every term with reference images has weight 0: raise guidance_style "
            "(style images) or guidance_subject / guidance_subject_clip (subject images)"
        )

    @property
    def uses_guidance(self) -> bool:
        return self.enabled and self.guidance and bool(self.guidance_terms())

    # ------------------------------------------------------------ construction from the host

    @classmethod
    def from_any(cls, args: Sequence[Any] | Mapping[str, Any] | KLoraParams) -> KLoraParams:
        """Script args as the WebUI passes them: ``[{...}]`` from the API, or positional values.

        With a dict first, the remaining slots are the UI defaults the API copied around it and are
        ignored. Positional args follow :data:`POSITIONAL_FIELDS`; missing trailing ones keep defaults.
        """
        if isinstance(args, KLoraParams):
            return args
        if isinstance(args, Mapping):
            return cls(**dict(args))
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise ParamsError([("", f"K-LoRA arguments must be a list or a dict, got {type(args).__name__}")])
        if not args:
            return cls()
        first = args[0]
        if isinstance(first, KLoraParams):
            return first
        if isinstance(first, Mapping):
            return cls(**dict(first))
        if len(args) > len(POSITIONAL_FIELDS):
            raise ParamsError(
                [("", f"K-LoRA takes at most {len(POSITIONAL_FIELDS)} positional arguments, got {len(args)}")]
            )
        return cls(**dict(zip(POSITIONAL_FIELDS, args, strict=False)))

    def with_overrides(self, overrides: Mapping[str, Any]) -> KLoraParams:
        """A validated copy with some fields replaced (X/Y/Z cells, the prompt tag)."""
        return KLoraParams(**{**self.to_dict(), **overrides})

    # ------------------------------------------------------------ export

    def to_positional(self) -> list[Any]:
        return [getattr(self, name) for name in POSITIONAL_FIELDS]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, keyed by field name, in field order."""
        return {name: getattr(self, name) for name in POSITIONAL_FIELDS}

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON schema of the API's dict form; descriptions double as the UI's hover help."""
        return cls.schema()

    # ------------------------------------------------------------ per pass

    @property
    def effective_beta(self) -> float:
        return default_beta(self.pattern) if self.beta is None else self.beta

    def for_pass(self, is_hires: bool) -> KLoraParams | None:
        """Settings for the first pass or the hires pass; None when K-LoRA is off for that pass.

        With hires == "separate", each unset hires field keeps the first pass's value literally
        (an explicit beta stays even if the hires pattern differs).
        """
        if not self.enabled:
            return None
        if not is_hires or self.hires == "same":
            return self
        if self.hires == "off":
            return None
        changes = {
            name: getattr(self, f"hires_{name}")
            for name in ("method", "pattern", "alpha", "beta")
            if getattr(self, f"hires_{name}") is not None
        }
        return self.with_overrides(changes) if changes else self

    def to_plan_settings(self, is_hires: bool = False) -> PlanSettings | None:
        """The engine's settings for one pass (None when that pass runs without K-LoRA)."""
        from lib_klora.fusion.plan import GammaVariant, Method, PlanSettings  # torch lives behind this import

        params = self.for_pass(is_hires)
        if params is None:
            return None
        if params.method == "dynamic":
            raise ParamsError(
                [("method", "'dynamic' decides from the activations during sampling: no precomputed plan")]
            )
        return PlanSettings(
            method=Method(params.method),
            pattern=params.pattern,
            alpha=params.alpha,
            beta=params.beta,
            gamma=GammaVariant(params.gamma),
            strengths=(params.subject_strength, params.style_strength),
            seed=params.seed,
        )

    # ------------------------------------------------------------ infotext

    @property
    def _beta_is_plain_default(self) -> bool:
        """The accordion shows β resolved, so it usually sends the pattern's default explicitly. That
        means "default" unless a hires pass with another pattern inherits the literal value."""
        if self.beta != default_beta(self.pattern):
            return False
        inherited = self.hires == "separate" and self.hires_beta is None
        return not (inherited and self.hires_pattern not in (None, self.pattern))

    def to_infotext(self) -> dict[str, str]:
        """Generation-parameter entries: "K-LoRA" = "<subject>:<style>", then only non-default values.

        Empty when disabled. The host quotes values holding ',' or ':'; names never hold ':'.
        """
        if not self.enabled:
            return {}
        out = {INFOTEXT_NAMES_KEY: f"{self.subject}:{self.style}"}
        if (self.subject_strength, self.style_strength) != (1.0, 1.0):
            strengths = f"{_format_number(self.subject_strength)}:{_format_number(self.style_strength)}"
            out[INFOTEXT_KEYS["strengths"]] = strengths
        for name in _INFOTEXT_SCALARS:
            value = getattr(self, name)
            if value == _DEFAULTS[name] or (name == "beta" and self._beta_is_plain_default):
                continue
            if name.startswith(("kl_", "guidance_", "clip_", "dino_")) and not self._setting_in_use(name):
                continue
            if isinstance(value, bool):
                text = "on" if value else "off"
            elif isinstance(value, float):
                text = _format_number(value)
            else:
                text = str(value)
            out[INFOTEXT_KEYS[name]] = text
        return out

    def _setting_in_use(self, name: str) -> bool:
        """Settings of a feature that is off stay out of the infotext (they changed nothing)."""
        if name.startswith("kl_"):
            return "dynamic" in (self.method, self.hires_method)
        return self.guidance

    @classmethod
    def from_infotext(cls, entries: Mapping[str, Any]) -> KLoraParams | None:
        """Parameters from parsed infotext entries; None when the image was not made with K-LoRA.

        Unknown "K-LoRA ..." keys are ignored, so infotexts from newer versions still paste.
        """
        if INFOTEXT_NAMES_KEY not in entries:
            return None
        data: dict[str, Any] = {"enabled": True}
        used_key: dict[str, str] = {}

        def take(key: str, fields: tuple[str, ...], count_hint: str) -> None:
            parts = _unquote(entries[key]).split(":")
            if len(parts) != len(fields):
                raise ParamsError([("", f"expected {count_hint}, got {_show(entries[key])}")], context=key)
            for field, part in zip(fields, parts, strict=True):
                data[field] = part
                used_key[field] = key

        take(INFOTEXT_NAMES_KEY, _NAME_FIELDS, "'<subject>:<style>'")
        if INFOTEXT_KEYS["strengths"] in entries:
            take(INFOTEXT_KEYS["strengths"], ("subject_strength", "style_strength"), "'<subject>:<style>'")
        for name in _INFOTEXT_SCALARS:
            key = INFOTEXT_KEYS[name]
            if key in entries:
                data[name] = _unquote(entries[key])
                used_key[name] = key
        try:
            return cls(**data, _references_follow=True)
        except ParamsError as exc:
            raise exc.relabel(label=lambda f: f"infotext '{used_key.get(f, f)}'") from None


def _unquote(value: object) -> object:
    """Accept a value still in the host's JSON quoting as well as the unquoted text."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _prepare(data: Mapping[str, Any]) -> dict[str, Any]:
    """Reject unknown keys by name; None in a required field means "not set" (an empty dropdown)."""
    unknown = [key for key in data if key not in _FIELD_SET]
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), POSITIONAL_FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append((str(key), f"unknown parameter{hint}"))
        raise ParamsError(problems)
    return {key: value for key, value in data.items() if value is not None or key in _OPTIONAL_FIELDS}


def _from_validation_error(exc: ValidationError, data: Mapping[str, Any]) -> ParamsError:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error.get("loc") else ""
        message = error["msg"]
        if field in data:
            message += f" (got {_show(data[field])})"
        problems.append((field if field != "__root__" else "", message))
    return ParamsError(problems)


POSITIONAL_FIELDS: tuple[str, ...] = tuple(KLoraParams.__fields__)
_FIELD_SET = frozenset(POSITIONAL_FIELDS)
_DEFAULTS: dict[str, Any] = {name: field.default for name, field in KLoraParams.__fields__.items()}

INFOTEXT_NAMES_KEY = "K-LoRA"
INFOTEXT_KEYS: dict[str, str] = {
    "strengths": "K-LoRA strengths",
    "method": "K-LoRA method",
    "pattern": "K-LoRA pattern",
    "alpha": "K-LoRA alpha",
    "beta": "K-LoRA beta",
    "gamma": "K-LoRA gamma",
    "seed": "K-LoRA seed",
    "te_policy": "K-LoRA TE",
    "hires": "K-LoRA hires",
    "hires_method": "K-LoRA hires method",
    "hires_pattern": "K-LoRA hires pattern",
    "hires_alpha": "K-LoRA hires alpha",
    "hires_beta": "K-LoRA hires beta",
    "show_map": "K-LoRA map",
    "kl_temperature": "K-LoRA KL temperature",
    "kl_direction": "K-LoRA KL direction",
    "kl_per_sample": "K-LoRA KL per image",
    "kl_hybrid": "K-LoRA KL hybrid",
    "guidance": "K-LoRA guidance",
    "guidance_style": "K-LoRA guidance style",
    "guidance_subject": "K-LoRA guidance subject",
    "guidance_subject_clip": "K-LoRA guidance subject CLIP",
    "guidance_text": "K-LoRA guidance text",
    "guidance_eta": "K-LoRA guidance eta",
    "guidance_start": "K-LoRA guidance start",
    "guidance_end": "K-LoRA guidance end",
    "guidance_every": "K-LoRA guidance every",
    "guidance_iters": "K-LoRA guidance iters",
    "guidance_decoder": "K-LoRA guidance decoder",
    "clip_model": "K-LoRA CLIP",
    "dino_model": "K-LoRA DINO",
}
# The reference images are not written into images' metadata (size, and they may be private photos).
_INFOTEXT_SCALARS = tuple(name for name in INFOTEXT_KEYS if name != "strengths")


# ---------------------------------------------------------------- X/Y/Z plot


class XyzAxis(NamedTuple):
    label: str  # as shown in the X/Y/Z plot's axis dropdown
    field: str  # KLoraParams field the cell value goes to
    value_type: Literal["str", "float", "bool"]
    choices: tuple[str, ...] | None  # None: free values (LoRA names come from the host's list)


XYZ_AXES: tuple[XyzAxis, ...] = (
    XyzAxis("[K-LoRA] Enabled", "enabled", "bool", ("on", "off")),
    XyzAxis("[K-LoRA] Subject LoRA", "subject", "str", None),
    XyzAxis("[K-LoRA] Style LoRA", "style", "str", None),
    XyzAxis("[K-LoRA] Method", "method", "str", CHOICES["method"]),
    XyzAxis("[K-LoRA] Pattern", "pattern", "str", CHOICES["pattern"]),
    XyzAxis("[K-LoRA] Alpha", "alpha", "float", None),
    XyzAxis("[K-LoRA] Beta", "beta", "float", None),
    XyzAxis("[K-LoRA] Subject strength", "subject_strength", "float", None),
    XyzAxis("[K-LoRA] Style strength", "style_strength", "float", None),
    XyzAxis("[K-LoRA] KL temperature", "kl_temperature", "float", None),
    XyzAxis("[K-LoRA] KL direction", "kl_direction", "str", CHOICES["kl_direction"]),
    XyzAxis("[K-LoRA] Guidance", "guidance", "bool", ("on", "off")),
    XyzAxis("[K-LoRA] Guidance eta", "guidance_eta", "float", None),
    XyzAxis("[K-LoRA] Guidance style weight", "guidance_style", "float", None),
    XyzAxis("[K-LoRA] Guidance subject weight", "guidance_subject", "float", None),
    XyzAxis("[K-LoRA] Guidance end", "guidance_end", "float", None),
)


def apply_xyz(params_dict: Mapping[str, Any], field: str, raw_value: object) -> dict[str, Any]:
    """A new override dict with `field` set to the validated cell value; the input is not changed.

    Only the field's own rule applies here; cross-field rules run when the overrides are merged
    into the UI/API parameters with :meth:`KLoraParams.with_overrides`.
    """
    clean = _prepare({field: raw_value})
    values, _, error = validate_model(KLoraParams, clean)
    if error is not None:
        raise _from_validation_error(error, clean).relabel(label=lambda f: f"X/Y/Z axis value for '{f}'")
    return {**params_dict, field: values.get(field, _DEFAULTS[field])}
