"""Host-free bookkeeping of a running fusion: which LoRA each layer uses now, and where sampling is.

Host adapters (A1111 slot networks, Forge hooks) ask `LayerSelection.enabled()` whether a LoRA applies
to a layer, and feed the sampler's own counters to `PassTracker` so progress is the real step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lib_klora.fusion.options import SUBJECT

if TYPE_CHECKING:
    from lib_klora.fusion.plan import StepSchedule
    from lib_klora.params.model import KLoraParams

TE_POLICIES = ("both", "subject", "style", "none")


@dataclass
class LayerSelection:
    """Current choice per managed (denoiser) layer, plus the fixed rules for every other layer.

    `current[i]` indexes the schedule's labels: 0 subject, 1 style, 2 both (merge baseline).
    """

    managed: Sequence[str]
    te_policy: str = "both"
    is_text_encoder: Callable[[str], bool] = lambda name: False
    lora_count: int = 2
    current: list[int] = field(default_factory=list)
    live: bool = True
    # Method "dynamic": forward hooks apply the denoiser layers' deltas, so no LoRA is merged there.
    denoiser_by_hooks: bool = False
    # Layers whose choice changes within the pass, served by forward hooks (A1111 hybrid) -> the LoRA
    # their weight holds merged meanwhile (None: plain weight).
    hooked: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.te_policy not in TE_POLICIES:
            raise ValueError(f"unknown text-encoder policy {self.te_policy!r}")
        self.index = {name: i for i, name in enumerate(self.managed)}
        if not self.current:
            self.current = [SUBJECT] * len(self.managed)

    def enabled(self, which: int, layer: str) -> bool:
        """Does LoRA `which` apply to `layer` right now? (Only asked for layers that LoRA adapts.)"""
        if not self.live:
            return False
        if layer in self.hooked:
            return self.hooked[layer] == which
        if self.denoiser_by_hooks and not self.is_text_encoder(layer):
            return False
        i = self.index.get(layer)
        if i is not None:
            choice = self.current[i]
            return choice == which or choice == self.lora_count  # lora_count == "all of them" (merge)
        if self.is_text_encoder(layer):
            policy = self.te_policy
            return (
                policy == "both" or (policy == "subject" and which == 0) or (policy == "style" and which == 1)
            )
        return True  # a denoiser layer only this LoRA adapts: always on, at its strength

    def apply(self, choices: Sequence[int]) -> list[int]:
        """Switch to `choices` (one per managed layer); returns the indices of layers that changed."""
        changed = [i for i, (old, new) in enumerate(zip(self.current, choices, strict=True)) if old != new]
        for i in changed:
            self.current[i] = int(choices[i])
        return changed


@dataclass
class PassTracker:
    """Turns the denoiser's evaluation counter into the sampler step of the current pass.

    A new pass (first pass, hires, img2img) is a new denoiser object or an evaluation counter back at 0.
    Second-order samplers evaluate the model twice per step, so their counter runs at 2x the steps.
    """

    pass_key: object = None
    pass_index: int = -1
    steps: int = 0
    step: int = -1

    def update(
        self, pass_key: object, evaluation: int, total_evaluations: int, evals_per_step: int = 1
    ) -> bool:
        """Record an evaluation; True when it starts a new pass."""
        evals_per_step = max(1, evals_per_step)
        new_pass = pass_key is not self.pass_key or evaluation == 0
        if new_pass:
            self.pass_key = pass_key
            self.pass_index += 1
            self.steps = max(1, total_evaluations // evals_per_step)
            self.step = -1
        self.step = min(evaluation // evals_per_step, self.steps - 1)
        return new_pass

    @property
    def progress(self) -> float:
        return self.step / self.steps if self.steps else 0.0


@dataclass
class PassRecord:
    """What one sampling pass used, for its selection map: a precomputed schedule, or the decisions the
    `dynamic` selector recorded under this pass's label."""

    label: str
    params: KLoraParams
    schedule: StepSchedule | None = None
    dynamic: Any = None  # the DynamicSelector of a "dynamic" pass

    def choices(self) -> tuple[list[list[int]], tuple[str, ...]]:
        """choices [layer][step] and their labels."""
        if self.schedule is not None:
            return self.schedule.choices.tolist(), tuple(self.schedule.labels)
        return self.dynamic.table(self.label).tolist(), tuple(self.dynamic.labels)
