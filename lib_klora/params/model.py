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

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

try:  # pydantic 2 (Forge), and pydantic >= 1.10.17 (A1111), expose the v1 API under this name
    from pydantic.v1 import BaseModel, Field, ValidationError, validator
except ImportError:  # older pydantic 1.x
    from pydantic import BaseModel, Field, ValidationError, validator  # type: ignore[no-redef]

from lib_klora.fusion.options import GammaVariant, Method
from lib_klora.fusion.schedule import DEFAULT_ALPHA, default_beta
from lib_klora.params.fields import (
    ALPHA_LIMIT,
    BETA_LIMIT,
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    ETA_LIMIT,
    FIELD_HELP,
    FIELD_LABELS,
    GUIDANCE_WEIGHT_LIMIT,
    INFOTEXT_KEYS,
    INFOTEXT_NAMES_KEY,
    MAX_GUIDANCE_EVERY,
    MAX_GUIDANCE_ITERS,
    MAX_MODEL_NAME,
    MAX_NAME_LENGTH,
    MAX_REFERENCES,
    MAX_SEED,
    NAME_FIELDS,
    OPTIONAL_FIELDS,
    STRENGTH_LIMIT,
    DecoderName,
    GammaName,
    HiresMode,
    KlDirection,
    MethodName,
    PatternName,
    TePolicy,
)
from lib_klora.params.parsing import ParamsError, format_number, parse_field, show_value, unquote

if TYPE_CHECKING:
    from lib_klora.fusion.plan import PlanSettings


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
        return parse_field(field.name, value)

    def __init__(self, **data: Any) -> None:
        # An infotext never holds the reference images, so a pasted "guidance on" cannot be complete yet.
        references_follow = bool(data.pop("_references_follow", False))
        clean = prepare_fields(data)
        try:
            super().__init__(**clean)
        except ValidationError as exc:
            raise from_validation_error(exc, clean) from None
        problems = self._cross_field_problems(check_references=not references_follow)
        if problems:
            raise ParamsError(problems)

    def _cross_field_problems(self, *, check_references: bool = True) -> list[tuple[str, str]]:
        if not self.enabled:  # a disabled accordion may hold half-filled values; they do nothing
            return []
        problems = []
        for name in NAME_FIELDS:
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
    def fusion_method(self) -> Method:
        """The method as the fusion's own type (the field holds its text, for JSON and the UI)."""
        return Method(self.method)

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
        from lib_klora.fusion.plan import PlanSettings

        params = self.for_pass(is_hires)
        if params is None:
            return None
        if not params.fusion_method.precomputed:
            raise ParamsError(
                [("method", "'dynamic' decides from the activations during sampling: no precomputed plan")]
            )
        return PlanSettings(
            method=params.fusion_method,
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
            strengths = f"{format_number(self.subject_strength)}:{format_number(self.style_strength)}"
            out[INFOTEXT_KEYS["strengths"]] = strengths
        for name in _INFOTEXT_SCALARS:
            value = getattr(self, name)
            if value == DEFAULTS[name] or (name == "beta" and self._beta_is_plain_default):
                continue
            if name.startswith(("kl_", "guidance_", "clip_", "dino_")) and not self._setting_in_use(name):
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, float):
                text = format_number(value)
            else:
                text = str(value)
            out[INFOTEXT_KEYS[name]] = text
        return out

    def _setting_in_use(self, name: str) -> bool:
        """Settings of a feature that is off stay out of the infotext (they changed nothing)."""
        if name.startswith("kl_"):
            return Method.DYNAMIC in (self.method, self.hires_method)
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
            parts = unquote(entries[key]).split(":")
            if len(parts) != len(fields):
                problem = f"expected {count_hint}, got {show_value(entries[key])}"
                raise ParamsError([("", problem)], context=key)
            for field, part in zip(fields, parts, strict=True):
                data[field] = part
                used_key[field] = key

        take(INFOTEXT_NAMES_KEY, NAME_FIELDS, "'<subject>:<style>'")
        if INFOTEXT_KEYS["strengths"] in entries:
            take(INFOTEXT_KEYS["strengths"], ("subject_strength", "style_strength"), "'<subject>:<style>'")
        for name in _INFOTEXT_SCALARS:
            key = INFOTEXT_KEYS[name]
            if key in entries:
                text = unquote(entries[key])
                if isinstance(DEFAULTS[name], bool):
                    text = LEGACY_INFOTEXT_BOOLEANS.get(str(text).strip().lower(), text)
                data[name] = text
                used_key[name] = key
        try:
            return cls(**data, _references_follow=True)
        except ParamsError as exc:
            raise exc.relabel(label=lambda f: f"infotext '{used_key.get(f, f)}'") from None


def prepare_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """Reject unknown keys by name; None in a required field means "not set" (an empty dropdown)."""
    unknown = [key for key in data if key not in _FIELD_SET]
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), POSITIONAL_FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append((str(key), f"unknown parameter{hint}"))
        raise ParamsError(problems)
    return {key: value for key, value in data.items() if value is not None or key in OPTIONAL_FIELDS}


def from_validation_error(exc: ValidationError, data: Mapping[str, Any]) -> ParamsError:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error.get("loc") else ""
        message = error["msg"]
        if field in data:
            message += f" (got {show_value(data[field])})"
        problems.append((field if field != "__root__" else "", message))
    return ParamsError(problems)


POSITIONAL_FIELDS: tuple[str, ...] = tuple(KLoraParams.__fields__)
_FIELD_SET = frozenset(POSITIONAL_FIELDS)
DEFAULTS: dict[str, Any] = {name: field.default for name, field in KLoraParams.__fields__.items()}
# The reference images are not written into images' metadata (size, and they may be private photos).
_INFOTEXT_SCALARS = tuple(name for name in INFOTEXT_KEYS if name != "strengths")
# Infotexts written before booleans became strict say "on"/"off"; pasting a saved image's infotext keeps
# working through this mapping, which applies to the infotext's boolean entries only: every other route
# (API, tag, X/Y/Z cell, CLI) accepts true/false alone.
LEGACY_INFOTEXT_BOOLEANS = {"on": "true", "off": "false"}
