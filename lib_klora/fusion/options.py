"""The fusion's vocabulary, torch-free: one type per concept for every route (params, CLI, engines, hosts).

The parameter model (lib_klora.params) builds its choices from these enums, so a new method or pattern
is added here once and every route, label and X/Y/Z axis follows.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

SUBJECT, STYLE = 0, 1  # LoRA indices in every plan, schedule and selection table
MAX_STEPS = 1000  # the most sampling steps a plan is made for, on every route (API, plan route, CLI)


class Method(str, Enum):
    KLORA = "klora"  # Top-K scores, γ and the time scale
    MERGE = "merge"  # baseline: every LoRA on every layer at every step
    FIXED = "fixed"  # baseline: time-only switch (the rule with equal scores)
    RANDOM = "random"  # baseline: each layer takes the subject with probability 1/3, seeded
    DYNAMIC = "dynamic"  # per layer and step from the activations (KL): no precomputed plan

    @property
    def precomputed(self) -> bool:
        """Whether the choices are known before sampling (a plan), rather than made from activations."""
        return self is not Method.DYNAMIC


PLANNED_METHODS: tuple[Method, ...] = tuple(m for m in Method if m.precomputed)


class Pattern(str, Enum):
    S = "s"  # S(r) = α·r + β: subject early, style late
    S_STAR = "s*"  # S*(r) = (α·r + β) mod α: style first, a wrap to subject, then style again


class GammaVariant(str, Enum):
    OFFICIAL = "official"  # mean of per-layer L1 ratios, dropping ratios ≥ 3× the mean (released code)
    PAPER = "paper"  # ratio of the total L1 sums (paper, Eq. 9)


def normalise_pattern_text(text: str) -> str:
    """The accepted spellings of s*: "s*", "s_star", "sstar" (any case, surrounding spaces)."""
    return text.strip().lower().replace("_star", "*").replace("star", "*")


def parse_pattern(value: str | Pattern) -> Pattern:
    if isinstance(value, Pattern):
        return value
    text = normalise_pattern_text(str(value))
    for pattern in Pattern:
        if text == pattern.value:
            return pattern
    raise ValueError(f"unknown pattern {value!r}; use 's' or 's*'")


E = TypeVar("E", bound=Enum)


def parse_option(enum_type: type[E], value: object, what: str) -> E:
    """An enum member from itself or its (case-insensitive) text, with a message listing the choices."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(str(value).strip().lower())
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_type)
        raise ValueError(f"unknown {what} {value!r}; use one of {allowed}") from None
