"""Fusion plans: which LoRA each shared layer uses at each sampling step.

The rule is written for any number of LoRAs as an argmax of scaled scores: LoRA 0 (the subject) is
weighted 1, every other LoRA i by γ_i · S(r). With two LoRAs this is exactly K-LoRA's
"subject iff S_subject ≥ γ · S(r) · S_style" (ties go to the subject, as in the paper).
Everything per step is precomputed, so the sampler pays a table lookup.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import torch

from lib_klora.fusion.options import (
    STYLE,
    SUBJECT,
    GammaVariant,
    Method,
    Pattern,
    parse_option,
    parse_pattern,
)
from lib_klora.fusion.schedule import DEFAULT_ALPHA, default_beta, time_scales
from lib_klora.fusion.scores import ScoreTable

RANDOM_SUBJECT_PROBABILITY = 1 / 3
_OUTLIER_FACTOR = 3.0


@dataclass(frozen=True)
class PlanSettings:
    method: Method = Method.KLORA
    pattern: Pattern = Pattern.S
    alpha: float = DEFAULT_ALPHA
    beta: float | None = None  # None: the pattern's default (0.5 for S, 1.3 for S*)
    gamma: GammaVariant = GammaVariant.OFFICIAL
    strengths: tuple[float, ...] = (1.0, 1.0)
    seed: int = 0  # only the random baseline uses it

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_option(Method, self.method, "method"))
        if not self.method.precomputed:
            raise ValueError(
                f"method {self.method.value!r} decides during sampling: it has no precomputed plan"
            )
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "gamma", parse_option(GammaVariant, self.gamma, "gamma variant"))
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))
        # Resolve "the pattern's default" now, so equal schedules compare (and hash) equal.
        object.__setattr__(
            self, "beta", default_beta(self.pattern) if self.beta is None else float(self.beta)
        )
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.pattern is Pattern.S_STAR and self.alpha <= 0:
            raise ValueError("alpha must be > 0 with pattern s* (it is also the modulus)")
        if any(not math.isfinite(s) for s in self.strengths):
            raise ValueError(f"strengths must be finite numbers, got {self.strengths}")

    @property
    def resolved_beta(self) -> float:
        return float(self.beta)  # type: ignore[arg-type]  # never None after __post_init__


def balance_factors(table: ScoreTable, strengths: tuple[float, ...], variant: GammaVariant) -> list[float]:
    """γ_i that balances LoRA i's overall magnitude against LoRA 0 (γ_0 = 1)."""
    gammas = [1.0]
    for i in range(1, table.lora_count):
        ref = [layer.l1[0] * abs(strengths[0]) for layer in table.layers]
        other = [layer.l1[i] * abs(strengths[i]) for layer in table.layers]
        if variant is GammaVariant.PAPER:
            gamma = sum(ref) / sum(other) if sum(other) > 0 else 1.0
        else:
            ratios = [a / b for a, b in zip(ref, other, strict=True) if a > 0 and b > 0]
            if not ratios:
                gamma = 1.0
            else:
                mean = sum(ratios) / len(ratios)
                kept = [r for r in ratios if r < _OUTLIER_FACTOR * mean]
                gamma = sum(kept) / len(kept) if kept else mean
        gammas.append(gamma)
    return gammas


@dataclass(frozen=True)
class StepSchedule:
    """Choices for one sampling pass: `choices[layer, step]` indexes `labels`."""

    steps: int
    labels: tuple[str, ...]
    choices: torch.Tensor  # uint8 [layers, steps]
    changes: tuple[tuple[int, ...], ...] = field(repr=False)  # per step: layers whose choice differs

    def at(self, step: int) -> torch.Tensor:
        return self.choices[:, min(max(step, 0), self.steps - 1)]

    def changed(self, step: int) -> tuple[int, ...]:
        """Layers to re-apply at `step`: all of them at step 0, then only those that switch."""
        return self.changes[min(max(step, 0), self.steps - 1)]

    def switch_steps(self, layer: int) -> list[int]:
        """Steps at which `layer` changes LoRA (for logs and the selection map caption)."""
        row = self.choices[layer]
        return (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()


def _changes(choices: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    steps = choices.shape[1]
    out = [tuple(range(choices.shape[0]))]
    if steps > 1:
        diff = choices[:, 1:] != choices[:, :-1]
        out += [tuple(torch.nonzero(diff[:, s]).flatten().tolist()) for s in range(steps - 1)]
    return tuple(out)


class FusionPlan:
    """Scores of a LoRA set plus settings; hands out per-pass step schedules."""

    def __init__(self, table: ScoreTable, settings: PlanSettings | None = None) -> None:
        settings = settings or PlanSettings()
        if len(settings.strengths) != table.lora_count:
            settings = replace(
                settings, strengths=(settings.strengths + (1.0,) * table.lora_count)[: table.lora_count]
            )
        self.table = table
        self.settings = settings
        self.gammas = balance_factors(table, settings.strengths, settings.gamma)
        self._schedules: dict[int, StepSchedule] = {}

    @property
    def gamma(self) -> float:
        return self.gammas[STYLE]

    @property
    def labels(self) -> tuple[str, ...]:
        base = (
            ("subject", "style")
            if self.table.lora_count == 2
            else tuple(f"lora{i}" for i in range(self.table.lora_count))
        )
        return (*base, "both" if self.table.lora_count == 2 else "all")

    def title(self) -> str:
        """One line naming the method and its settings, for selection maps."""
        s = self.settings
        return (
            f"{s.method.value}  pattern {s.pattern.value}  alpha {s.alpha:g}  beta {s.resolved_beta:g}  "
            f"gamma {self.gamma:.4g} ({s.gamma.value})"
        )

    def summary(self, steps: int) -> str:
        """A few lines for a terminal: shared layers, γ, the subject's share and how many layers switch."""
        schedule = self.schedule(steps)
        subject_share = float((schedule.choices == 0).float().mean()) if schedule.choices.numel() else 0.0
        switching = sum(1 for i in range(len(self.table.layers)) if schedule.switch_steps(i))
        only = self.table.exclusive
        return "\n".join(
            [
                f"layers in both LoRAs: {len(self.table.layers)}   subject only: {len(only[0])}   "
                f"style only: {len(only[1])}",
                f"gamma ({self.settings.gamma.value}): {self.gamma:.6g}",
                f"subject share over {steps} steps: {subject_share:.1%}   layers that switch: {switching}",
            ]
        )

    @property
    def layer_names(self) -> list[str]:
        """Each shared layer's key stem as written in the subject file."""
        return [layer.names[SUBJECT] for layer in self.table.layers]

    def thresholds(self) -> list[float]:
        """τ_l = S_subject / (γ · S_style): the layer keeps the subject while S(r) ≤ τ_l (two LoRAs)."""
        s = self.settings.strengths
        out = []
        for layer in self.table.layers:
            style = self.gamma * layer.scores[STYLE] * abs(s[STYLE])
            subject = layer.scores[SUBJECT] * abs(s[SUBJECT])
            out.append(math.inf if style == 0 else subject / style)
        return out

    def schedule(self, steps: int) -> StepSchedule:
        if steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        if steps not in self._schedules:
            choices = self._choices(steps)
            self._schedules[steps] = StepSchedule(steps, self.labels, choices, _changes(choices))
        return self._schedules[steps]

    def _choices(self, steps: int) -> torch.Tensor:
        n_layers, n_loras = len(self.table.layers), self.table.lora_count
        method = self.settings.method
        if method is Method.MERGE:
            return torch.full((n_layers, steps), n_loras, dtype=torch.uint8)
        if method is Method.RANDOM:
            return self._random_choices(steps)
        scale = torch.tensor(
            time_scales(steps, self.settings.pattern, self.settings.alpha, self.settings.resolved_beta),
            dtype=torch.float64,
        )
        if method is Method.FIXED:  # equal scores and γ = 1: the switch depends on time alone
            scores = torch.ones(n_layers, n_loras, dtype=torch.float64)
            gammas = torch.ones(n_loras, dtype=torch.float64)
        else:
            scores = torch.tensor([layer.scores for layer in self.table.layers], dtype=torch.float64)
            scores = scores * torch.tensor([abs(s) for s in self.settings.strengths], dtype=torch.float64)
            gammas = torch.tensor(self.gammas, dtype=torch.float64)
        multipliers = gammas[:, None] * scale[None, :]  # [loras, steps]
        multipliers[SUBJECT] = 1.0
        values = scores[:, :, None] * multipliers[None, :, :]  # [layers, loras, steps]
        # argmax picks the first maximum, so exact ties go to the subject.
        return values.argmax(dim=1).to(torch.uint8)

    def _random_choices(self, steps: int) -> torch.Tensor:
        # One draw per layer from a generator seeded by (seed, layer): stable when other layers change.
        picks = [
            SUBJECT
            if random.Random(f"{self.settings.seed}:{layer.canonical}").random() < RANDOM_SUBJECT_PROBABILITY
            else STYLE
            for layer in self.table.layers
        ]
        return torch.tensor(picks, dtype=torch.uint8)[:, None].expand(-1, steps).contiguous()

    def to_json(self, steps: int) -> dict:
        """The plan contract of the CLI and the WebUI route."""
        schedule = self.schedule(steps)
        labels = schedule.labels
        rows = schedule.choices.tolist()
        s = self.settings.strengths
        return {
            "steps": steps,
            "gamma": self.gamma,
            "alpha": self.settings.alpha,
            "beta": self.settings.resolved_beta,
            "pattern": self.settings.pattern.value,
            "method": self.settings.method.value,
            "gamma_variant": self.settings.gamma.value,
            "layers": [
                {
                    "name": layer.names[SUBJECT],
                    "k": layer.k,
                    "score_subject": layer.scores[SUBJECT] * abs(s[SUBJECT]),
                    "score_style": layer.scores[STYLE] * abs(s[STYLE]),
                    "choices": [labels[c] for c in row],
                }
                for layer, row in zip(self.table.layers, rows, strict=True)
            ],
        }
