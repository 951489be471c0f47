"""One K and one ΔW for OFT/BOFT on every route that applies them: the file reader with the model's weights
(plan route, `plan --model`) and A1111's slot engine through the Lora extension's own OFT module (the CPU
stand-in of tests/hosts/fake_network_oft.py) score alike, so a plan from the file makes the host's choices.
reForge's adapters get the same K from `describe_patch`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lib_klora.engines.network_modules import HostDelta
from lib_klora.engines.patcher import describe_patch
from lib_klora.engines.slots import NetworkCache, build_job, network_base_weights
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import load_score_table
from lib_klora.params.model import KLoraParams
from tests.engines.test_rank_agreement import _assert_agree, _layers
from tests.hosts.fake_lora_extension import TinyModel, installed
from tests.hosts.fake_network_oft import reference_rotated

# TinyModel's UNet layers: a Linear(8, 16), b Linear(16, 64), c Conv2d(4, 4, 3), d Linear(64, 8),
# e Linear(8, 8)
OUT_ROWS = {"a": 16, "b": 64, "c": 4, "d": 8, "e": 8}


def _oft_layers(seed: int, kinds: dict[str, str]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, kind in kinds.items():
        stem, out = f"lora_unet_{name}", OUT_ROWS[name]
        if kind == "oft":  # kohya: blocks of 2 rows, alpha constraint loose enough to matter only on b
            tensors[f"{stem}.oft_blocks"] = torch.randn(out // 2, 2, 2, generator=g) * 0.3
            tensors[f"{stem}.alpha"] = torch.tensor(0.005)
        elif kind == "boft":  # two butterfly factors of 2x2 blocks, rescaled rows
            tensors[f"{stem}.oft_blocks"] = torch.randn(2, out // 2, 2, 2, generator=g) * 0.3
            tensors[f"{stem}.rescale"] = 1.0 + torch.randn(out, 1, generator=g) * 0.1
        elif kind == "oft_diag":
            q = torch.randn(out // 4, 4, 4, generator=g)
            tensors[f"{stem}.oft_diag"] = torch.linalg.matrix_exp(0.2 * (q - q.transpose(1, 2)))
        else:
            tensors.update(_layers(seed, {name: kind}))
    return tensors


def _write(root: Path, kinds: tuple[dict[str, str], dict[str, str]]) -> list[Path]:
    paths = []
    for name, seed, layer_kinds in (("subject", 1, kinds[0]), ("style", 2, kinds[1])):
        path = root / "Lora" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(_oft_layers(seed, layer_kinds), str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    "kinds",
    [
        (
            {"a": "oft", "b": "oft", "c": "oft", "e": "oft"},
            {"a": "boft", "b": "boft", "c": "boft", "e": "lora"},
        ),
        (
            {"a": "oft_diag", "b": "loha", "d": "oft", "e": "boft"},
            {"a": "lokr", "b": "oft", "d": "full", "e": "oft"},
        ),
    ],
)
def test_a1111_scores_oft_layers_as_the_file_reader_with_the_models_weights(tmp_path: Path, kinds) -> None:
    files = _write(tmp_path, kinds)
    model = TinyModel(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with installed(model, files[0].parent) as nets:
        cache = NetworkCache()
        weights = network_base_weights(nets, cache, model, ("subject", "style"))
        reader = load_score_table(files, device="cpu", cache=ScoreCache(), base_weights=weights)
        params = KLoraParams(enabled=True, subject="subject", style="style")
        job = build_job(nets, cache, ScoreCache(), model, params, None, device="cpu", digest=lambda p: p)
        _assert_agree(reader, job.table)
        for net in job.nets:  # the host's own ΔW of an OFT module is the rotation of the layer's weight
            net.unet_multiplier = 1.0
            for name, module in net.modules.items():
                if not hasattr(module, "oft_blocks"):
                    continue
                layer = model.layer(name)
                source = HostDelta(module, layer)
                w = layer.weight.detach()
                expected = reference_rotated(
                    w,
                    module.oft_blocks,
                    alpha=module.alpha,
                    stores_rotation=module.stores_rotation,
                    rescale=module.rescale,
                )
                torch.testing.assert_close(
                    source.delta(), (expected - w.double()).reshape(w.shape[0], -1).float()
                )
                assert source.rank == min(w.shape[0], w[0].numel())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_reforge_oft_adapters_get_the_full_rank_bound() -> None:
    blocks = torch.zeros(4, 4, 4)
    for name, value in (("oft", blocks), ("boft", blocks[None].expand(2, 4, 4, 4))):
        adapter = SimpleNamespace(name=name, weights=(value, None, 0.0, None))
        assert describe_patch(adapter, (16, 8)) == (None, 8)
        assert describe_patch(adapter, (4, 4, 3, 3)) == (None, 4)
