"""Static schedules written into the weights: W = W0 + ΔW(choice), rewritten when a layer's choice changes.

The alternative to the activation-side hooks for K-LoRA and the baselines (`ModuleFusion(...,
apply_to="weights")`): a step then costs exactly what the base model costs, at the price of a copy of every
adapted weight (kept on `backup_device`, the CPU by default, so an accelerator holds nothing extra) and a
dense up @ down per layer at each of its switch steps (once per layer with pattern S). Restoring copies
the kept W0 back, bit for bit. `dynamic` decides from the activations, so it cannot use this path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lib_klora.dynamic.branches import LowRankBranch
from lib_klora.dynamic.selectors import BOTH
from lib_klora.engines.module_targets import Target


@dataclass
class _Layer:
    """One selection row's (or one single-LoRA layer's) deltas on one module."""

    row: int | None
    parts: tuple[list[tuple[LowRankBranch, Target]], list[tuple[LowRankBranch, Target]]]


@dataclass
class _Module:
    module: nn.Module
    layers: list[_Layer] = field(default_factory=list)
    backup: torch.Tensor | None = None


def _dense(branch: LowRankBranch, target: Target, weight: torch.Tensor) -> torch.Tensor:
    if branch.conv is not None and branch.conv.groups != 1:
        raise ValueError(f"{target.name}: grouped convolutions are applied on the activation side only")
    up, down = branch.factors_on(weight.device)
    delta = (up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)) * branch.scale
    return delta.reshape(target.size, *weight.shape[1:])


class WeightSwitch:
    """Writes each module's weight as W0 + the chosen deltas; `restore()` puts W0 back exactly."""

    def __init__(self, backup_device: torch.device | str = "cpu") -> None:
        self.backup_device = torch.device(backup_device)
        self._modules: dict[int, _Module] = {}
        self._current: dict[int, int] = {}  # row -> choice written now
        self._written = False

    def add(
        self,
        module: nn.Module,
        row: int | None,
        parts: tuple[list[tuple[LowRankBranch, Target]], list[tuple[LowRankBranch, Target]]],
    ) -> None:
        entry = self._modules.setdefault(id(module), _Module(module))
        entry.layers.append(_Layer(row, parts))

    def __len__(self) -> int:
        return len(self._modules)

    def apply(self, column: Sequence[int]) -> None:
        """Write the choices `column[row]` (0 subject, 1 style, 2 both) of modules whose rows changed."""
        changed = {row for row, choice in enumerate(column) if self._current.get(row) != int(choice)}
        for entry in self._modules.values():
            rows = {layer.row for layer in entry.layers}
            if self._written and not (rows & changed):
                continue
            self._write(entry, column)
        self._current = {row: int(choice) for row, choice in enumerate(column)}
        self._written = True

    def _write(self, entry: _Module, column: Sequence[int]) -> None:
        weight = entry.module.weight
        with torch.no_grad():
            if entry.backup is None:
                entry.backup = weight.detach().to(self.backup_device, copy=True)
            merged = entry.backup.to(weight.device, torch.float32, copy=True)
            for layer in entry.layers:
                choice = BOTH if layer.row is None else int(column[layer.row])
                for which in _loras(choice):
                    for branch, target in layer.parts[which]:
                        merged[target.start : target.start + target.size] += _dense(branch, target, weight)
            weight.copy_(merged.to(weight.dtype))

    def restore(self) -> None:
        """Every written weight back to its kept original, bit for bit (idempotent)."""
        with torch.no_grad():
            for entry in self._modules.values():
                if entry.backup is not None:
                    entry.module.weight.copy_(entry.backup)
                    entry.backup = None
        self._current.clear()
        self._written = False


def _loras(choice: int) -> Iterable[int]:
    return (0, 1) if choice == BOTH else (choice,)
