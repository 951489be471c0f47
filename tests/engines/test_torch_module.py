"""The generic engine (`ModuleFusion`) on tiny random diffusers/transformers models.

Expected deltas are computed here from the LoRA files' tensors (up @ down at the layer's input), and the
expected choices come from `python -m lib_klora plan` run on the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lib_klora.engines.torch_module import FusionError, ModuleFusion, klora_params
from lib_klora.loras.lora_file import read_lora_file
from lib_klora.params.model import ParamsError
from lib_klora.tools.cli import main as cli_main
from lib_klora.tools.synthetic import write_lora
from tests.tiny_diffusers import (
    CROSS_DIM,
    hook_count,
    linear_shapes,
    same_state,
    snapshot,
    tiny_flux,
    tiny_text_encoder,
    tiny_unet,
    write_pair,
)

STEPS = 30
PROBE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_unet()


@pytest.fixture(scope="module")
def pair(unet: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("loras"), linear_shapes(unet, "unet"))


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 5, CROSS_DIM, generator=gen)


def _run(unet: nn.Module, fusion: ModuleFusion, steps: int = STEPS, calls: int = 1) -> list[torch.Tensor]:
    x, ctx = _inputs()
    outs = []
    with torch.no_grad():
        for i in range(steps):
            fusion.step_callback(i, steps)
            for _ in range(calls):
                outs.append(unet(x, 500, ctx).sample)
    return outs


def _base(unet: nn.Module) -> torch.Tensor:
    x, ctx = _inputs()
    with torch.no_grad():
        return unet(x, 500, ctx).sample


@pytest.mark.parametrize("method", ["klora", "merge", "fixed", "random", "dynamic"])
def test_each_method_changes_the_output_and_leaves_the_model_as_it_was(unet, pair, method):
    before, base = snapshot(unet), _base(unet)
    fusion = ModuleFusion({"unet": unet}, *pair, {"method": method})
    with fusion:
        outs = _run(unet, fusion, steps=4)
    assert all((out - base).abs().max() > 1e-3 for out in outs)
    assert same_state(before, unet) and hook_count(unet) == 0
    assert torch.equal(_base(unet), base)
    assert fusion.skipped == []


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "klora", "pattern": "s"},
        {"method": "klora", "pattern": "s*"},
        {"method": "klora", "pattern": "s", "alpha": 3.0, "gamma": "paper", "style_strength": 0.7},
        {"method": "fixed"},
        {"method": "random", "seed": 7},
        {"method": "merge"},
    ],
)
def test_choices_are_those_of_the_plan_command(unet, pair, settings, tmp_path):
    args = ["plan", str(pair[0]), str(pair[1]), "--steps", str(STEPS), "--json", str(tmp_path / "p.json")]
    flags = {"style_strength": "--style-strength"}
    for key, value in settings.items():
        args += [flags.get(key, f"--{key}"), str(value)]
    assert cli_main([*args, "--quiet"]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    fusion = ModuleFusion({"unet": unet}, *pair, settings)
    with fusion:
        _run(unet, fusion, calls=0)  # a precomputed schedule: the clock alone walks it
    choices, labels = fusion.decisions()
    assert fusion.layer_names == [layer["name"] for layer in plan["layers"]]
    assert [[labels[c] for c in row] for row in choices] == [layer["choices"] for layer in plan["layers"]]


def _probe_io(
    unet: nn.Module,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.append(args[0].clone())
        outputs.append(out.clone())

    return inputs, outputs, unet.get_submodule(PROBE).register_forward_hook(record)


def _file_delta(path: Path, x: torch.Tensor) -> torch.Tensor:
    layer = read_lora_file(path).modules["unet:" + PROBE.replace(".", "_")]
    return x @ layer.down.float().T @ layer.up.float().T * layer.scale


def test_the_chosen_lora_delta_is_added_at_each_step(unet, pair):
    fusion = ModuleFusion({"unet": unet}, *pair, {"pattern": "s", "subject_strength": 0.8})
    row = fusion.layer_names.index("base_model.model.unet." + PROBE)
    weight, bias = unet.get_submodule(PROBE).weight, unet.get_submodule(PROBE).bias
    with fusion:
        inputs, outputs, handle = _probe_io(unet)  # registered after the fusion's hook: sees its result
        try:
            _run(unet, fusion, steps=10)
        finally:
            handle.remove()
    choices, _ = fusion.decisions()
    assert set(choices[row]) == {0, 1}, "the probe layer should switch during the run"
    for step, (x, out) in enumerate(zip(inputs, outputs, strict=True)):
        base = torch.nn.functional.linear(x, weight, bias)
        chosen = choices[row][step]
        expected = base + (0.8 if chosen == 0 else 1.0) * _file_delta(pair[chosen], x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("calls", [1, 2])  # batched CFG, or cond and uncond in separate calls
def test_the_clock_is_the_sampler_step_not_the_number_of_calls(unet, pair, calls):
    fusion = ModuleFusion({"unet": unet}, *pair, {"method": "dynamic"})
    counted = []
    handle = unet.register_forward_pre_hook(lambda module, args: counted.append(1))
    try:
        with fusion:
            _run(unet, fusion, calls=calls)
    finally:
        handle.remove()
    assert len(counted) == STEPS * calls
    assert fusion.steps_seen == [list(range(STEPS))]
    choices, _ = fusion.decisions()
    assert len(choices) == len(fusion.layer_names) and all(len(row) == STEPS for row in choices)
    assert bool(fusion.selector.dynamic.decided(fusion.passes[-1].label).all())


def test_a_new_pass_starts_at_step_zero_and_when_the_step_count_changes(unet, pair):
    fusion = ModuleFusion({"unet": unet}, *pair)
    with fusion:
        _run(unet, fusion, steps=3)
        _run(unet, fusion, steps=3)
        _run(unet, fusion, steps=2)
    assert [len(p) for p in fusion.steps_seen] == [3, 3, 2]
    assert [p.label for p in fusion.passes] == ["pass 1", "pass 2", "pass 3"]
    assert fusion.selection_map(0).size[0] > 0


def test_hooks_are_dormant_outside_a_pass_and_the_clock_refuses_misuse(unet, pair):
    base = _base(unet)
    fusion = ModuleFusion({"unet": unet}, *pair)
    with fusion:
        assert torch.equal(_base(unet), base)  # installed, no pass yet
        with pytest.raises(FusionError, match="begin"):
            fusion.step(0)
        fusion.begin(4)
        with pytest.raises(FusionError, match="outside"):
            fusion.step(4)
        assert not torch.equal(_base(unet), base)
        fusion.end()
        assert torch.equal(_base(unet), base)
    with pytest.raises(FusionError, match="1 to 1000"):
        fusion.begin(1001)


def test_exact_restore_after_a_keyboard_interrupt_in_a_step_callback(unet, pair):
    before, base = snapshot(unet), _base(unet)
    fusion = ModuleFusion({"unet": unet}, *pair, {"method": "dynamic"})
    x, ctx = _inputs()
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), fusion:
        for i in range(STEPS):
            fusion.step_callback(i, STEPS)
            unet(x, 500, ctx)
            if i == 3:
                raise KeyboardInterrupt
    assert same_state(before, unet) and hook_count(unet) == 0
    assert torch.equal(_base(unet), base)
    fusion.remove()  # idempotent
    assert not fusion.installed


def test_exact_restore_after_an_exception_in_the_model(unet, pair):
    before, base = snapshot(unet), _base(unet)
    fusion = ModuleFusion({"unet": unet}, *pair)

    def explode(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        raise RuntimeError("out of memory (simulated)")

    x, ctx = _inputs()
    with fusion:
        handle = unet.get_submodule("up_blocks.1.attentions.0.proj_out").register_forward_hook(explode)
        try:
            fusion.step_callback(0, STEPS)
            with pytest.raises(RuntimeError, match="simulated"), torch.no_grad():
                unet(x, 500, ctx)
        finally:
            handle.remove()
    assert same_state(before, unet) and hook_count(unet) == 0
    assert torch.equal(_base(unet), base)


def test_params_are_validated_like_every_other_route(unet, pair):
    with pytest.raises(ParamsError, match="method"):
        ModuleFusion({"unet": unet}, *pair, {"method": "average"})
    with pytest.raises(ParamsError, match="different LoRA"):
        klora_params(pair[0], pair[0])
    with pytest.raises(FusionError, match="none of the layers"):
        ModuleFusion({"transformer": nn.Linear(2, 2)}, *pair)


@pytest.mark.parametrize("policy", ["both", "subject", "style", "none"])
def test_text_encoder_loras_follow_the_policy(tmp_path, policy, unet):
    encoder = tiny_text_encoder()
    shapes = {**linear_shapes(unet, "unet"), **linear_shapes(encoder, "text_encoder", ("self_attn",))}
    pair = write_pair(tmp_path, shapes)
    ids = torch.tensor([[0, 2, 2, 1]])
    with torch.no_grad():
        base = encoder(ids).last_hidden_state
        outs = {}
        for name in ("both", "subject", "style", "none"):
            with ModuleFusion({"unet": unet, "te": encoder}, *pair, {"te_policy": name}):
                outs[name] = encoder(ids).last_hidden_state
    assert torch.equal(encoder(ids).last_hidden_state, base)
    assert torch.equal(outs["none"], base)
    differs = {name: not torch.allclose(out, base) for name, out in outs.items()}
    assert differs == {"both": True, "subject": True, "style": True, "none": False}
    assert not torch.allclose(outs["both"], outs["subject"]) and not torch.allclose(
        outs["subject"], outs["style"]
    )
    assert policy in outs


def _flux_inputs(flux: nn.Module) -> dict:
    gen = torch.Generator().manual_seed(4)
    ids = torch.zeros(4, 3)
    ids[:, 1], ids[:, 2] = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    return dict(
        hidden_states=torch.randn(1, 4, 16, generator=gen),
        encoder_hidden_states=torch.randn(1, 3, CROSS_DIM, generator=gen),
        pooled_projections=torch.randn(1, CROSS_DIM, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=ids,
        txt_ids=torch.zeros(3, 3),
    )


def test_flux_loras_follow_fused_qkv_projections(tmp_path):
    separate, fused = tiny_flux(), tiny_flux()
    fused.fuse_qkv_projections()
    pair = write_pair(tmp_path, linear_shapes(separate, "transformer"))
    inputs = _flux_inputs(separate)
    outs = []
    with torch.no_grad():
        base = fused(**inputs).sample
        for model in (separate, fused):
            fusion = ModuleFusion({"transformer": model}, *pair, {"pattern": "s"})
            with fusion:
                fusion.begin(STEPS)
                fusion.step(20)
                outs.append(model(**inputs).sample)
            assert fusion.skipped == []
        assert torch.equal(fused(**inputs).sample, base)
    assert any(".to_qkv" in key for key in fusion._hooks_plan[0])
    assert (outs[1] - base).abs().max() > 1e-3
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def _bfl_lora(flux: nn.Module, path: Path, rank: int, seed: int) -> Path:
    """A kohya FLUX LoRA in BFL naming: fused img qkv of double block 0 and linear1 of single block 0."""
    gen = torch.Generator().manual_seed(seed)
    inner = flux.inner_dim
    mlp = flux.single_transformer_blocks[0].proj_mlp.out_features
    shapes = {
        "double_blocks_0_img_attn_qkv": (3 * inner, inner),
        "single_blocks_0_linear1": (3 * inner + mlp, inner),
    }
    tensors = {}
    for stem, (out, inp) in shapes.items():
        tensors[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(rank, inp, generator=gen) * 0.3
        tensors[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.3
        tensors[f"lora_unet_{stem}.alpha"] = torch.tensor(float(rank))
    return write_lora(path, tensors)


def test_bfl_flux_loras_split_onto_diffusers_projections(tmp_path):
    flux = tiny_flux()
    pair = (
        _bfl_lora(flux, tmp_path / "s.safetensors", 2, 1),
        _bfl_lora(flux, tmp_path / "t.safetensors", 3, 2),
    )
    fusion = ModuleFusion({"transformer": flux}, *pair, {"method": "merge"})
    assert fusion.skipped == [] and fusion.hooked_modules == 3 + 4
    inner = flux.inner_dim
    to_v = flux.single_transformer_blocks[0].attn.to_v
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    with fusion, torch.no_grad():
        handle = to_v.register_forward_hook(lambda m, a, out: seen.append((a[0].clone(), out.clone())))
        fusion.begin(STEPS)
        flux(**_flux_inputs(flux))
        handle.remove()
    x, out = seen[0]
    expected = torch.nn.functional.linear(x, to_v.weight, to_v.bias)
    for path in pair:  # merge: both deltas, each the v rows of linear1's up factor
        layer = read_lora_file(path).modules["unet:single_blocks_0_linear1"]
        expected = expected + x @ layer.down.T @ layer.up[2 * inner : 3 * inner].T * layer.scale
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("settings", [{"pattern": "s"}, {"pattern": "s*"}, {"method": "merge"}])
def test_weights_mode_computes_what_the_hooks_compute_and_restores_bit_for_bit(unet, pair, settings):
    before, base = snapshot(unet), _base(unet)
    runs = []
    for apply_to in ("activations", "weights"):
        fusion = ModuleFusion({"unet": unet}, *pair, settings, apply_to=apply_to)
        with fusion:
            runs.append(_run(unet, fusion, steps=6))
        assert same_state(before, unet) and hook_count(unet) == 0
    for hooked, written in zip(*runs, strict=True):
        torch.testing.assert_close(written, hooked, rtol=1e-4, atol=1e-4)
    assert torch.equal(_base(unet), base)


def test_weights_mode_restores_after_an_interrupt_and_refuses_dynamic(unet, pair):
    before = snapshot(unet)
    fusion = ModuleFusion({"unet": unet}, *pair, apply_to="weights")
    x, ctx = _inputs()
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), fusion:
        fusion.step_callback(0, STEPS)
        assert not same_state(before, unet)  # written while the pass runs
        unet(x, 500, ctx)
        raise KeyboardInterrupt
    assert same_state(before, unet)
    with pytest.raises(FusionError, match="dynamic"):
        ModuleFusion({"unet": unet}, *pair, {"method": "dynamic"}, apply_to="weights")
