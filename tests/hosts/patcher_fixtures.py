"""Shared pieces of the Forge/reForge tests: a tiny host model of the hosts' layer classes, two LoRAs in
Forge's patch format, and the independent references (ΔW from the LoRA tensors, layer outputs from the
pristine weights) that every expectation is computed from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib_klora.dynamic.kl import kl_divergences
from lib_klora.engines import patcher as engine
from lib_klora.engines.patcher import LowRankFactors, PatcherJob, build_patcher_job, module_deltas, on_step
from lib_klora.fusion.plan import FusionPlan, StepSchedule
from lib_klora.params.model import KLoraParams
from tests.engines.fused_params import STYLE_STRENGTH, SUBJECT_STRENGTH, fused_params
from tests.hosts.fake_patcher_hosts import (
    ForgeConv2d,
    ForgeLinear,
    HostModel,
    ReForgeLinear,
    get_attr,
    merge_lora_to_weight,
)

PROJ = "diffusion_model.input_blocks.0.proj"  # Forge Linear 8 -> 16: plain LoRA in both
CONV = "diffusion_model.input_blocks.1.conv"  # Conv2d 4 -> 6, 3x3: LoCon in both
FF = "diffusion_model.middle_block.ff"  # reForge Linear 8 -> 8: subject LoHa (dense), style plain
QKV = "diffusion_model.middle_block.qkv"  # fused Linear 8 -> 24: subject per q/k/v slice, style whole
ONLY_SUBJECT = "diffusion_model.output_blocks.0.proj"
ONLY_STYLE = "diffusion_model.output_blocks.1.proj"
MANAGED = [PROJ, CONV, FF, QKV]  # adapted by both LoRAs, in the score table's (natural) order
ALL_LAYERS = [*MANAGED, ONLY_SUBJECT, ONLY_STYLE]
SHAPES = {
    PROJ: (16, 8),
    CONV: (6, 4, 3, 3),
    FF: (8, 8),
    QKV: (24, 8),
    ONLY_SUBJECT: (8, 16),
    ONLY_STYLE: (8, 8),
}
STRENGTHS = (SUBJECT_STRENGTH, STYLE_STRENGTH)
STEPS = 10
SECOND_CALL_SCALE = -1.0  # another input, for a second call within one step
SUBJECT, STYLE, BOTH = 0, 1, 2
# (kind, gain) per layer. Subject gains differ per layer so the layers hand over at different steps.
SUBJECT_LAYERS = {
    PROJ: ("plain", 1.6),
    CONV: ("locon", 1.0),
    FF: ("loha", 1.0),
    QKV: ("qkv", 1.6),
    ONLY_SUBJECT: ("plain", 1.0),
}
STYLE_LAYERS = {
    PROJ: ("plain", 1.0),
    CONV: ("locon", 3.0),
    FF: ("plain", 1.0),
    QKV: ("plain", 2.0),
    ONLY_STYLE: ("plain", 1.0),
}


# ---------------------------------------------------------------- LoRAs in Forge's patch format


@dataclass
class Part:
    """One patch's raw tensors, kept for the references."""

    kind: str  # "lora" (plain or LoCon), "loha", "mid" (LoCon with a CP core)
    tensors: tuple[torch.Tensor, ...]
    alpha: float
    start: int = 0
    size: int | None = None  # None: the whole output


@dataclass
class FakeLora:
    name: str
    patches: dict[Any, Any] = field(default_factory=dict)
    parts: dict[str, list[Part]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)


def randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def make_lora(
    name: str, layers: dict[str, tuple[str, float]], rank: int, alpha: float, seed: int
) -> FakeLora:
    """Factors with ‖up @ down‖ of the order of `gain`, as Forge's load_lora would return them."""
    g = torch.Generator().manual_seed(seed)
    lora = FakeLora(name)
    for layer, (kind, gain) in layers.items():
        shape = SHAPES[layer]
        out, fan_in = shape[0], shape[1]
        key = f"{layer}.weight"
        up_scale, down_scale = gain / rank**0.5, 1.0 / fan_in**0.5
        if kind == "plain":
            up, down = randn(g, out, rank, scale=up_scale), randn(g, rank, fan_in, scale=down_scale)
            lora.patches[key] = ("lora", (up, down, alpha, None, None))
            lora.parts[layer] = [Part("lora", (up, down), alpha)]
            lora.ranks[layer] = rank
        elif kind == "locon":
            kh, kw = shape[2:]
            up = randn(g, out, rank, 1, 1, scale=up_scale)
            down = randn(g, rank, fan_in, kh, kw, scale=down_scale / 3)
            lora.patches[key] = ("lora", (up, down, alpha, None, None))
            lora.parts[layer] = [Part("lora", (up, down), alpha)]
            lora.ranks[layer] = rank
        elif kind == "qkv":  # FLUX: one LoRA per q, k, v of a fused linear
            size = out // 3
            lora.parts[layer] = []
            for start in range(0, out, size):
                up, down = randn(g, size, rank, scale=up_scale), randn(g, rank, fan_in, scale=down_scale)
                lora.patches[(key, (0, start, size))] = ("lora", (up, down, alpha, None, None))
                lora.parts[layer].append(Part("lora", (up, down), alpha, start, size))
            lora.ranks[layer] = 3 * rank
        elif kind == "loha":
            w1a, w1b = randn(g, out, rank, scale=gain**0.5), randn(g, rank, fan_in, scale=down_scale)
            w2a, w2b = randn(g, out, rank, scale=gain**0.5), randn(g, rank, fan_in, scale=down_scale)
            lora.patches[key] = ("loha", (w1a, w1b, alpha, w2a, w2b, None, None, None))
            lora.parts[layer] = [Part("loha", (w1a, w1b, w2a, w2b), alpha)]
            lora.ranks[layer] = min(out, fan_in)  # no plain low-rank form: the engine counts it full rank
        else:
            raise AssertionError(kind)
    return lora


def reference_piece(part: Part) -> torch.Tensor:
    """ΔW of one patch at strength 1, as (outputs, inputs·kh·kw), straight from its tensors."""
    if part.kind == "lora":
        up, down = part.tensors
        rank = down.shape[0]
        return (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)) * (part.alpha / rank)
    if part.kind == "loha":
        w1a, w1b, w2a, w2b = part.tensors
        return (w1a @ w1b) * (w2a @ w2b) * (part.alpha / w1b.shape[0])
    if part.kind == "mid":  # LoCon CP: ΔW[o, i, h, w] = Σ_ab up[o, a] · mid[a, b, h, w] · down[b, i]
        up, mid, down = part.tensors
        rank = down.shape[0]
        product = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
        return product.reshape(up.shape[0], -1) * (part.alpha / rank)
    raise AssertionError(part.kind)


def reference_delta(lora: FakeLora, layer: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The layer's ΔW at strength 1, in the layer's weight shape; rows no patch covers stay 0."""
    shape = shape or SHAPES[layer]
    out = torch.zeros(shape[0], torch.Size(shape[1:]).numel())
    for part in lora.parts[layer]:
        size = shape[0] if part.size is None else part.size
        out[part.start : part.start + size] += reference_piece(part)
    return out.reshape(shape)


def decode(value: Any) -> LowRankFactors | None:
    """The adapter's decode callback for Forge's tuple values (ForgeApi.decode itself: test_forge_adapter)."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "lora":
        up, down, alpha, mid, dora_scale = value[1]
        if mid is None and dora_scale is None:
            return LowRankFactors(up, down, alpha)
    return None


def dense(value: Any, key: str, zeros: torch.Tensor) -> torch.Tensor:
    """The adapter's dense callback: the host's own merge onto zeros; a patch that is no delta raises."""
    if value[0] not in ("lora", "loha", "diff"):
        raise ValueError(f"{value[0]} is not a weight delta")
    return merge_lora_to_weight([[1.0, value, 1.0, None, None]], zeros, key, torch.float32)


# ---------------------------------------------------------------- the host


def place(root: nn.Module, name: str, layer: nn.Module) -> None:
    *parents, leaf = name.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, layer)


def build_model(
    layers: dict[str, nn.Module], seed: int = 3, fused_keys: dict[str, tuple] | None = None
) -> HostModel:
    root = nn.Module()
    for name, layer in layers.items():
        place(root, name, layer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in root.parameters():
            if param.is_floating_point():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return HostModel(root.diffusion_model, fused_keys)


def finder(model: nn.Module) -> Callable[[str], nn.Module | None]:
    def find(name: str) -> nn.Module | None:
        try:
            return get_attr(model, name)
        except AttributeError:
            return None

    return find


def layer_input(name: str, generator: torch.Generator) -> torch.Tensor:
    shape = SHAPES[name]
    if len(shape) == 4:
        return torch.randn(2, shape[1], 6, 6, generator=generator)
    return torch.randn(2, 5, shape[1], generator=generator)


def apply_delta(x: torch.Tensor, delta_w: torch.Tensor) -> torch.Tensor:
    """A ΔW's contribution to a layer output (Linear, or the 3x3 padding-1 conv of this model)."""
    if delta_w.ndim == 4:
        return F.conv2d(x, delta_w, padding=1)
    return F.linear(x, delta_w)


@dataclass
class FakeDenoiser:
    """What Forge's `on_cfg_denoiser` hands over: `step` counts evaluations of this pass."""

    total_steps: int
    step: int = 0


@dataclass
class Host:
    model: HostModel
    subject: FakeLora
    style: FakeLora
    inputs: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pristine = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.base = self.outputs()

    def layer(self, name: str) -> nn.Module:
        return get_attr(self.model, name)

    def deltas(self) -> tuple[dict[str, engine.ModuleDelta], dict[str, engine.ModuleDelta]]:
        found = [module_deltas(lora.patches, finder(self.model), decode, dense) for lora in self.loras]
        assert found[0][1] == [] and found[1][1] == []  # nothing skipped
        return found[0][0], found[1][0]

    @property
    def loras(self) -> tuple[FakeLora, FakeLora]:
        return self.subject, self.style

    def params(self, **overrides: Any) -> KLoraParams:
        return fused_params(**overrides)

    def job(self, first: KLoraParams | None, hires: KLoraParams | None = None) -> PatcherJob:
        return build_patcher_job(first, hires, self.deltas(), device="cpu")

    def outputs(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return {name: self.layer(name)(x * scale) for name, x in self.inputs.items()}

    def sample(
        self,
        job: PatcherJob,
        evaluations: int,
        *,
        is_hires: bool = False,
        evals_per_step: int = 1,
        denoiser: FakeDenoiser | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """One sampler pass: per evaluation, the cfg-denoiser callback, then every layer's forward."""
        denoiser = denoiser or FakeDenoiser(total_steps=evaluations)
        records = []
        for i in range(evaluations):
            denoiser.step = i
            on_step(job, denoiser, is_hires, evals_per_step)
            records.append(self.outputs())
        return records

    def expected(self, name: str, applied: list[tuple[FakeLora, float]], scale: float = 1.0) -> torch.Tensor:
        """The plain layer output plus each (LoRA, strength) delta, from the LoRA tensors."""
        x = self.inputs[name] * scale
        out = self.plain(name, x) if scale != 1.0 else self.base[name].clone()
        for lora, strength in applied:
            out = out + apply_delta(x, reference_delta(lora, name) * strength)
        return out

    def plain(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's output from its pristine weights (not through the module, whose hooks may run)."""
        weight, bias = self.pristine[f"{name}.weight"], self.pristine.get(f"{name}.bias")
        if weight.ndim == 4:
            return F.conv2d(x, weight, bias, padding=1)
        return F.linear(x, weight, bias)

    def chosen(self, choice: int) -> list[tuple[FakeLora, float]]:
        subject, style = (self.subject, SUBJECT_STRENGTH), (self.style, STYLE_STRENGTH)
        return {SUBJECT: [subject], STYLE: [style], BOTH: [subject, style]}[choice]

    def hooked(self) -> list[str]:
        return [name for name in ALL_LAYERS if self.layer(name)._forward_hooks]

    def assert_weights_untouched(self) -> None:
        state = self.model.state_dict()
        assert state.keys() == self.pristine.keys()
        for key, value in self.pristine.items():
            assert torch.equal(state[key], value), key


def make_host(fused_keys: dict[str, tuple] | None = None) -> Host:
    model = build_model(
        {
            PROJ: ForgeLinear(8, 16),
            CONV: ForgeConv2d(4, 6, 3, padding=1),
            FF: ReForgeLinear(8, 8),
            QKV: ForgeLinear(8, 24),
            ONLY_SUBJECT: ForgeLinear(16, 8),
            ONLY_STYLE: ForgeLinear(8, 8, bias=False),
        },
        fused_keys=fused_keys,
    )
    subject = make_lora("subject", SUBJECT_LAYERS, rank=4, alpha=2.0, seed=1)
    style = make_lora("style", STYLE_LAYERS, rank=2, alpha=1.0, seed=2)
    generator = torch.Generator().manual_seed(7)
    inputs = {name: layer_input(name, generator) for name in ALL_LAYERS}
    return Host(model, subject, style, inputs)


def close(actual: torch.Tensor, expected: torch.Tensor, what: object = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def schedule_of(job: PatcherJob, params: KLoraParams, steps: int) -> StepSchedule:
    """The plan's schedule for these settings, from plan.py (not the engine) on the job's score table."""
    return FusionPlan(job.table, params.to_plan_settings()).schedule(steps)


def reference_dynamic_choice(host: Host, name: str, scale: float = 1.0) -> int:
    """The KL rule on this layer's plain output and both deltas at their strengths (ties: the subject)."""
    x = host.inputs[name] * scale
    base = host.expected(name, [], scale)
    d_subject = apply_delta(x, reference_delta(host.subject, name) * SUBJECT_STRENGTH)
    d_style = apply_delta(x, reference_delta(host.style, name) * STYLE_STRENGTH)
    div_subject, div_style = kl_divergences(base, d_subject, d_style, channel_dim=1 if x.ndim == 4 else -1)
    gap = abs(float(div_subject) - float(div_style))
    assert gap > 1e-3 * max(float(div_subject), float(div_style)), f"{name}: near-tie, pick other test LoRAs"
    return SUBJECT if div_subject >= div_style else STYLE
