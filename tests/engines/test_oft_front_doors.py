"""OFT/BOFT where there is no WebUI: the generic engine rotates its modules' own weights, and the CLI's
`plan` refuses without a model (naming the file, the layer and `--model`) and plans with `--model`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_klora.engines.torch_module import FusionError, ModuleFusion
from lib_klora.fusion.plan import FusionPlan, PlanSettings
from lib_klora.fusion.scores import compute_scores
from lib_klora.tools.cli import main as cli_main
from tests.engines.test_oft_agreement import _write
from tests.hosts.fake_lora_extension import TinyModel
from tests.hosts.fake_network_oft import reference_rotated

KINDS = (
    {"a": "oft", "b": "oft", "c": "boft", "e": "lora"},
    {"a": "boft", "b": "oft_diag", "c": "oft", "e": "oft"},
)


def _reference_delta(file: Path, stem: str, weight: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    t = load_file(str(file))
    diag = f"{stem}.oft_diag" in t
    alpha = t.get(f"{stem}.alpha")
    rotated = reference_rotated(
        weight,
        t[f"{stem}.oft_diag" if diag else f"{stem}.oft_blocks"],
        alpha=None if alpha is None else float(alpha),
        stores_rotation=diag,
        rescale=t.get(f"{stem}.rescale"),
    )
    return (rotated - weight.double()).float()


def test_generic_engine_adds_the_rotation_of_the_modules_own_weight(tmp_path: Path) -> None:
    files = _write(tmp_path, KINDS)
    unet = TinyModel(seed=3).unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    fusion = ModuleFusion({"unet": unet}, *files, {"method": "merge", "subject_strength": 0.5}, device="cpu")
    x = torch.randn(2, 8)
    with fusion:
        fusion.begin(2)
        fusion.step(0)
        got = unet["a"](x)
        fusion.end()
    w = before["a.weight"]
    delta = 0.5 * _reference_delta(files[0], "lora_unet_a", w) + _reference_delta(files[1], "lora_unet_a", w)
    torch.testing.assert_close(got, F.linear(x, w + delta, before["a.bias"]), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    assert {layer.canonical for layer in fusion.table.layers} == {"unet:a", "unet:b", "unet:c", "unet:e"}
    with pytest.raises(FusionError, match="OFT layer lora_unet_a: apply_to='weights' switches low-rank"):
        ModuleFusion({"unet": unet}, *files, {"method": "merge"}, device="cpu", apply_to="weights")


def test_cli_plan_without_a_model_says_what_to_do(tmp_path: Path, capsys) -> None:
    files = _write(tmp_path, KINDS)
    assert cli_main(["plan", *map(str, files), "--steps", "10", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "subject.safetensors" in err
    assert "OFT layer lora_unet_a: its ΔW depends on the base model's weights" in err
    assert "plan --model" in err


def test_cli_plan_with_a_model_rotates_its_weights(tmp_path: Path, capsys) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from tests.test_diffusers import _sd

    pipe = _sd()
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    layers = {
        path: module
        for path, module in pipe.unet.named_modules()
        if isinstance(module, nn.Linear) and path.endswith(("attn1.to_q", "attn2.to_out.0"))
    }
    files, truth = [], []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for path, module in layers.items():
            stem = "lora_unet_" + path.replace(".", "_")
            tensors[f"{stem}.oft_blocks"] = torch.randn(module.out_features // 4, 4, 4, generator=g) * 0.3
            tensors[f"{stem}.alpha"] = torch.tensor(0.01)
        files.append(tmp_path / f"oft-{seed}.safetensors")
        save_file(tensors, str(files[-1]))
        truth.append(
            {
                "unet:" + path.replace(".", "_"): _reference_delta(
                    files[-1], "lora_unet_" + path.replace(".", "_"), module.weight.detach()
                )
                for path, module in layers.items()
            }
        )
    out_json = tmp_path / "plan.json"
    args = [
        "plan",
        *map(str, files),
        "--steps",
        "10",
        "--quiet",
        "--json",
        str(out_json),
        "--model",
        str(folder),
    ]
    assert cli_main(args) == 0, capsys.readouterr().err

    class Dense:
        def __init__(self, delta: torch.Tensor) -> None:
            self._delta, self.numel, self.rank = delta, delta.numel(), min(delta.shape)

        def delta(self, device="cpu") -> torch.Tensor:
            return self._delta.to(device)

    table = compute_scores([{n: Dense(d) for n, d in t.items()} for t in truth], device="cpu")
    expected = FusionPlan(table, PlanSettings()).to_json(10)
    got = json.loads(out_json.read_text())
    assert got["gamma"] == pytest.approx(expected["gamma"], rel=1e-4)
    assert len(got["layers"]) == len(layers) == len(expected["layers"])
    for ours, theirs in zip(got["layers"], expected["layers"], strict=True):
        assert (ours["k"], ours["choices"]) == (theirs["k"], theirs["choices"])
        assert ours["score_subject"] == pytest.approx(theirs["score_subject"], rel=1e-4)
        assert ours["score_style"] == pytest.approx(theirs["score_style"], rel=1e-4)
