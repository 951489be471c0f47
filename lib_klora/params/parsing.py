"""Value parsers: the one conversion rule per field, shared by every entry point, and ParamsError."""

from __future__ import annotations

import base64
import functools
import json
import math
import re
from collections.abc import Callable, Iterable

from lib_klora.errors import KLoraError
from lib_klora.fusion.options import normalise_pattern_text
from lib_klora.params.fields import (
    ALPHA_LIMIT,
    BETA_LIMIT,
    CHOICES,
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    ETA_LIMIT,
    GUIDANCE_WEIGHT_LIMIT,
    MAX_GUIDANCE_EVERY,
    MAX_GUIDANCE_ITERS,
    MAX_MODEL_NAME,
    MAX_NAME_LENGTH,
    MAX_REFERENCE_TEXT,
    MAX_REFERENCES,
    MAX_SEED,
    NAME_FIELDS,
    OPTIONAL_FIELDS,
    REFERENCE_FIELDS,
    STRENGTH_LIMIT,
    TEMPERATURE_LIMIT,
)
from lib_klora.params.references import ReferenceImageError, decode_reference_image

_BOOL_FIELDS = ("enabled", "show_map", "kl_per_sample", "kl_hybrid", "guidance")
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
# What "not set" looks like in a text box, a dropdown or a tag; only optional fields accept it.
_UNSET_WORDS = frozenset({"", "none", "null", "default", "auto", "same"})
# A boolean is a real bool or, in text (tag, infotext, X/Y/Z cell, CLI), true/false. Nothing else: "on",
# "yes", 1 or "maybe" are errors on every route (only a pasted infotext maps the on/off that K-LoRA's
# infotexts once held, in `model.LEGACY_INFOTEXT_BOOLEANS`).
_TRUE_WORDS = frozenset({"true"})
_FALSE_WORDS = frozenset({"false"})
_FORBIDDEN_NAME_PARTS = ("/", "\\", ":", "<", ">", "..")


def _default_label(field: str) -> str:
    return f"K-LoRA parameter '{field}'"


def show_value(value: object) -> str:
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
    text = normalise_pattern_text(value) if field in ("pattern", "hires_pattern") else value.strip().lower()
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


def parse_field(field: str, value: object) -> object:
    """The one conversion rule per field, shared by every entry point."""
    if field in OPTIONAL_FIELDS and _is_unset(value):
        return None
    if field in NAME_FIELDS:
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


def format_number(value: float) -> str:
    """Shortest text that reads back to the same float: 1.0 -> "1", 0.8 -> "0.8"."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def unquote(value: object) -> object:
    """Accept a value still in the host's JSON quoting as well as the unquoted text."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
