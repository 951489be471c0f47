"""Which LoRA each hooked layer applies now: a precomputed schedule or the live `dynamic` choice."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any, Literal

import torch
from torch import Tensor

from lib_klora.dynamic.kl import (
    DEFAULT_MAX_TOKENS,
    LABELS,
    Choice,
    Direction,
    check_direction,
    check_temperature,
    choose,
    kl_divergences,
    subsample_tokens,
)
from lib_klora.fusion.options import Pattern, parse_pattern
from lib_klora.fusion.schedule import DEFAULT_ALPHA, progress_at, time_scale

log = logging.getLogger(__name__)

BOTH = 2  # a schedule's "both" choice (the merge baseline)


class FusionSelector:
    """Serves hooks that apply every method on the activation side (Forge, reForge): per pass, either a
    precomputed schedule (K-LoRA and the baselines; `lookup` reads it) or the `dynamic` selector.
    """

    def __init__(self, layer_count: int, dynamic: DynamicSelector | None = None) -> None:
        self.layer_count = int(layer_count)
        self.dynamic = dynamic
        self._choices: Tensor | None = None  # uint8 [layers, steps] of a static pass
        self._column: list[int] = []
        self._step = 0
        self.mode: Literal["static", "dynamic", "off"] = "off"

    @property
    def per_sample(self) -> bool:
        return self.mode == "dynamic" and self.dynamic is not None and self.dynamic.per_sample

    @property
    def max_tokens(self) -> int | None:
        return self.dynamic.max_tokens if self.dynamic is not None else DEFAULT_MAX_TOKENS

    def begin_static_pass(self, choices: Tensor) -> None:
        if choices.shape[0] != self.layer_count:
            raise ValueError(f"schedule has {choices.shape[0]} layers, the hooks {self.layer_count}")
        self.mode, self._choices, self._step = "static", choices.to("cpu", torch.uint8), -1
        self.set_step(0)

    def begin_dynamic_pass(self, pass_key: Hashable, steps: int) -> None:
        if self.dynamic is None:
            raise ValueError("this job has no dynamic selector")
        self.mode = "dynamic"
        self.dynamic.begin_pass(pass_key, steps)

    def set_step(self, step: int) -> None:
        if self.mode == "dynamic":
            assert self.dynamic is not None
            self.dynamic.set_step(step)
        elif self.mode == "static" and step != self._step:
            assert self._choices is not None
            self._step = step
            column = min(max(step, 0), self._choices.shape[1] - 1)
            self._column = self._choices[:, column].tolist()

    def lookup(self, layer_index: int) -> int | None:
        if self.mode == "static":
            return self._column[layer_index]
        assert self.dynamic is not None
        return self.dynamic.lookup(layer_index)

    def decide(
        self, layer_index: int, base_out: Tensor, delta_subject: Tensor, delta_style: Tensor, channel_dim: int
    ) -> Tensor:
        assert self.dynamic is not None and self.mode == "dynamic"
        return self.dynamic.decide(layer_index, base_out, delta_subject, delta_style, channel_dim)


class DynamicSelector:
    """Makes and remembers the `dynamic` choices: one per (pass, step, layer), shared by the step's calls.

    Hosts call `begin_pass(key, steps)` at the start of every sampling pass (first pass, hires, img2img) and
    `set_step(step)` before each step's UNet calls. The first call of a step decides (`decide`), later calls
    of the same step reuse it (`lookup`). Decisions are recorded in a uint8 [layers × steps] table per pass
    (`table`), labelled `LABELS`, which `selection_map.render_selection_map` draws directly.

    Options: `temperature`, `direction` (see `kl_divergences`); `per_sample` decides per batch row on every
    call (the table keeps the majority of the first call's rows); `hybrid` multiplies the style divergence
    by K-LoRA's S(r) with `pattern`/`alpha`/`beta`; `max_tokens` estimates the mean divergence on at most
    that many tokens per sample (None: all; see the module docstring for the default).

    On accelerators the decisions stay on the device (no host sync per layer) and the table is filled in
    one transfer per step; on the CPU, where reading them is free, the hooks use them directly. Without
    `begin_pass`, `decide` still works but nothing is cached or recorded.
    """

    labels = LABELS

    def __init__(
        self,
        layer_count: int,
        *,
        temperature: float = 1.0,
        direction: Direction = "forward",
        per_sample: bool = False,
        hybrid: bool = False,
        pattern: str | Pattern = Pattern.S,
        alpha: float = DEFAULT_ALPHA,
        beta: float | None = None,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
    ) -> None:
        if layer_count < 0:
            raise ValueError(f"layer_count must be >= 0, got {layer_count}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.layer_count = int(layer_count)
        self.temperature = check_temperature(temperature)
        self.direction = check_direction(direction)
        self.per_sample = bool(per_sample)
        self.hybrid = bool(hybrid)
        self.pattern = parse_pattern(pattern)
        self.alpha = float(alpha)
        self.beta = beta
        self.max_tokens = max_tokens
        if self.hybrid:  # reject a bad pattern/alpha now rather than in the middle of sampling
            time_scale(0.0, self.pattern, self.alpha, self.beta)
        self._tables: dict[Hashable, Tensor] = {}
        self._decided: dict[Hashable, Tensor] = {}
        self._pass_key: Hashable | None = None
        self._steps = 0
        self._step = 0
        self._current: dict[int, Choice] = {}  # this step's decisions, by layer
        self._pending: list[tuple[int, int, Tensor]] = []  # (layer, column, 0-dim choice) for the table

    @classmethod
    def for_params(cls, layer_count: int, params: Any) -> DynamicSelector:
        """The selector a KLoraParams' KL options describe (hybrid mode uses its pattern, alpha and beta)."""
        return cls(
            layer_count,
            temperature=params.kl_temperature,
            direction=params.kl_direction,
            per_sample=params.kl_per_sample,
            hybrid=params.kl_hybrid,
            pattern=params.pattern,
            alpha=params.alpha,
            beta=params.beta,
        )

    # -- progress

    @property
    def pass_key(self) -> Hashable | None:
        return self._pass_key

    @property
    def step(self) -> int:
        return self._step

    @property
    def steps(self) -> int:
        return self._steps

    def begin_pass(self, pass_key: Hashable, steps: int) -> None:
        """Start a pass of `steps` steps at step 0. A key seen before starts its table over."""
        if steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        self._flush()
        self._pass_key = pass_key
        self._steps = int(steps)
        self._step = 0
        self._current.clear()
        # Ordinary tensors even when sampling runs under inference_mode (Forge): the host reads the records
        # after sampling, outside it, where an inference tensor could not be written to any more.
        with torch.inference_mode(False):
            self._tables[pass_key] = torch.zeros((self.layer_count, self._steps), dtype=torch.uint8)
            self._decided[pass_key] = torch.zeros((self.layer_count, self._steps), dtype=torch.bool)

    def set_step(self, step: int) -> None:
        """Move to `step` (0-based); a new step forgets the previous step's decisions."""
        step = int(step)
        if step != self._step:
            self._flush()
            self._current.clear()
            self._step = step

    def style_scale(self) -> float:
        """The factor on the style divergence: S(r) in hybrid mode, else 1."""
        if not self.hybrid or self._steps == 0:
            return 1.0
        return time_scale(progress_at(self._column(), self._steps), self.pattern, self.alpha, self.beta)

    def _column(self) -> int:
        return min(max(self._step, 0), self._steps - 1)

    # -- decisions

    def lookup(self, layer_index: int) -> int | None:
        """The choice already made for `layer_index` in this step, or None (per-sample mode: always None)."""
        if self.per_sample:
            return None
        choice = self._current.get(layer_index)
        if isinstance(choice, Tensor):  # a later call of the step: one sync, then a plain int
            choice = self._current[layer_index] = int(choice)
        return choice

    def decide(
        self, layer_index: int, base_out: Tensor, delta_subject: Tensor, delta_style: Tensor, channel_dim: int
    ) -> Tensor:
        """Decide for `layer_index` from this call's base output and deltas; cache and record the choice.

        Returns a uint8 tensor on the outputs' device: 0-dim, or one value per batch row in per-sample mode.
        """
        if not 0 <= layer_index < self.layer_count:
            raise IndexError(f"layer index {layer_index} outside 0..{self.layer_count - 1}")
        tensors = (base_out, delta_subject, delta_style)
        if self.max_tokens is not None:
            tensors = tuple(subsample_tokens(t, channel_dim, self.max_tokens) for t in tensors)
        div_subject, div_style = kl_divergences(
            *tensors,
            channel_dim=channel_dim,
            temperature=self.temperature,
            direction=self.direction,
            per_sample=self.per_sample,
        )
        choice = choose(div_subject, div_style, style_scale=self.style_scale())
        assert isinstance(choice, Tensor)
        if self._pass_key is not None and layer_index not in self._current:  # the step's first decision
            self._current[layer_index] = choice
            # Per-sample mode still decides on every call; its table cell is the first call's majority.
            record = (choice.float().mean() > 0.5).to(torch.uint8) if self.per_sample else choice
            self._pending.append((layer_index, self._column(), record))
        return choice

    def _flush(self) -> None:
        if not self._pending or self._pass_key is None:
            self._pending.clear()
            return
        table, decided = self._tables[self._pass_key], self._decided[self._pass_key]
        by_device: dict[torch.device, list[tuple[int, int, Tensor]]] = {}
        for item in self._pending:
            by_device.setdefault(item[2].device, []).append(item)
        with torch.inference_mode(False):
            for items in by_device.values():
                values = torch.stack([c.reshape(()) for _, _, c in items]).to(
                    "cpu", torch.uint8
                )  # one transfer
                rows = torch.tensor([layer for layer, _, _ in items])
                cols = torch.tensor([col for _, col, _ in items])
                table[rows, cols] = values
                decided[rows, cols] = True
        self._pending.clear()

    # -- records

    def passes(self) -> list[Hashable]:
        return list(self._tables)

    def table(self, pass_key: Hashable) -> Tensor:
        """uint8 [layers × steps] choices of a pass (0 subject, 1 style); undecided cells read 0."""
        if pass_key == self._pass_key:
            self._flush()
        return self._tables[pass_key]

    def decided(self, pass_key: Hashable) -> Tensor:
        """bool [layers × steps]: which cells of `table(pass_key)` hold a decision."""
        if pass_key == self._pass_key:
            self._flush()
        return self._decided[pass_key]


def dynamic_title(params: Any) -> str:
    """One line naming method `dynamic` and its options, for selection maps (params: KLoraParams)."""
    options = [f"KL {params.kl_direction}", f"T={params.kl_temperature:g}"]
    if params.kl_per_sample:
        options.append("per image")
    if params.kl_hybrid:
        options.append(f"hybrid {params.pattern}")
    return f"dynamic ({', '.join(options)})"
