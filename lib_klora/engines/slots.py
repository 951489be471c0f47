"""AUTOMATIC1111 v1.10: K-LoRA through "slot networks" in the built-in Lora extension.

The built-in Lora stays the only writer of layer weights: two slot networks (subject, style) sit in
`networks.loaded_networks`; their `.modules.get()` answers with the currently chosen LoRA module, and a
layer whose choice flips is marked dirty so Lora re-merges exactly that layer from its own backup. Merges
stay between jobs as Lora's own do (see `kept_merges`): a repeated job re-merges only what it changes.

Layers whose choice changes within a pass can instead be served on the activation side by a forward hook
(`switch_on_activations`, the "hybrid"; plain LoRA/LoCon layers only, others keep merging at the switch):
each such layer keeps one state for the whole pass — plain, or one LoRA merged (`held_lora`) — and the
hook adds what the step's choice needs on top (the chosen delta, or the difference of the two). Then no
weight is rewritten at a switch, and an identical next job rewrites none at all.
This module touches only the Lora extension's modules (found by identity in sys.modules) and plain
attributes of the processing object; the WebUI's `modules` are imported by `a1111.py`, not here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib_klora.dynamic.branches import LowRankBranch, SumBranch
from lib_klora.dynamic.hooks import Branch, HookSet, install_hooks
from lib_klora.dynamic.selectors import DynamicSelector, FusionSelector
from lib_klora.engines.job import FusionJob, JobError, on_sampling_failure, resolve_lora
from lib_klora.engines.kept_merges import (
    kept_layers,
    mark_dirty,
    merged_state,
    record_merge,
    restore_layers,
)
from lib_klora.engines.network_modules import HostDelta, branch_for, cached_low_rank_branch
from lib_klora.engines.tracking import LayerSelection, PassRecord
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.options import STYLE, SUBJECT, Method
from lib_klora.fusion.plan import StepSchedule
from lib_klora.fusion.scores import compute_scores
from lib_klora.loras.oft import BaseWeights
from lib_klora.params.model import KLoraParams

UNET_PREFIX = "diffusion_model_"


def lora_extension() -> Any:
    """The built-in Lora extension's `networks` module, identity-checked (the name is generic)."""
    module = sys.modules.get("networks")
    if (
        module is not None
        and hasattr(module, "network_apply_weights")
        and hasattr(module, "available_networks")
    ):
        return module
    return None


def is_text_encoder_layer(name: str) -> bool:
    return not name.startswith(UNET_PREFIX)


class NetworkCache:
    """Privately loaded `network.Network` objects, keyed by file, mtime and model identity."""

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._nets: dict[tuple[str, float, int], Any] = {}

    def load(self, nets: Any, name: str, model: Any) -> Any:
        on_disk = resolve_lora(nets, name)
        key = (on_disk.filename, os.path.getmtime(on_disk.filename), id(model))
        net = self._nets.pop(key, None)
        if net is None:
            net = nets.load_network(name, on_disk)
        self._nets[key] = net  # most recent last
        while len(self._nets) > self.max_entries:
            self._nets.pop(next(iter(self._nets)))
        return net

    def clear(self) -> None:
        self._nets.clear()


def network_base_weights(nets: Any, cache: NetworkCache, model: Any, names: Sequence[str]) -> BaseWeights:
    """The model's layer weights for the OFT/BOFT layers of the LoRAs `names`, matched to the file's layers
    by the Lora extension itself (its `load_network`), so the plan route rotates the weights the host
    rotates: the pristine ones where Lora keeps a backup of a merged layer."""
    by_file: dict[Path, dict[str, torch.Tensor]] = {}

    def lookup(path: Path, _canonical: str, stem: str) -> torch.Tensor | None:
        if not by_file:
            for name in names:
                net = cache.load(nets, name, model)
                weights = {}
                for module in net.modules.values():
                    layer = module.sd_module
                    backup = getattr(layer, "network_weights_backup", None)
                    weight = backup if isinstance(backup, torch.Tensor) else layer.weight
                    weights[module.network_key.partition(".")[0]] = weight.detach()
                by_file[Path(net.network_on_disk.filename).resolve()] = weights
        return by_file.get(Path(path).resolve(), {}).get(stem)

    info = getattr(model, "sd_checkpoint_info", None)
    return BaseWeights(lookup, f"a1111:{id(model)}:{getattr(info, 'filename', '')}")


def _slot_class(network_module: Any) -> type:
    """Build the slot Network subclass once the Lora extension's `network` module exists."""
    cached = getattr(network_module, "_klora_slot_class", None)
    if cached is not None:
        return cached

    class SlotModules(dict):
        """Stays empty (extensions iterating .items() see nothing); `get` serves the current choice.

        It must never raise: it runs inside the UNet forward, outside any try (pitfall P6)."""

        def __init__(self, job: Job, which: int) -> None:
            super().__init__()
            self.job, self.which = job, which

        def get(self, key: str, default: Any = None) -> Any:
            try:
                job = self.job
                layer = job.owner.get(key)
                if layer is None:
                    return default
                found = None
                if job.selection.enabled(self.which, layer):
                    found = job.nets[self.which].modules.get(key)
                module = job.unet_touched.get(layer)
                if module is not None:  # Lora asks while merging (or, functional, per forward)
                    record_merge(module, self.which, found is not None)
                return default if found is None else found
            except Exception:  # see class docstring
                return default

        def __getitem__(self, key: str) -> Any:
            value = self.get(key)
            if value is None:
                raise KeyError(key)
            return value

        def __contains__(self, key: object) -> bool:
            return isinstance(key, str) and self.get(key) is not None

    class KLoraSlot(network_module.Network):
        def __init__(self, job: Job, which: int, signature: str, strength: float) -> None:
            source = job.nets[which]
            super().__init__(f"klora:{('subject', 'style')[which]}:{signature}", source.network_on_disk)
            self.modules = SlotModules(job, which)
            self.te_multiplier = self.unet_multiplier = strength
            self.dyn_dim = None
            self.mtime = source.mtime
            self.mentioned_name = None  # keeps it out of Lora's "Lora hashes" infotext

    network_module._klora_slot_class = KLoraSlot
    return KLoraSlot


@dataclass
class DynamicState:
    """Method "dynamic" of one job: the selector, its forward hooks and whether a dynamic pass runs now."""

    selector: DynamicSelector
    hooks: HookSet
    live: bool = False

    def remove(self) -> None:
        self.live = False
        self.hooks.remove()


@dataclass
class SwitchHooks:
    """One pass's switching layers on the activation side: hooks read the pass's schedule per step."""

    selector: FusionSelector
    hooks: HookSet
    held: dict[str, int | None]  # hooked layer -> the LoRA its weight holds merged (None: plain)
    live: bool = False

    def remove(self) -> None:
        self.live = False
        self.hooks.remove()


@dataclass(kw_only=True)
class Job(FusionJob):
    """Everything K-LoRA holds for one generation; lives on `p._klora` and dies with it."""

    nets: tuple[Any, Any]
    model: Any
    owner: dict[str, str]  # module key in net.modules -> owning layer name
    layer_modules: list[torch.nn.Module]  # managed UNet layers, in plan order
    touched_modules: list[torch.nn.Module]  # every layer either LoRA adapts
    selection: LayerSelection
    slots: list[Any] = field(default_factory=list)
    schedule: StepSchedule | None = None
    unet_touched: dict[str, torch.nn.Module] = field(default_factory=dict)  # UNet layers either LoRA adapts
    adapts: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # per unet_touched: subject, style
    dynamic: DynamicState | None = None
    switch_on_activations: bool = False  # the hybrid: see the module docstring
    switching: SwitchHooks | None = None
    sigma: Any = None  # the current evaluation's sigma (guidance scales its nudge by it)


def _layer_mapping(model: Any) -> dict[str, torch.nn.Module]:
    return getattr(model, "network_layer_mapping", {}) or {}


def build_job(
    nets: Any,
    cache: NetworkCache,
    scores: ScoreCache,
    model: Any,
    first_params: KLoraParams | None,
    hires_params: KLoraParams | None,
    *,
    device: torch.device | str,
    digest: Callable[[str], str],
    should_stop: Callable[[], bool] | None = None,
    switch_on_activations: bool = False,
) -> Job:
    """Load both LoRAs privately through the host loader and score their shared UNet layers (cached).

    `switch_on_activations`: serve the layers that switch within a pass by hooks (see the module docstring).
    """
    params = first_params or hires_params
    if params is None:
        raise ValueError("build_job needs the parameters of at least one pass")
    loaded = (cache.load(nets, params.subject, model), cache.load(nets, params.style, model))
    mapping = _layer_mapping(model)
    owner: dict[str, str] = {}
    per_lora: list[dict[str, HostDelta]] = []
    for net in loaded:
        deltas: dict[str, HostDelta] = {}
        for key, module in net.modules.items():
            layer = getattr(module.sd_module, "network_layer_name", None) or key
            owner[key] = layer
            if layer.startswith(UNET_PREFIX) and layer in mapping and key == layer:
                deltas[layer] = HostDelta(module, mapping[layer])
        per_lora.append(deltas)
    for name, deltas in zip((params.subject, params.style), per_lora, strict=True):
        if not deltas:
            raise JobError(
                f"K-LoRA: the WebUI's Lora loader found no UNet layer of the current model in LoRA '{name}' "
                "(another base model, or a key format A1111 cannot read)"
            )
    shared_layers = set(per_lora[0]) & set(per_lora[1])
    if not shared_layers:
        raise JobError(f"K-LoRA: '{params.subject}' and '{params.style}' adapt no UNet layer in common")

    files = [net.network_on_disk.filename for net in loaded]
    key = (*[digest(f) for f in files], f"a1111-{type(model).__name__}")
    table = scores.get(key)
    if table is None:
        saved = [(net.te_multiplier, net.unet_multiplier) for net in loaded]
        try:  # score at strength 1: strengths are applied by the plan
            for net in loaded:
                net.te_multiplier = net.unet_multiplier = 1.0
            with torch.no_grad(), torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
                table = compute_scores(
                    per_lora, device=device, should_stop=should_stop, labels=[params.subject, params.style]
                )
        finally:
            for net, (te, unet) in zip(loaded, saved, strict=True):
                net.te_multiplier, net.unet_multiplier = te, unet
        scores.put(key, table)
    for net, strength in zip(loaded, (params.subject_strength, params.style_strength), strict=True):
        net.te_multiplier = net.unet_multiplier = strength

    managed = [layer.canonical for layer in table.layers]
    touched = sorted({owner[k] for net in loaded for k in net.modules})
    selection = LayerSelection(managed, te_policy=params.te_policy, is_text_encoder=is_text_encoder_layer)
    job = Job(
        params=first_params,
        hires_params=hires_params,
        nets=loaded,
        model=model,
        table=table,
        owner=owner,
        layer_modules=[mapping[name] for name in managed],
        touched_modules=[mapping[name] for name in touched if name in mapping],
        selection=selection,
        unet_touched={n: mapping[n] for n in touched if n in mapping and n.startswith(UNET_PREFIX)},
        switch_on_activations=switch_on_activations,
    )
    job.adapts = {name: (name in loaded[0].modules, name in loaded[1].modules) for name in job.unet_touched}
    if any(p is not None and p.fusion_method is Method.DYNAMIC for p in (first_params, hires_params)):
        job.dynamic = build_dynamic(job, params)
    return job


def held_lora(choices: Sequence[int], ranks: tuple[int, int]) -> int | None:
    """The state a switching layer keeps through a pass: None (plain weight) or the LoRA merged into it,
    whichever makes its hook cheapest. Cost in rank units per evaluation (the low-rank matmuls scale with
    it): a plain layer pays the chosen LoRA's rank at every step; a layer holding LoRA L pays both ranks
    (the difference branch) at the steps that choose the other one, nothing at L's. Ties stay plain."""
    costs: dict[int | None, int] = {None: sum(ranks[c] for c in choices)}
    for held in (SUBJECT, STYLE):
        costs[held] = sum(c != held for c in choices) * (ranks[0] + ranks[1])
    return min(costs, key=lambda held: costs[held])


def hook_switching_layers(job: Job, params: KLoraParams, schedule: StepSchedule) -> None:
    """Start of a K-LoRA pass: hook the layers whose choice changes within it (when the job switches on
    activations), each holding its `held_lora` state, which `sync_merged_layers` then merges or restores."""
    if job.switching is not None:
        job.switching.remove()
        job.switching = None
    job.selection.hooked = {}
    if not job.switch_on_activations:
        return
    strengths = (params.subject_strength, params.style_strength)
    branches: dict[str, tuple[Branch | None, Branch | None]] = {}
    held: dict[str, int | None] = {}
    for row, choices in enumerate(schedule.choices.tolist()):
        name = job.table.layers[row].canonical
        module = job.unet_touched.get(name)
        if len(set(choices)) == 1 or not set(choices) <= {SUBJECT, STYLE} or module is None:
            continue  # constant (merged and kept), or a "both" step (merged at the switch)
        pair = [cached_low_rank_branch(net, name, module, strengths[w]) for w, net in enumerate(job.nets)]
        if not isinstance(pair[0], LowRankBranch) or not isinstance(pair[1], LowRankBranch):
            continue  # no low-rank form: merged at the switch
        keep = held_lora(choices, (pair[0].rank, pair[1].rank))
        if keep is not None:  # the other choice adds its delta and takes the held one's out
            minus = cached_low_rank_branch(job.nets[keep], name, module, -strengths[keep])
            assert minus is not None
            pair[1 - keep] = SumBranch([pair[1 - keep], minus])
        branches[name] = (pair[0], pair[1])
        held[name] = keep
    if not branches:
        return
    selector = FusionSelector(len(job.table.layers))
    selector.begin_static_pass(schedule.choices)
    state = SwitchHooks(selector, HookSet(), held)
    state.hooks = install_hooks(
        {name: job.unet_touched[name] for name in branches},
        branches,
        selector,
        {layer.canonical: row for row, layer in enumerate(job.table.layers)},
        is_live=lambda: state.live and not job.failed,
        in_place=True,  # Linear/Conv2d outputs under no_grad are fresh tensors (Lora's patched forwards too)
        merged={name: keep for name, keep in held.items() if keep is not None},
    )
    state.live = True
    job.switching = state
    job.selection.hooked = dict(held)


def build_dynamic(job: Job, params: KLoraParams) -> DynamicState:
    """Branches for every UNet layer either LoRA adapts, the selector, and (inactive) forward hooks."""
    branches: dict[str, list[Branch | None]] = {}
    strengths = (params.subject_strength, params.style_strength)
    for which, net in enumerate(job.nets):
        for key, module in net.modules.items():
            layer = job.owner.get(key)
            if layer in job.unet_touched and key == layer:
                pair = branches.setdefault(layer, [None, None])
                pair[which] = branch_for(module, job.unet_touched[layer], strengths[which])
    selector = DynamicSelector.for_params(len(job.table.layers), params)
    index = {layer.canonical: i for i, layer in enumerate(job.table.layers)}
    state = DynamicState(selector, HookSet())
    state.hooks = install_hooks(
        job.unet_touched,
        {name: (pair[0], pair[1]) for name, pair in branches.items()},
        selector,
        index,
        is_live=lambda: state.live and not job.failed,
        in_place=True,  # Linear/Conv2d outputs under no_grad are fresh tensors (Lora's patched forwards too)
    )
    return state


def signature(params: KLoraParams, mtimes: Sequence[float | None] = ()) -> str:
    """Constant for a pass; part of the slots' names, which Lora compares to decide re-merges (so also the
    files' mtimes: a LoRA saved again under its name must not pass for the merged one).
    JSON, so no LoRA name can make two different settings collide."""
    fields = (
        "subject",
        "style",
        "subject_strength",
        "style_strength",
        "method",
        "pattern",
        "alpha",
        "effective_beta",
        "gamma",
        "te_policy",
        "seed",
    )
    return json.dumps([*(getattr(params, name) for name in fields), *mtimes], separators=(",", ":"))


def remove_slots(nets: Any) -> None:
    slot_class = getattr(sys.modules.get("network"), "_klora_slot_class", None)
    if slot_class is not None and nets is not None:
        nets.loaded_networks[:] = [n for n in nets.loaded_networks if not isinstance(n, slot_class)]


def inject_slots(nets: Any, job: Job, is_hires: bool) -> bool:
    """Idempotently put this pass's slots at the end of `loaded_networks` (after the user's LoRAs)."""
    remove_slots(nets)
    params = job.params_for(is_hires)
    if job.failed or params is None:
        return False
    slot_class = _slot_class(sys.modules["network"])
    sig = signature(params, [net.mtime for net in job.nets])
    job.selection.te_policy = params.te_policy
    job.slots = [
        slot_class(job, 0, sig, params.subject_strength),
        slot_class(job, 1, sig, params.style_strength),
    ]
    for net, strength in zip(job.nets, (params.subject_strength, params.style_strength), strict=True):
        net.te_multiplier = net.unet_multiplier = strength
    nets.loaded_networks.extend(job.slots)
    kept_layers.add(job.touched_modules)  # from now on Lora may merge them: restore them when released
    return True


def wanted_merge(job: Job, layer: str) -> tuple[bool, bool]:
    """(subject, style) merged into denoiser `layer` for the selection as it is now."""
    adapts = job.adapts.get(layer, (False, False))
    return (
        adapts[0] and job.selection.enabled(0, layer),
        adapts[1] and job.selection.enabled(1, layer),
    )


def sync_merged_layers(job: Job) -> list[str]:
    """Start of a pass: mark for a re-merge only the denoiser layers whose merged choice (recorded at Lora's
    last merge) differs from what this step needs. A layer merged under other network names (another
    fusion, user LoRAs changed, restored) is re-merged by Lora anyway."""
    return [
        name
        for name, module in job.unet_touched.items()
        if merged_state(module) != wanted_merge(job, name) and mark_dirty(module)
    ]


def on_step(job: Job, denoiser: Any, is_hires: bool, evals_per_step: int) -> None:
    """Per sampler evaluation: find the real step of this pass, switch layers whose choice changes."""
    params = job.params_for(is_hires)
    if job.failed:
        return
    for hooks in (h.hooks for h in (job.dynamic, job.switching) if h is not None):
        if hooks.error is not None:  # the set removed itself: the image would go on without those deltas
            raise JobError(f"K-LoRA: the forward hook on {hooks.failed_layer} failed: {hooks.error}")
    if params is None:
        if job.dynamic is not None:
            job.dynamic.live = False
        if job.switching is not None:
            job.switching.live = False
        return
    new_pass = job.tracker.update(denoiser, int(denoiser.step), int(denoiser.total_steps), evals_per_step)
    label = "hires pass" if is_hires else "first pass"
    dynamic = params.fusion_method is Method.DYNAMIC
    if new_pass:
        job.selection.denoiser_by_hooks = dynamic
        if dynamic:
            assert job.dynamic is not None
            job.dynamic.selector.begin_pass(label, job.tracker.steps)
            job.schedule = None
            if job.switching is not None:
                job.switching.remove()
                job.switching = None
            job.selection.hooked = {}
        else:
            job.schedule = job.plan_for(params).schedule(job.tracker.steps)
            hook_switching_layers(job, params, job.schedule)
        if job.dynamic is not None:
            job.dynamic.live = dynamic
        if not any(record.label == label for record in job.passes):
            selector = job.dynamic.selector if dynamic and job.dynamic is not None else None
            job.passes.append(PassRecord(label, params, job.schedule, selector))
    if dynamic:
        assert job.dynamic is not None
        job.dynamic.selector.set_step(job.tracker.step)
    else:
        assert job.schedule is not None
        changed = job.selection.apply(job.schedule.at(job.tracker.step).tolist())
        if not new_pass:
            for i in changed:
                if job.table.layers[i].canonical not in job.selection.hooked:
                    mark_dirty(job.layer_modules[i])
        if job.switching is not None:
            job.switching.selector.set_step(job.tracker.step)
    if new_pass:
        # A previous job or pass may have left another choice merged; a pass of the other kind (hooks vs
        # merges) the opposite state. Layers already right stay as they are.
        sync_merged_layers(job)


def finish(nets: Any, job: Job) -> None:
    """Normal end of a job: hooks off, slots out; merged layers stay for an identical next job (Lora
    restores them when the wanted networks change; `kept_layers.release` at once)."""
    job.selection.live = False
    if job.dynamic is not None:
        job.dynamic.remove()
    if job.switching is not None:
        job.switching.remove()
    remove_slots(nets)


def teardown(nets: Any, job: Job) -> int:
    """End of an interrupted or failing job: hooks off, slots out, every touched weight restored now."""
    finish(nets, job)
    return restore_layers(nets, job.touched_modules)


def guard_sample(
    p: Any, job: Job, nets: Any, on_failure: Callable[[BaseException], None] | None = None
) -> None:
    """Make a failing `p.sample` end the job at once: hooks removed, slots out, weights restored."""

    def cleanup(exc: BaseException) -> None:
        teardown(nets, job)
        if on_failure is not None:
            on_failure(exc)

    on_sampling_failure(p, cleanup)
