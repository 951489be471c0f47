"""Forge and reForge: K-LoRA, the baselines and `dynamic` through per-instance forward hooks.

Both hosts merge LoRAs with ComfyUI-style model patchers, and Forge's layers are not `torch.nn.Linear`, so
A1111's slot design does not apply. Instead the two LoRAs are read through the host's own key maps (every
format the host reads works), each managed layer gets a forward hook that adds the chosen LoRA's low-rank
delta to the host's output, and the host's weights are never touched (quantized NF4/GGUF bases keep working).

Host-free: the adapters (`ForgeApi`, `ReForgeApi` in hosts/forge.py) pass in the host's patch dicts, a
module lookup and a dense-delta function for LoRA types without a plain low-rank form; nothing here imports
the WebUI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lib_klora.dynamic.branches import ConvSpec, DenseBranch, LowRankBranch, SlicedBranch, branch_dtype
from lib_klora.dynamic.hooks import Branch, HookSet, install_hooks
from lib_klora.dynamic.selectors import DynamicSelector, FusionSelector
from lib_klora.engines.job import FusionJob, JobError, on_sampling_failure
from lib_klora.engines.tracking import PassRecord
from lib_klora.fusion.options import Method
from lib_klora.fusion.scores import ScoreTable, compute_scores
from lib_klora.loras.lora_file import LowRankModule
from lib_klora.loras.oft import oft_rank
from lib_klora.loras.structured import full_rank, loha_rank, lokr_rank
from lib_klora.params.model import KLoraParams

PatchKey = str | tuple  # "x.weight", or (param key, (dim, start, size)[, function]) for part of a fused layer


@dataclass(frozen=True)
class LowRankFactors:
    """A plain LoRA patch as the host stores it: up (out, r[, 1, 1]), down (r, in[, kh, kw]), alpha."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha / self.rank) if self.alpha is not None else 1.0


# The host adapter's view of one patch value: plain low-rank factors, or None (then `dense` is used).
DecodePatch = Callable[[Any], LowRankFactors | None]
# The host adapter's scoring view of a patch that is not plain factors, given the patched part's
# shape: (the low-rank update to score a DoRA patch by, the rank bound used as K), each None where
# unknown. Both follow the file reader (`loras/lora_file.py`, `loras/structured.py`), so a plan from the
# file makes the host's choices.
DescribePatch = Callable[[Any, tuple[int, ...]], tuple[LowRankFactors | None, int | None]]
# The host's merge of a patch value into a copy of the given float weight, at strength 1 (LoHa, LoKr, DoRA,
# mid cores ...); the delta is merged − weight. Raises for patches that are not a weight delta ("set").
DensePatch = Callable[[Any, str, torch.Tensor], torch.Tensor]


@dataclass
class _Part:
    factors: LowRankFactors | None
    dense: torch.Tensor | None  # ΔW at strength 1 when there are no plain factors
    start: int
    size: int
    scored: LowRankFactors | None = None  # what a DoRA patch is scored by (its low-rank update)
    rank: int | None = None  # rank bound of a patch without plain factors (LoHa r1·r2, LoKr, full)

    @property
    def score_factors(self) -> LowRankFactors | None:
        return self.factors if self.factors is not None else self.scored

    @property
    def score_rank(self) -> int | None:
        factors = self.score_factors
        return factors.rank if factors is not None else self.rank


@dataclass
class ModuleDelta:
    """One LoRA's change to one host module (a `DeltaSource` for scoring, a `Branch` factory for hooks)."""

    name: str
    module: torch.nn.Module
    shape: tuple[int, ...]  # the layer's logical weight shape (quantized weights store another one)
    parts: list[_Part]

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def in_size(self) -> int:
        return int(torch.Size(self.shape[1:]).numel())

    @property
    def numel(self) -> int:
        return self.out_features * self.in_size

    @property
    def rank(self) -> int:
        """K's factor for this layer: the sum of its parts' rank bounds; full rank when one is unknown."""
        ranks = [p.score_rank for p in self.parts]
        if all(r is not None for r in ranks):
            return sum(r for r in ranks if r is not None)
        return min(self.out_features, self.in_size)

    @property
    def stem(self) -> str:
        return self.name

    @property
    def has_dense(self) -> bool:
        """Whether a part has no plain factors: its ΔW came from the host's merge (LoHa, LoKr, DoRA...)."""
        return any(part.dense is not None for part in self.parts)

    def _whole(self) -> _Part | None:
        part = self.parts[0]
        return part if len(self.parts) == 1 and part.size == self.out_features else None

    def factors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        part = self._whole()
        assert part is not None and part.score_factors is not None
        f = part.score_factors
        up = f.up.to(device=device, dtype=torch.float32).reshape(f.up.shape[0], -1) * f.scale
        return up, f.down.to(device=device, dtype=torch.float32).reshape(f.rank, -1)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ΔW K-LoRA scores (a DoRA part by its low-rank update), at strength 1."""
        out = torch.zeros(self.out_features, self.in_size, device=device, dtype=torch.float32)
        for part in self.parts:
            if part.score_factors is not None:
                f = part.score_factors
                up = f.up.to(device=device, dtype=torch.float32).reshape(f.up.shape[0], -1)
                piece = (up @ f.down.to(device=device, dtype=torch.float32).reshape(f.rank, -1)) * f.scale
            else:
                assert part.dense is not None
                piece = part.dense.to(device=device, dtype=torch.float32).reshape(part.size, -1)
            out[part.start : part.start + part.size] += piece
        return out

    def has_factors(self) -> bool:
        part = self._whole()
        return part is not None and part.score_factors is not None

    def branch(self, strength: float, dtype: torch.dtype) -> Branch:
        """The activation-side delta at `strength` (low-rank where possible), in the compute `dtype`."""
        conv = ConvSpec.of(self.module) if isinstance(self.module, torch.nn.Conv2d) else None
        built: list[tuple[LowRankBranch | DenseBranch, int, int]] = []
        for part in self.parts:
            if part.factors is not None:
                f = part.factors
                up, down = f.up.detach().to(dtype), f.down.detach().to(dtype)
                if conv is None:  # (r, in, 1, 1) factors of a linear layer, as some trainers save them
                    up, down = up.reshape(up.shape[0], -1), down.reshape(f.rank, -1)
                branch: LowRankBranch | DenseBranch = LowRankBranch(up, down, strength * f.scale, conv=conv)
            else:
                assert part.dense is not None
                shape = (part.size, *self.shape[1:])
                branch = DenseBranch((part.dense * strength).to(dtype).reshape(shape), conv=conv)
            built.append((branch, part.start, part.size))
        if len(built) == 1 and built[0][2] == self.out_features:
            return built[0][0]
        if conv is not None:
            raise JobError(f"layer {self.name}: partial LoRA patches of a convolution are not supported")
        return SlicedBranch(self.out_features, built)


@dataclass
class _DenseView:
    """A `DeltaSource` without `factors`, so scoring uses the dense ΔW (several parts, or no plain LoRA)."""

    source: ModuleDelta

    @property
    def rank(self) -> int:
        return self.source.rank

    @property
    def numel(self) -> int:
        return self.source.numel

    @property
    def stem(self) -> str:
        return self.source.stem

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.source.delta(device)


def score_sources(deltas: Mapping[str, ModuleDelta]) -> dict[str, ModuleDelta | _DenseView]:
    return {name: d if d.has_factors() else _DenseView(d) for name, d in deltas.items()}


def _patch_parts(value: Any) -> tuple[str | None, tuple]:
    """(type name, weights) of a patch: Forge's ("loha", (...)) tuples or reForge's weight adapters."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return value[0], tuple(value[1])
    name = getattr(value, "name", None)
    if isinstance(name, str) and hasattr(value, "weights"):
        return name, tuple(value.weights)
    return None, ()


def describe_patch(value: Any, part_shape: tuple[int, ...]) -> tuple[LowRankFactors | None, int | None]:
    """`DescribePatch` for Forge's and reForge's patch values (both keep ComfyUI's weight orders):
    ("lora", (up, down, alpha, mid, dora_scale[, reshape])), ("loha", (w1a, w1b, alpha, w2a, w2b, t1, t2,
    dora)), ("lokr", (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora)), ("diff", (weight,)), and reForge's
    "oft"/"boft" adapters ((blocks, rescale, alpha, dora)); Forge does not read OFT layers."""
    kind, w = _patch_parts(value)
    out_features, in_size = int(part_shape[0]), int(torch.Size(part_shape[1:]).numel())
    if kind == "lora" and len(w) >= 5 and w[4] is not None and (len(w) < 6 or w[5] is None):
        up, down, alpha, mid = w[:4]
        alpha = None if alpha is None else float(alpha)
        if mid is None:
            return LowRankFactors(up, down, alpha), None
        folded = LowRankModule(canonical="", stem="", down=down, up=up, mid=mid, alpha=alpha)
        up_scaled, down_folded = folded.factors(up.device)  # alpha/rank inside up, CP core inside down
        return LowRankFactors(
            up_scaled, down_folded.reshape(down_folded.shape[0], *part_shape[1:]), None
        ), None
    if kind == "loha" and len(w) >= 5:
        return None, loha_rank(w[1], w[4], out_features, in_size)
    if kind == "lokr" and len(w) >= 7:
        return None, lokr_rank(w[0], w[4], w[1], w[6], out_features, in_size)
    if kind == "diff":
        return None, full_rank(out_features, in_size)
    if kind in ("oft", "boft"):  # reForge's weight adapters; a rotation of W has no lower bound (oft.py)
        return None, oft_rank(out_features, in_size)
    return None, None


def weight_shape(module: torch.nn.Module, factors: LowRankFactors | None) -> tuple[int, ...] | None:
    """The logical weight shape: a float weight's own, a quantized one's `real_shape` (Forge's GGUF), or,
    for packed 4-bit weights, what an unsliced LoRA's factors imply."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    real = getattr(weight, "real_shape", None)  # Forge's GGUF parameters
    if real is None:
        real = getattr(getattr(weight, "quant_state", None), "shape", None)  # bitsandbytes NF4/FP4
    if real is not None:
        return tuple(int(v) for v in real)
    if weight.is_floating_point() and weight.ndim in (2, 4):
        return tuple(weight.shape)
    if factors is not None and factors.down.ndim == 2:
        return (int(factors.up.shape[0]), int(factors.down.shape[1]))
    return None


def _factors_fit(factors: LowRankFactors, part_shape: tuple[int, ...]) -> bool:
    """up (out, r...) and down (r, in...) must multiply to exactly the patched part of the weight."""
    inputs = int(torch.Size(part_shape[1:]).numel())
    return (
        int(factors.up.shape[0]) == part_shape[0]
        and factors.up[0].numel() == factors.rank
        and factors.down[0].numel() == inputs
    )


def module_deltas(
    patches: Mapping[PatchKey, Any],
    find_module: Callable[[str], torch.nn.Module | None],
    decode: DecodePatch,
    dense: DensePatch,
    *,
    prefix: str = "diffusion_model.",
    describe: DescribePatch | None = None,
) -> tuple[dict[str, ModuleDelta], list[str]]:
    """Group a LoRA's patch dict (host key map output) by module; returns (deltas, skipped keys).

    Only weight patches of modules under `prefix` count; bias, "set" and other patches that are not a
    weight delta are skipped (and reported), as are keys whose module the host model does not have.
    """
    deltas: dict[str, ModuleDelta] = {}
    skipped: list[str] = []
    for key, value in patches.items():
        param, offset = (key, None) if isinstance(key, str) else (key[0], key[1])
        if not (param.startswith(prefix) and param.endswith(".weight")) or (
            not isinstance(key, str) and len(key) > 2 and key[2] is not None
        ):
            skipped.append(str(key))
            continue
        name = param[: -len(".weight")]
        module = find_module(name)
        factors = decode(value)
        shape = weight_shape(module, factors if offset is None else None) if module is not None else None
        if module is None or shape is None:
            skipped.append(str(key))
            continue
        start, size = 0, shape[0]
        if offset is not None:
            dim, start, size = (int(v) for v in offset)
            if dim != 0:
                skipped.append(str(key))
                continue
        part_shape = (size, *shape[1:])
        dense_delta = None
        if factors is not None:
            if not _factors_fit(factors, part_shape):  # e.g. control LoRAs that widen a layer: not a delta
                skipped.append(str(key))
                continue
        else:
            weight = getattr(module, "weight", None)
            if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
                skipped.append(str(key))  # DoRA and friends need the real weight; a quantized one is packed
                continue
            base = weight.detach()[start : start + size].to(torch.float32).reshape(part_shape)
            try:
                merged = dense(value, param, base.clone())
            except Exception:  # a LoRA type the host cannot express as a weight delta ("set", ...)
                skipped.append(str(key))
                continue
            if tuple(merged.shape) != part_shape:
                skipped.append(str(key))
                continue
            dense_delta = merged.to(torch.float32) - base
        scored, rank = (
            describe(value, part_shape) if describe is not None and factors is None else (None, None)
        )
        if scored is not None and not _factors_fit(scored, part_shape):
            scored = None
        entry = deltas.setdefault(name, ModuleDelta(name, module, shape, []))
        entry.parts.append(_Part(factors, dense_delta, start, size, scored, rank))
    return deltas, skipped


@dataclass(kw_only=True)
class PatcherJob(FusionJob):
    """Everything one generation holds on Forge/reForge; lives on `p._klora` and dies with it."""

    deltas: tuple[dict[str, ModuleDelta], dict[str, ModuleDelta]]
    selector: FusionSelector
    hooks: HookSet | None = None
    live: bool = False
    te_patches: tuple[dict, dict] = ({}, {})  # the host's text-encoder patch dicts of both LoRAs

    @property
    def layer_names(self) -> list[str]:
        return [layer.canonical for layer in self.table.layers]


def build_patcher_job(
    first: KLoraParams | None,
    hires: KLoraParams | None,
    deltas: tuple[dict[str, ModuleDelta], dict[str, ModuleDelta]],
    *,
    table: ScoreTable | None = None,
    device: torch.device | str = "cpu",
    should_stop: Callable[[], bool] | None = None,
) -> PatcherJob:
    """Score the shared layers (unless a cached `table` is given) and set up the selector; no hooks yet."""
    params = first or hires
    if params is None:
        raise ValueError("build_patcher_job needs the parameters of at least one pass")
    for name, found in zip((params.subject, params.style), deltas, strict=True):
        if not found:
            raise JobError(
                f"K-LoRA: the WebUI's key map found no layer of the current model in LoRA '{name}' "
                "(another base model, or a format this WebUI cannot read)"
            )
    if table is None:
        with torch.no_grad():
            table = compute_scores(
                [score_sources(d) for d in deltas],
                device=device,
                should_stop=should_stop,
                labels=[params.subject, params.style],
            )
    dynamic = None
    if any(p is not None and p.fusion_method is Method.DYNAMIC for p in (first, hires)):
        dynamic = DynamicSelector.for_params(len(table.layers), params)
    selector = FusionSelector(len(table.layers), dynamic)
    return PatcherJob(params=first, hires_params=hires, table=table, deltas=deltas, selector=selector)


def install(job: PatcherJob, strengths: tuple[float, float]) -> HookSet:
    """(Re)install the job's hooks idempotently: one hook per module either LoRA adapts."""
    remove_hooks(job)
    modules: dict[str, torch.nn.Module] = {}
    branches: dict[str, tuple[Branch | None, Branch | None]] = {}
    names = sorted(set(job.deltas[0]) | set(job.deltas[1]))
    for name in names:
        pair: list[Branch | None] = [None, None]
        for which in (0, 1):
            delta = job.deltas[which].get(name)
            if delta is not None:
                pair[which] = delta.branch(strengths[which], compute_dtype(delta.module))
                modules[name] = delta.module
        branches[name] = (pair[0], pair[1])
    index = {name: i for i, name in enumerate(job.layer_names)}
    job.hooks = install_hooks(
        modules,
        branches,
        job.selector,
        index,
        is_live=lambda: job.live and not job.failed,
        in_place=True,  # the hosts' layer outputs are fresh tensors under inference_mode
    )
    return job.hooks


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype to run a layer's LoRA branch in: `branch_dtype` of its weight, and fp32 where the host
    casts the weight at every forward (Forge's and reForge's manual cast, e.g. an fp16-stored UNet computed
    in fp32): there the stored dtype is not the one the layer computes in."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or _casts_weights(module):
        return torch.float32
    return branch_dtype(weight)


def _casts_weights(module: torch.nn.Module) -> bool:
    """Whether the host casts the layer's weight to its computation dtype at each forward: Forge's
    `ForgeOperations` layers (`parameters_manual_cast`), reForge's `ldm_patched` and ComfyUI's ops."""
    return any(
        bool(getattr(module, flag, False))
        for flag in ("parameters_manual_cast", "ldm_patched_cast_weights", "comfy_cast_weights")
    )


def remove_hooks(job: PatcherJob) -> None:
    job.live = False
    if job.hooks is not None:
        job.hooks.remove()
        job.hooks = None


def on_step(job: PatcherJob, denoiser: Any, is_hires: bool, evals_per_step: int) -> None:
    """Per sampler evaluation: the real step of this pass, and the selector's column for it."""
    params = job.params_for(is_hires)
    if job.failed:
        return
    if params is None or job.hooks is None:
        job.live = False
        return
    new_pass = job.tracker.update(denoiser, int(denoiser.step), int(denoiser.total_steps), evals_per_step)
    label = "hires pass" if is_hires else "first pass"
    if new_pass:
        schedule = None
        if params.fusion_method is Method.DYNAMIC:
            job.selector.begin_dynamic_pass(label, job.tracker.steps)
        else:
            schedule = job.plan_for(params).schedule(job.tracker.steps)
            job.selector.begin_static_pass(schedule.choices)
        if not any(record.label == label for record in job.passes):
            dynamic = job.selector.dynamic if schedule is None else None
            job.passes.append(PassRecord(label, params, schedule, dynamic))
    job.live = True
    job.selector.set_step(job.tracker.step)


def teardown(job: PatcherJob) -> None:
    """End of a job (normal, interrupted or failed): all hooks off. The host's weights were never changed."""
    remove_hooks(job)


def guard_sample(p: Any, job: PatcherJob, on_failure: Callable[[BaseException], None] | None = None) -> None:
    """Make a failing `p.sample` end the job at once: every hook removed."""

    def cleanup(exc: BaseException) -> None:
        teardown(job)
        if on_failure is not None:
            on_failure(exc)

    on_sampling_failure(p, cleanup)
