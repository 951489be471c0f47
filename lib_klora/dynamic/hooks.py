"""Per-instance forward hooks that add the chosen LoRA delta to a layer's output."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lib_klora.dynamic.branches import Branch
from lib_klora.dynamic.kl import subsample_tokens
from lib_klora.dynamic.selectors import BOTH, DynamicSelector, FusionSelector
from lib_klora.fusion.options import SUBJECT

log = logging.getLogger(__name__)

SYNC_FREE_DEVICES = ("cpu",)  # device types where reading a choice on the host costs no sync


# ---------------------------------------------------------------- hooks


class HookSet:
    """The forward hooks of one fusion run. `remove()` (idempotent) or use it as a context manager.

    A hook that raises does not break the host's forward: the first failure is logged and kept in
    `.error` (with the layer in `.failed_layer`), every hook of the set is removed and, until then, returns
    None, so the host continues with its own output (base plus whatever else it applies) from that point on.
    """

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.error: Exception | None = None
        self.failed_layer: str | None = None
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    def __len__(self) -> int:
        return len(self.handles)

    def remove(self) -> None:
        self._active = False
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _fail(self, layer: str, exc: Exception) -> None:
        if self.error is None:
            self.error, self.failed_layer = exc, layer
            log.warning("dynamic fusion disabled: hook on %s failed", layer, exc_info=exc)
        self.remove()


def _hook_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor):
        raise TypeError(f"expected the module's input tensor, got {type(x).__name__}")
    return x


def install_hooks(
    modules: Mapping[str, nn.Module],
    branches: Mapping[str, tuple[Branch | None, Branch | None]],
    selector: DynamicSelector | FusionSelector,
    layer_index: Mapping[str, int],
    is_live: Callable[[], bool],
    *,
    in_place: bool = False,
    merged: Mapping[str, int] | None = None,
) -> HookSet:
    """Hook every module that has a branch: out + the chosen delta (or + the only delta it has).

    `branches[name]` is (subject, style); a module with one branch gets it unconditionally, one with none
    is not hooked. Modules with both need a `layer_index` (their row in the selector's table). While
    `is_live()` is false the hooks return None and the output is left alone.

    `in_place`: add the chosen delta into the module's output tensor instead of returning a new one (one
    in-place GEMM for linear layers, no output-sized temporary: the cheapest way to apply a LoRA on the
    activation side). Only for hosts whose layer outputs are fresh tensors no one else holds, as plain
    Linear/Conv2d forwards under no_grad are; never while autograd records.

    `merged`: layers whose weight already holds one choice's LoRA (name -> that choice, static passes
    only): when the schedule picks it, the output is left alone; the other choice's branch is then the
    difference of the two deltas.
    """
    checked: list[tuple[str, nn.Module, Branch | None, Branch | None, int | None]] = []
    for name, (subject, style) in branches.items():
        if subject is None and style is None:
            continue
        if name not in modules:
            raise KeyError(f"no module given for layer {name!r}")
        index = None
        if subject is not None and style is not None:
            if subject.is_conv != style.is_conv:
                raise ValueError(f"layer {name!r}: one branch is a conv, the other linear")
            if name not in layer_index:
                raise KeyError(f"layer {name!r} is adapted by both LoRAs but has no layer index")
            index = int(layer_index[name])
            if not 0 <= index < selector.layer_count:
                raise IndexError(f"layer {name!r}: index {index} outside 0..{selector.layer_count - 1}")
        checked.append((name, modules[name], subject, style, index))

    hooks = HookSet()
    for name, module, subject, style, index in checked:
        held = (merged or {}).get(name)
        hook = _make_hook(hooks, name, subject, style, index, selector, is_live, in_place, held)
        hooks.handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return hooks


def _make_hook(
    hooks: HookSet,
    name: str,
    subject: Branch | None,
    style: Branch | None,
    index: int | None,
    selector: DynamicSelector | FusionSelector,
    is_live: Callable[[], bool],
    in_place: bool = False,
    held: int | None = None,
) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Tensor | None]:
    def add(branch: Branch, x: Tensor, out: Tensor) -> Tensor:
        if in_place:
            return branch.add_into(out, x)
        return branch.delta(x, out.dtype).add_(out)  # delta is a fresh tensor: add in place, one alloc

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Tensor | None:
        if not hooks.active or not is_live():
            return None
        try:
            return _apply(_hook_input(args, kwargs), out)
        except Exception as exc:  # our failure must not kill the host's sampling; see HookSet
            hooks._fail(name, exc)
            return None

    def _apply(x: Tensor, out: Tensor) -> Tensor:
        if subject is None or style is None:
            only = subject if style is None else style
            assert only is not None
            return add(only, x, out)
        assert index is not None
        known = selector.lookup(index)
        if held is not None and known == held:  # the weight holds this choice's LoRA merged
            return out
        if known == BOTH:  # the merge baseline: both deltas
            return add(style, x, add(subject, x, out))
        if known is not None:  # a later call of this step, or a schedule: only the chosen delta is needed
            return add(subject if known == SUBJECT else style, x, out)
        channel_dim = 1 if subject.is_conv else -1
        if out.device.type in SYNC_FREE_DEVICES and not selector.per_sample:
            return _decide_on_host(x, out, channel_dim)
        d_subject = subject.delta(x, out.dtype)
        d_style = style.delta(x, out.dtype)
        choice = selector.decide(index, out, d_subject, d_style, channel_dim)
        # Select on the device (no host sync per layer): a 0-dim mask broadcasts, a per-row mask is
        # shaped (B, 1, ...).
        mask = choice.bool()
        if mask.ndim == 1:
            mask = mask.reshape(mask.shape[0], *([1] * (out.ndim - 1)))
        return torch.where(mask, d_style, d_subject).add_(out)

    def _decide_on_host(x: Tensor, out: Tensor, channel_dim: int) -> Tensor:
        # On the CPU reading the choice costs nothing, and a broadcast torch.where is slow there. A linear
        # layer's tokens line up between input and output, so both deltas are needed only on the token
        # subsample; then just the chosen one is computed in full.
        xs, outs = x, out
        if selector.max_tokens is not None and channel_dim == -1 and x.shape[:-1] == out.shape[:-1]:
            xs = subsample_tokens(x, -1, selector.max_tokens)
            outs = subsample_tokens(out, -1, selector.max_tokens)
        assert subject is not None and style is not None and index is not None
        d_subject, d_style = subject.delta(xs, out.dtype), style.delta(xs, out.dtype)
        choice = int(selector.decide(index, outs, d_subject, d_style, channel_dim))
        if xs is x:
            return (d_subject if choice == SUBJECT else d_style).add_(out)
        return add(subject if choice == SUBJECT else style, x, out)

    return hook
