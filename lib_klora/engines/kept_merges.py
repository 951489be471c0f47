"""A1111: merged K-LoRA choices kept between jobs, as the built-in Lora keeps its own merged LoRAs.

Lora re-merges a layer only when the wanted networks (`network_current_names`) change. K-LoRA's slot names
are constant for one fusion, so what they do not say is which LoRA each denoiser layer holds merged: every
merge Lora makes asks the slots' `modules.get`, which records the answer on the layer. A new pass compares
that record with what its first step needs and marks only the differing layers for a re-merge; a job
with the same fusion as the last one re-merges nothing that is already right.

The merges stay after a job (no restore-then-re-merge per job). They are restored from Lora's own backups
when a job without K-LoRA starts, when the model is (re)loaded and when the extension is unloaded; an
interrupted or failing job restores at once. Host-free: only the Lora extension's module is passed in.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

MERGED = "klora_merged"  # attribute on a layer: (subject applied, style applied) at Lora's last merge
DIRTY = ("klora-dirty",)


def record_merge(module: torch.nn.Module, which: int, applied: bool) -> None:
    """Lora is merging `module` and asked slot `which`: remember whether that LoRA went in."""
    state = list(getattr(module, MERGED, None) or (None, None))
    state[which] = applied
    setattr(module, MERGED, (state[0], state[1]))


def merged_state(module: torch.nn.Module) -> tuple[bool | None, bool | None] | None:
    return getattr(module, MERGED, None)


def mark_dirty(module: torch.nn.Module) -> bool:
    """Make Lora re-merge `module` on its next forward; False when it holds no merge to redo.

    Only layers Lora holds a pristine backup for: marking a never-merged layer would make Lora raise."""
    if getattr(module, "network_weights_backup", None) is None:
        return False
    module.network_current_names = DIRTY
    return True


def restore_layers(nets: Any, modules: Iterable[torch.nn.Module]) -> int:
    """Put back the pristine weights of these layers from Lora's own backups; returns how many changed."""
    restored = 0
    with torch.no_grad():  # weights are leaf parameters: an in-place copy under autograd would raise
        for module in modules:
            if getattr(module, "network_current_names", ()) != ():
                if getattr(module, "network_weights_backup", None) is not None:
                    nets.network_restore_weights_from_backup(module)
                module.network_current_names = ()
                restored += 1
    return restored


class KeptLayers:
    """Every layer a K-LoRA job touched since the last release (weakly held: a dropped model goes)."""

    def __init__(self) -> None:
        self._modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def add(self, modules: Sequence[torch.nn.Module]) -> None:
        self._modules.update(modules)

    def __len__(self) -> int:
        return len(self._modules)

    def release(self, nets: Any) -> int:
        """Restore every kept layer still holding a merge. Never raises (runs in host callbacks): a layer
        that cannot be restored now (a model sent to the meta device) is left marked for Lora to restore."""
        modules, self._modules = list(self._modules), weakref.WeakSet()
        if nets is None:
            return 0
        restored = 0
        for module in modules:
            try:
                restored += restore_layers(nets, [module])
            except Exception:  # see docstring
                mark_dirty(module)
        return restored


kept_layers = KeptLayers()
