"""Shared stand-in host for the A1111 engine tests: a tiny model, three kohya LoRA files, the fake Lora
extension, and references computed from the LoRA files themselves (never from the engine)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lib_klora.engines.slots import Job, NetworkCache, build_job, on_step
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.plan import StepSchedule
from lib_klora.params.model import KLoraParams
from tests.engines.fused_params import STYLE_STRENGTH, SUBJECT_STRENGTH, fused_params
from tests.hosts.fake_lora_extension import (
    TE_LAYER,
    TE_PATH,
    FakeNetworks,
    TinyModel,
    installed,
    write_kohya_lora,
)


def unet(name: str) -> str:
    return f"diffusion_model_{name}"


A, B, C, D, E = (unet(n) for n in "abcde")
MANAGED = [A, B, C]  # adapted by both LoRAs, in the score table's (natural) order
ALL_LAYERS = [A, B, C, D, E, TE_LAYER]
# Subject gains differ per layer so the layers hand over to the style at different steps.
SUBJECT_LAYERS = {A: 1.6, B: 1.0, C: 0.6, D: 1.0, TE_LAYER: 1.0}  # D: subject only
STYLE_LAYERS = {A: 1.0, B: 1.0, C: 1.0, E: 1.0, TE_LAYER: 1.0}  # E: style only
USER_LAYERS = {A: 1.0, C: 1.0}
USER_STRENGTH = 0.5
SUBJECT_RANK, STYLE_RANK = 4, 2
STEPS = 10
SUBJECT, STYLE, BOTH = 0, 1, 2


@dataclass
class FakeDenoiser:
    """What `on_cfg_denoiser` hands over: A1111's CFGDenoiser counts evaluations in `step`."""

    total_steps: int
    step: int = 0


@dataclass
class Evaluation:
    step: int
    output: torch.Tensor
    merges: list[tuple[str, str]]  # (layer, network) pairs Lora merged during this evaluation's forward
    weights: dict[str, torch.Tensor]


@dataclass
class Host:
    nets: FakeNetworks
    model: TinyModel
    lora_dir: Path
    scores: ScoreCache = field(default_factory=ScoreCache)
    cache: NetworkCache = field(default_factory=NetworkCache)
    pristine: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    inputs: tuple[torch.Tensor, torch.Tensor] = field(init=False)
    base_output: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        for name in ALL_LAYERS:
            layer = self.model.layer(name)
            bias = None if layer.bias is None else layer.bias.detach().clone()
            self.pristine[name] = (layer.weight.detach().clone(), bias)
        generator = torch.Generator().manual_seed(7)
        self.inputs = (torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator))
        with torch.no_grad():
            self.base_output = self.model(*self.inputs)

    def params(self, **overrides: Any) -> KLoraParams:
        return fused_params(**overrides)

    def job(self, first: KLoraParams | None, hires: KLoraParams | None = None, **options: Any) -> Job:
        return build_job(
            self.nets,
            self.cache,
            self.scores,
            self.model,
            first,
            hires,
            device="cpu",
            digest=lambda path: self.scores.digests.digest(Path(path)),
            **options,
        )

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(*self.inputs)

    def weight(self, name: str) -> torch.Tensor:
        return self.model.layer(name).weight.detach().clone()

    def sample(
        self,
        job: Job,
        evaluations: int,
        *,
        is_hires: bool = False,
        evals_per_step: int = 1,
        stop_after: int | None = None,
        denoiser: FakeDenoiser | None = None,
        start: int = 0,
    ) -> list[Evaluation]:
        """Drive one sampler pass (from evaluation `start`, to continue one with the same `denoiser`): per
        evaluation, the cfg-denoiser callback, then one UNet forward."""
        denoiser = denoiser or FakeDenoiser(total_steps=evaluations)
        records = []
        for i in range(start, evaluations if stop_after is None else stop_after):
            denoiser.step = i
            self.nets.calc_updown_calls.clear()
            on_step(job, denoiser, is_hires, evals_per_step)
            output = self.forward()
            weights = {name: self.weight(name) for name in ALL_LAYERS}
            records.append(Evaluation(i, output, list(self.nets.calc_updown_calls), weights))
        return records


# ---------------------------------------------------------------- independent references


def _stem(layer: str) -> str:
    if layer.startswith("diffusion_model_"):
        return "lora_unet_" + layer[len("diffusion_model_") :]
    return "lora_te_" + TE_PATH.replace(".", "_")


def dense_delta(host: Host, lora: str, layer: str, strength: float) -> torch.Tensor:
    """ΔW of `layer` in file `lora`, in the host's arithmetic order (reshape, · alpha/rank, · strength)."""
    tensors = load_file(str(host.lora_dir / f"{lora}.safetensors"))
    stem = _stem(layer)
    up, down = tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.lora_down.weight"]
    alpha, rank = tensors[f"{stem}.alpha"].item(), down.shape[0]
    shape = host.pristine[layer][0].shape
    product = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape)
    return product * (alpha / rank) * strength


def expected_weight(host: Host, layer: str, applied: list[tuple[str, float]]) -> torch.Tensor:
    """Pristine weight plus each (lora, strength) delta, added one after the other as Lora merges them."""
    weight = host.pristine[layer][0].clone()
    for lora, strength in applied:
        weight = weight + dense_delta(host, lora, layer, strength)
    return weight


def slot_deltas(choice: int, params: KLoraParams | None = None) -> list[tuple[str, float]]:
    """(LoRA, strength) merged for a choice, at the fixture's strengths or those of `params`."""
    if params is not None:
        strengths = (params.subject_strength, params.style_strength)
    else:
        strengths = (SUBJECT_STRENGTH, STYLE_STRENGTH)
    subject, style = ("subject", strengths[0]), ("style", strengths[1])
    return {SUBJECT: [subject], STYLE: [style], BOTH: [subject, style]}[choice]


def reference_output(host: Host, params: KLoraParams, choices: list[int]) -> torch.Tensor:
    """TinyModel's forward with every layer merged as the plan says (single-LoRA layers their LoRA, the text
    encoder both), from the files."""
    pairs = zip(MANAGED, choices, strict=True)
    weights = {name: expected_weight(host, name, slot_deltas(choice, params)) for name, choice in pairs}
    weights[D] = expected_weight(host, D, [("subject", params.subject_strength)])
    weights[E] = expected_weight(host, E, [("style", params.style_strength)])
    weights[TE_LAYER] = expected_weight(host, TE_LAYER, slot_deltas(BOTH, params))

    def out(name: str, h: torch.Tensor) -> torch.Tensor:
        bias = host.pristine[name][1]
        if weights[name].ndim == 4:
            return F.conv2d(h, weights[name], bias, padding=1)
        return F.linear(h, weights[name], bias)

    x, text = host.inputs
    h = torch.tanh(out(A, x) + out(TE_LAYER, text))
    h = out(B, h).reshape(-1, 4, 4, 4)
    h = torch.tanh(out(C, h)).flatten(1)
    return out(E, out(D, h))


def switching(schedule: StepSchedule) -> list[str]:
    return [name for name, row in zip(MANAGED, schedule.choices.tolist(), strict=True) if len(set(row)) > 1]


def held_states(schedule: StepSchedule) -> dict[str, int | None]:
    """What each switching layer's weight should hold through the pass, worked out here from the fixture's
    ranks: the plain weight costs the chosen rank every step; holding a LoRA costs both ranks on the steps
    that choose the other one; the cheapest wins, ties stay plain."""
    held: dict[str, int | None] = {}
    for name, row in zip(MANAGED, schedule.choices.tolist(), strict=True):
        if len(set(row)) > 1:
            plain = row.count(SUBJECT) * SUBJECT_RANK + row.count(STYLE) * STYLE_RANK
            hold_subject = row.count(STYLE) * (SUBJECT_RANK + STYLE_RANK)
            hold_style = row.count(SUBJECT) * (SUBJECT_RANK + STYLE_RANK)
            best = min(plain, hold_subject, hold_style)
            held[name] = None if plain == best else SUBJECT if hold_subject == best else STYLE
    return held


def assert_like_merges(
    host: Host, params: KLoraParams, schedule: StepSchedule, records: list[Any], evals_per_step: int = 1
) -> None:
    """Each evaluation gave the merged reference's output; switching layers kept their held state (plain or
    one LoRA merged) all pass long, the rest merged as chosen."""
    held = held_states(schedule)
    for record in records:
        choices = schedule.at(record.step // evals_per_step).tolist()
        want = reference_output(host, params, choices)
        torch.testing.assert_close(record.output, want, rtol=1e-4, atol=1e-4)  # summation order differs
        for name, choice in zip(MANAGED, choices, strict=True):
            if name in held:  # the hook adds what the step needs on top of the held state
                keep = held[name]
                want = expected_weight(host, name, [] if keep is None else slot_deltas(keep, params))
                assert torch.equal(record.weights[name], want), (record.step, name)
            else:
                want = expected_weight(host, name, slot_deltas(choice, params))
                assert torch.equal(record.weights[name], want), (record.step, name)


def expected_choices(job: Job, steps: int) -> StepSchedule:
    assert job.params is not None
    return job.plan_for(job.params).schedule(steps)


def count_restores(host: Host, monkeypatch: Any) -> list[str]:
    """From now on, the layers Lora restores from its backup (a weight rewrite even when nothing is merged
    after it), in order; `monkeypatch` (pytest's) undoes the counting."""
    seen: list[str] = []
    restore = host.nets.network_restore_weights_from_backup

    def counting(module: torch.nn.Module) -> None:
        seen.append(module.network_layer_name)
        restore(module)

    monkeypatch.setattr(host.nets, "network_restore_weights_from_backup", counting)
    return seen


def assert_pristine(host: Host) -> None:
    for name in ALL_LAYERS:
        layer = host.model.layer(name)
        weight, bias = host.pristine[name]
        assert torch.equal(layer.weight, weight), name
        assert bias is None or torch.equal(layer.bias, bias), name


def slots_in(nets: FakeNetworks) -> list[Any]:
    return [net for net in nets.loaded_networks if net.name.startswith("klora:")]


def make_host(tmp_path: Path) -> Iterator[Host]:
    """The stand-in host; the fakes are out of sys.modules again afterwards."""
    model = TinyModel(seed=3)
    lora_dir = tmp_path / "Lora"
    pair = (("subject", SUBJECT_LAYERS, SUBJECT_RANK, 1), ("style", STYLE_LAYERS, STYLE_RANK, 2))
    for name, layers, rank, seed in pair:
        write_kohya_lora(lora_dir / f"{name}.safetensors", model, layers, rank=rank, alpha=2.0, seed=seed)
    write_kohya_lora(lora_dir / "user.safetensors", model, USER_LAYERS, rank=3, alpha=3.0, seed=3)
    before = {name: sys.modules.get(name) for name in ("networks", "network")}
    with installed(model, lora_dir) as nets:
        network_module = sys.modules["network"]
        yield Host(nets, model, lora_dir)
    assert {name: sys.modules.get(name) for name in before} == before  # the fakes are gone again
    assert not hasattr(network_module, "_klora_slot_class")
