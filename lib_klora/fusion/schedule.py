"""Time scales S and S* of K-LoRA, as functions of sampling progress r = step / steps (step 0-based)."""

from __future__ import annotations

from lib_klora.fusion.options import Pattern, parse_pattern

DEFAULT_ALPHA = 1.5
DEFAULT_BETA = {Pattern.S: 0.5, Pattern.S_STAR: 1.3}  # β' = 1.3 as in the paper's supplement
OFFICIAL_CODE_STAR_BETA = 1.275  # the official scripts' s* constant; wraps at r = 0.15
_ROUND_DIGITS = 12  # kills float noise so 1.5·0.15 + 1.275 wraps to 0, as exact arithmetic does


def default_beta(pattern: str | Pattern) -> float:
    return DEFAULT_BETA[parse_pattern(pattern)]


def progress_at(step: int, steps: int) -> float:
    """r for a 0-based step of a pass with `steps` steps: 0 at pure noise, (steps-1)/steps at the end."""
    if steps <= 0:
        raise ValueError("steps must be positive")
    return step / steps


def time_scale(
    progress: float,
    pattern: str | Pattern = Pattern.S,
    alpha: float = DEFAULT_ALPHA,
    beta: float | None = None,
) -> float:
    """S(r) or S*(r). For S*, the slope α also serves as the modulus (the official code's reading)."""
    pattern = parse_pattern(pattern)
    if beta is None:
        beta = DEFAULT_BETA[pattern]
    value = round(alpha * progress + beta, _ROUND_DIGITS)
    if pattern is Pattern.S_STAR:
        if alpha <= 0:
            raise ValueError("S* needs alpha > 0 (it is also the modulus)")
        value = round(value % alpha, _ROUND_DIGITS)
    return value


def time_scales(
    steps: int, pattern: str | Pattern = Pattern.S, alpha: float = DEFAULT_ALPHA, beta: float | None = None
) -> list[float]:
    return [time_scale(progress_at(step, steps), pattern, alpha, beta) for step in range(steps)]
