"""K-LoRA on any torch model: every method, driven by the real sampler step, through forward hooks.

The generic engine behind the diffusers front door (`lib_klora.diffusers`) and any hand-written sampler
loop. It reads the two LoRA files with the library's reader, plans with the same code as
``python -m lib_klora plan`` (`fusion.from_files.plan_from_files`), finds each LoRA layer in the caller's
modules by its canonical name (engines/module_targets.py) and adds the chosen LoRA's low-rank delta to
that module's output with a forward hook, as the Forge engine does. The model's weights are never
written, so nothing needs restoring: removing the hooks (idempotent; also on any exception or
KeyboardInterrupt through the context manager) leaves the model exactly as it was.

Usage with an own sampler loop (components are named like the LoRA files' components: "unet" or
"transformer" for the denoiser, "te"/"te1"/"te2"/"te3" for text encoders)::

    from lib_klora.engines.torch_module import ModuleFusion

    fusion = ModuleFusion({"unet": unet, "te": text_encoder}, "subject.safetensors", "style.safetensors",
                          {"method": "klora", "pattern": "s"})   # or a KLoraParams
    with fusion:                                   # hooks on; off again on every exit
        cond = text_encoder(ids)[0]                # text-encoder LoRAs follow `te_policy`
        for i, t in enumerate(timesteps):
            fusion.step_callback(i, len(timesteps))   # before the UNet call(s) of step i
            eps = unet(x, t, cond).sample              # any number of calls per step
            x0 = fusion.guide(x0_from(eps), sigma)     # reference guidance (identity when off)
            ...
    fusion.selection_map().save("map.png")         # which LoRA each layer used at each step
    fusion.passes[-1].choices()                    # the same table as data

`begin(steps)` / `step(i)` / `end()` are the explicit form of the clock `step_callback` drives: a pass
starts at step 0 (or when the step count changes), and every UNet call between two `step` calls shares
one decision per layer. Outside a pass the denoiser hooks leave outputs alone.

Methods: K-LoRA (`pattern` s / s*), the baselines merge / fixed / random (precomputed schedules, a table
lookup per layer), and `dynamic` (per layer and step, the LoRA whose output diverges more from the base
output; `kl_hybrid` scales it with K-LoRA's time scale). Parameters are `KLoraParams`, validated as on
every other route before any work starts.

`apply_to="weights"` (K-LoRA and the baselines) writes W0 + the chosen ΔW into the denoiser's weights at
each layer's switch steps instead of hooking it (engines/weight_switch.py): no per-step cost, for a copy
of the adapted weights (on the CPU by default) that `end`/`remove` copy back bit for bit.

Records: `passes` (one `PassRecord` per pass), `decisions()`, `steps_seen`, `selection_map()`, `skipped`
(LoRA layers the modules do not have), `error` (a hook that failed and switched the hooks off).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lib_klora.dynamic.branches import Branch, ConvSpec, DenseBranch, LowRankBranch, SlicedBranch
from lib_klora.dynamic.hooks import HookSet, install_hooks
from lib_klora.dynamic.selectors import DynamicSelector, FusionSelector, dynamic_title
from lib_klora.engines.module_targets import (
    TEXT_ENCODER_COMPONENTS,
    ModuleIndex,
    Target,
    module_base_weights,
)
from lib_klora.engines.patcher import compute_dtype
from lib_klora.engines.tracking import PassRecord
from lib_klora.engines.weight_switch import WeightSwitch
from lib_klora.errors import KLoraError
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import (
    DENOISER_COMPONENTS,
    check_compatible,
    load_score_table,
    plan_from_files,
)
from lib_klora.fusion.options import Method
from lib_klora.fusion.plan import FusionPlan
from lib_klora.fusion.scores import ScoreTable
from lib_klora.fusion.selection_map import render_selection_map
from lib_klora.guidance.refine import Decode
from lib_klora.guidance.run import GuidanceModels, GuidanceRun
from lib_klora.loras.lora_file import read_lora_file
from lib_klora.loras.oft import OftModule
from lib_klora.params.fields import MAX_NAME_LENGTH
from lib_klora.params.model import KLoraParams

__all__ = ["APPLY_TO", "FusionError", "ModuleFusion", "check_apply_to", "klora_params"]

PathLike = str | os.PathLike[str]
_TE_POLICY_LORAS = {"both": (0, 1), "subject": (0,), "style": (1,), "none": ()}
APPLY_TO = ("activations", "weights")


class FusionError(KLoraError):
    """The fusion cannot be set up or driven as asked (no layer found, clock misuse ...)."""


def klora_params(
    subject: PathLike, style: PathLike, settings: KLoraParams | Mapping[str, Any] | None = None
) -> KLoraParams:
    """The validated parameters of a fusion of two files; `settings` are KLoraParams fields (method,
    pattern, alpha, strengths, te_policy, kl_*, guidance_* ...). The LoRA names are the files' stems."""
    if isinstance(settings, KLoraParams):
        if not settings.enabled:
            raise FusionError("the KLoraParams given are not enabled (enabled=True)")
        return settings
    names = [_lora_name(Path(subject)), _lora_name(Path(style))]
    if names[0] == names[1] and Path(subject).resolve() != Path(style).resolve():
        names[1] = f"{names[1]} (style)"  # two files of one name in different folders
    return KLoraParams(**{"enabled": True, "subject": names[0], "style": names[1], **dict(settings or {})})


def check_apply_to(apply_to: str, params: KLoraParams) -> None:
    """Where the deltas go must suit the method: 'weights' switches precomputed plans only."""
    if apply_to not in APPLY_TO:
        raise FusionError(f"apply_to must be 'activations' or 'weights', got {apply_to!r}")
    if apply_to == "weights" and params.fusion_method is Method.DYNAMIC:
        raise FusionError("method 'dynamic' decides from the activations: use apply_to='activations'")


def _lora_name(path: Path) -> str:
    """The file's stem as a LoRA name (names are not paths: path-like parts become '_')."""
    name = path.stem
    for part in ("..", "/", "\\", ":", "<", ">"):
        name = name.replace(part, "_")
    return name[:MAX_NAME_LENGTH] or "lora"


@dataclass
class _Hook:
    """One forward hook: a module, the subject/style branch (None where that LoRA does not apply) and
    the selection row of a layer both LoRAs adapt."""

    module: nn.Module
    parts: list[list[tuple[LowRankBranch | DenseBranch, Target]]] = field(default_factory=lambda: [[], []])
    row: int | None = None


def _pieces(module: Any) -> list[tuple[int, Any]] | None:
    """(first row, low-rank module) pieces of a LoRA layer (a FLUX layer the reader assembled from row
    slices has several); None when a piece has no plain low-rank form."""
    pieces = list(getattr(module, "slices", None) or [(0, module)])
    return pieces if all(callable(getattr(piece, "factors", None)) for _, piece in pieces) else None


def _branches(module: Any, target: Target, strength: float) -> list[tuple[LowRankBranch, Target]]:
    """The target's share of the layer's delta: one branch per piece whose rows overlap the target's."""
    conv = ConvSpec.of(target.module) if isinstance(target.module, nn.Conv2d) else None
    dtype = compute_dtype(target.module)
    out = []
    for offset, piece in _pieces(module) or []:
        low = max(target.lora_start, offset)
        high = min(target.lora_start + target.size, offset + piece.out_features)
        if low >= high:
            continue
        up, down = piece.factors()  # fp32, alpha/rank folded in (and a CP core)
        up = up[low - offset : high - offset]
        part = replace(target, start=target.start + low - target.lora_start, size=high - low, lora_start=low)
        out.append((LowRankBranch(up.to(dtype), down.to(dtype), strength, conv=conv), part))
    return out


def _oft_branches(module: OftModule, targets: list[Target] | None, strength: float) -> list | None:
    """An OFT/BOFT layer's ΔW (the rotation of the target's own weight, at `strength`) as a dense branch;
    None where the layer is not one whole module of the model (a fused projection, a FLUX split)."""
    if not targets or len(targets) != 1 or not targets[0].whole:
        return None
    target = targets[0]
    weight = target.module.weight
    if not weight.is_floating_point() or int(weight.shape[0]) != module.out_features:
        return None
    conv = ConvSpec.of(target.module) if isinstance(target.module, nn.Conv2d) else None
    delta = module.delta_for(weight.detach(), weight.device) * strength
    return [(DenseBranch(delta.to(compute_dtype(target.module)).reshape(weight.shape), conv=conv), target)]


def _in_features_fit(module: Any, target: Target) -> bool:
    """The LoRA's down factor reads what the module reads (a grouped conv: one group's inputs)."""
    return module.in_features == int(target.module.weight[0].numel())


def _refuse_oft_weight_switch(loras: list[Any]) -> None:
    for lora in loras:
        for name, module in lora.modules.items():
            if isinstance(module, OftModule) and name.startswith(DENOISER_COMPONENTS):
                raise FusionError(
                    f"{lora.path.name}: {module.format_name} layer {module.stem}: apply_to='weights' "
                    "switches low-rank deltas; an OFT/BOFT LoRA fuses with apply_to='activations'"
                )


def _modules_identity(components: Mapping[str, nn.Module]) -> str:
    """Names these modules' weights for the score cache (OFT scores hold only for the weights rotated)."""
    parts = []
    for name, root in sorted(components.items()):
        first = next(root.parameters(), None)
        parts.append(f"{name}:{id(root)}:{0 if first is None else first.data_ptr()}")
    return "modules:" + ",".join(parts)


def _combine(parts: list[tuple[LowRankBranch | DenseBranch, Target]]) -> Branch | None:
    if not parts:
        return None
    if len(parts) == 1 and parts[0][1].whole:
        return parts[0][0]
    if any(branch.is_conv for branch, _ in parts):
        raise FusionError(f"{parts[0][1].name}: partial LoRA patches of a convolution are not supported")
    return SlicedBranch(parts[0][1].out_features, [(b, t.start, t.size) for b, t in parts])


class ModuleFusion:
    """Two LoRAs fused on the activation side of a set of torch modules; see the module docstring.

    `components`: named modules ("unet"/"transformer", "te"/"te1"/"te2"/"te3"). `params`: KLoraParams or
    a mapping of its fields (the file stems become the LoRA names). `apply_to="weights"` (K-LoRA and the
    baselines only) writes W0 + the chosen ΔW into the denoiser's weights at each layer's switch steps
    instead of hooking it: a step then costs what the base model costs, for a copy of the adapted weights
    on `backup_device` (restored bit for bit by `end`/`remove`); see engines/weight_switch.py.
    `guidance_models` and `decode` (latent or pixel tensor → image in [0, 1], differentiable) are needed
    only with reference guidance. `device` is where the scores are computed; `cache` keeps them between
    runs.
    """

    def __init__(
        self,
        components: Mapping[str, nn.Module],
        subject: PathLike,
        style: PathLike,
        params: KLoraParams | Mapping[str, Any] | None = None,
        *,
        guidance_models: GuidanceModels | None = None,
        decode: Decode | None = None,
        prompt: str = "",
        device: str | torch.device | None = "auto",
        cache: ScoreCache | None = None,
        apply_to: str = "activations",
        backup_device: str | torch.device = "cpu",
    ) -> None:
        self.params = klora_params(subject, style, params)
        check_apply_to(apply_to, self.params)
        self.files = (Path(subject), Path(style))
        loras = [read_lora_file(f) for f in self.files]
        check_compatible(loras)
        if apply_to == "weights":
            _refuse_oft_weight_switch(loras)
        # OFT/BOFT layers rotate the modules' own weights (their scores are cached for these modules)
        weights = module_base_weights(lambda: components, _modules_identity(components))
        self.plan: FusionPlan | None = None
        if self.params.fusion_method is Method.DYNAMIC:
            self.table: ScoreTable = load_score_table(
                self.files, device=device, cache=cache, base_weights=weights
            )
        else:
            settings = self.params.to_plan_settings()
            self.plan = plan_from_files(
                *self.files, settings, device=device, cache=cache, base_weights=weights
            )
            self.table = self.plan.table
        dynamic = None
        if self.params.fusion_method is Method.DYNAMIC:
            dynamic = DynamicSelector.for_params(len(self.table.layers), self.params)
        self.selector = FusionSelector(len(self.table.layers), dynamic)
        self.skipped: list[str] = []  # canonical LoRA layers this model does not have
        self._hooks_plan = self._plan_hooks(components, loras)
        if not any(h.row is not None for h in self._hooks_plan[0].values()):
            raise FusionError(
                "none of the layers both LoRAs adapt was found in the given modules "
                f"(components {', '.join(components)}; another base model, or misnamed components?)"
            )
        self.weights: WeightSwitch | None = None
        if apply_to == "weights":
            self.weights = WeightSwitch(backup_device)
            for hook in self._hooks_plan[0].values():
                self.weights.add(hook.module, hook.row, (hook.parts[0], hook.parts[1]))
        self.guidance: GuidanceRun | None = None
        if self.params.uses_guidance:
            if guidance_models is None or decode is None:
                raise FusionError("reference guidance needs guidance_models and a decode function")
            first = next((p for m in components.values() for p in m.parameters()), None)
            where = first.device if first is not None else torch.device("cpu")  # the encoders go there too
            self.guidance = GuidanceRun.build(
                self.params, guidance_models, decode, prompt=prompt, device=where
            )
        self.passes: list[PassRecord] = []
        self.steps_seen: list[list[int]] = []  # per pass: the steps the clock was set to, in order
        self._hook_sets: list[HookSet] = []
        self._installed = False
        self._pass_active = False
        self._steps = 0
        self._step = -1

    # ------------------------------------------------------------------ setup

    def _plan_hooks(
        self, components: Mapping[str, nn.Module], loras: list[Any]
    ) -> tuple[dict[str, _Hook], dict[str, _Hook]]:
        """(denoiser hooks, text-encoder hooks) keyed by module name (plus the row's layer where one
        module serves several rows, e.g. the slices of a fused qkv)."""
        index = ModuleIndex(components)
        rows = {layer.canonical: i for i, layer in enumerate(self.table.layers)}
        strengths = (self.params.subject_strength, self.params.style_strength)
        te_loras = _TE_POLICY_LORAS[self.params.te_policy]
        denoiser: dict[str, _Hook] = {}
        text: dict[str, _Hook] = {}
        for which, lora in enumerate(loras):
            for canonical, module in lora.modules.items():
                is_te = canonical.partition(":")[0] in TEXT_ENCODER_COMPONENTS
                if is_te and which not in te_loras:
                    continue
                if not (is_te or canonical.startswith(DENOISER_COMPONENTS)):
                    self.skipped.append(canonical)
                    continue
                targets = index.resolve(canonical, module.out_features)
                if isinstance(module, OftModule):
                    branches = _oft_branches(module, targets, strengths[which])
                    if branches is None:
                        self.skipped.append(canonical)
                        continue
                    row = rows.get(canonical) if not is_te else None
                    key = f"{branches[0][1].name}|{canonical}" + (f"|{which}" if is_te else "")
                    hook = (text if is_te else denoiser).setdefault(
                        key, _Hook(branches[0][1].module, row=row)
                    )
                    hook.parts[which].extend(branches)
                    continue
                fits = targets and _pieces(module) is not None
                if not fits or not all(_in_features_fit(module, t) for t in targets):
                    self.skipped.append(canonical)
                    continue
                row = rows.get(canonical) if not is_te else None
                for target in targets:
                    # A text-encoder layer both LoRAs adapt gets one hook per LoRA (each always on).
                    key = f"{target.name}|{canonical}" + (f"|{which}" if is_te else "")
                    hook = (text if is_te else denoiser).setdefault(key, _Hook(target.module, row=row))
                    hook.parts[which].extend(_branches(module, target, strengths[which]))
        self.skipped = sorted(set(self.skipped))
        return denoiser, text

    @property
    def layer_names(self) -> list[str]:
        """The selection rows: every layer both LoRAs adapt, named as in the subject file."""
        return [layer.names[0] for layer in self.table.layers]

    @property
    def hooked_modules(self) -> int:
        return len({id(h.module) for plan in self._hooks_plan for h in plan.values()})

    # ------------------------------------------------------------------ hooks on / off

    def install(self) -> ModuleFusion:
        """Put the hooks on (idempotent). Text-encoder LoRAs apply at once; denoiser ones during passes."""
        if self._installed:
            return self
        denoiser, text = self._hooks_plan
        try:
            sets = [(text, self._te_live)] if self.weights is not None else []
            for hooks, live in sets or [(denoiser, self._denoiser_live), (text, self._te_live)]:
                modules = {key: h.module for key, h in hooks.items()}
                branches = {key: (_combine(h.parts[0]), _combine(h.parts[1])) for key, h in hooks.items()}
                rows = {key: h.row for key, h in hooks.items() if h.row is not None}
                self._hook_sets.append(
                    install_hooks(modules, branches, self.selector, rows, live, in_place=True)
                )
        except BaseException:
            self.remove()
            raise
        self._installed = True
        return self

    def remove(self) -> None:
        """Take every hook off (idempotent): the modules compute exactly as before `install`."""
        self._installed = False
        self._pass_active = False
        while self._hook_sets:
            self._hook_sets.pop().remove()
        if self.weights is not None:
            self.weights.restore()

    def __enter__(self) -> ModuleFusion:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def error(self) -> Exception | None:
        """A hook's failure (the hooks then switched themselves off and the model ran on without them)."""
        return next((h.error for h in self._hook_sets if h.error is not None), None)

    def _denoiser_live(self) -> bool:
        return self._installed and self._pass_active

    def _te_live(self) -> bool:
        return self._installed

    # ------------------------------------------------------------------ the clock

    def begin(self, steps: int, label: str | None = None) -> None:
        """Start a sampling pass of `steps` steps, at step 0."""
        steps = int(steps)
        if not 0 < steps <= 1000:
            raise FusionError(f"steps must be 1 to 1000, got {steps}")
        label = label or f"pass {len(self.passes) + 1}"
        schedule = None
        if self.plan is not None:
            schedule = self.plan.schedule(steps)
            self.selector.begin_static_pass(schedule.choices)
        else:
            self.selector.begin_dynamic_pass(label, steps)
        self.passes.append(PassRecord(label, self.params, schedule, self.selector.dynamic))
        self.steps_seen.append([])
        self._steps, self._step = steps, -1
        self._pass_active = True
        self.step(0)

    def step(self, step: int) -> None:
        """Set the clock to `step` (0-based) before the denoiser call(s) of that step."""
        if not self._pass_active:
            raise FusionError("step() outside a pass: call begin(steps) first")
        step = int(step)
        if not 0 <= step < self._steps:
            raise FusionError(f"step {step} outside 0..{self._steps - 1}")
        if step != self._step:
            self.steps_seen[-1].append(step)
        self._step = step
        self.selector.set_step(step)
        if self.weights is not None:
            if not self._installed:
                raise FusionError("apply_to='weights' writes weights only between install() and remove()")
            self.weights.apply(self.passes[-1].schedule.at(step).tolist())

    def end(self) -> None:
        """The pass is over: the denoiser hooks leave outputs alone (written weights are restored) until
        the next `begin`."""
        self._pass_active = False
        if self.weights is not None:
            self.weights.restore()

    def step_callback(self, step_index: int, total_steps: int) -> None:
        """The clock in one call per sampler step, before its denoiser call(s): a new pass starts at step
        0, when no pass runs or when the step count changes."""
        if not self._pass_active or total_steps != self._steps or (step_index == 0 and self._step != 0):
            self.begin(total_steps)
        self.step(step_index)

    @property
    def current_step(self) -> tuple[int, int]:
        """(step, steps) of the running pass; (-1, 0) outside a pass."""
        return (self._step, self._steps) if self._pass_active else (-1, 0)

    # ------------------------------------------------------------------ guidance

    def guide(self, x0: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """x̂0 nudged towards the reference images when guidance is on and guides this step; else `x0`."""
        if self.guidance is None or not self._pass_active:
            return x0
        return self.guidance.apply(x0, sigma, self._step, self._steps)

    def wants_guidance(self) -> bool:
        return (
            self.guidance is not None and self._pass_active and self.guidance.wants(self._step, self._steps)
        )

    # ------------------------------------------------------------------ records

    def decisions(self, pass_index: int = -1) -> tuple[list[list[int]], tuple[str, ...]]:
        """choices[layer][step] of a pass (indices into the returned labels)."""
        if not self.passes:
            raise FusionError("no pass has run yet")
        return self.passes[pass_index].choices()

    def title(self) -> str:
        """Both files and the method's settings, for selection maps."""
        files = f"{self.files[0].name} + {self.files[1].name}"
        if self.plan is None:
            return f"{files}: {dynamic_title(self.params)}"
        return f"{files}: {self.plan.title()}"

    def selection_map(self, pass_index: int = -1) -> Image.Image:
        """The selection map of a pass: which LoRA each layer used at each step."""
        choices, labels = self.decisions(pass_index)
        return render_selection_map(self.layer_names, choices, labels, title=self.title())
