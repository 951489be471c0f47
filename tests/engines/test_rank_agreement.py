"""One K for every route: the file reader (CLI, plan route), A1111's slot engine and Forge's patcher engine
score LoHa, LoKr, full, DoRA and LoCon-with-core layers alike, so a plan from the file makes the host's
choices. The hosts are the CPU stand-ins of `tests/hosts/fake_*.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lib_klora.engines.patcher import describe_patch, module_deltas, score_sources
from lib_klora.engines.slots import NetworkCache, build_job
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import load_score_table
from lib_klora.fusion.scores import ScoreTable, compute_scores
from lib_klora.params.model import KLoraParams
from tests.hosts.fake_lora_extension import TinyModel, installed
from tests.hosts.fake_patcher_hosts import (
    HostModel,
    forge_load_lora,
    get_attr,
    merge_lora_to_weight,
    model_lora_keys_unet,
)
from tests.hosts.patcher_fixtures import decode

# TinyModel's UNet layers: a Linear(8, 16), b Linear(16, 64), c Conv2d(4, 4, 3), d Linear(64, 8),
# e Linear(8, 8)


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * 0.3


def _layers(seed: int, kinds: dict[str, str]) -> dict[str, torch.Tensor]:
    """A kohya-named LyCORIS file: each layer of TinyModel in the format `kinds` gives it."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (16, 8), "b": (64, 16), "c": (4, 4, 3, 3), "d": (8, 64), "e": (8, 8)}
    tensors: dict[str, torch.Tensor] = {}
    for name, kind in kinds.items():
        stem = f"lora_unet_{name}"
        out_f, in_size = shapes[name][0], int(torch.Size(shapes[name][1:]).numel())
        if kind == "loha":
            for half, rank in (("1", 2), ("2", 3)):
                tensors[f"{stem}.hada_w{half}_a"] = _randn(g, out_f, rank)
                tensors[f"{stem}.hada_w{half}_b"] = _randn(g, rank, in_size)
            tensors[f"{stem}.alpha"] = torch.tensor(1.0)
        elif kind == "lokr":  # out 16 = 4·4, in 8 = 2·4: w1 full (4, 2), w2 factored rank 2
            tensors[f"{stem}.lokr_w1"] = _randn(g, 4, 2)
            tensors[f"{stem}.lokr_w2_a"] = _randn(g, out_f // 4, 2)
            tensors[f"{stem}.lokr_w2_b"] = _randn(g, 2, in_size // 2)
            tensors[f"{stem}.alpha"] = torch.tensor(4.0)
        elif kind == "lokr-factored":  # both halves factored, rank 1 and 2
            tensors[f"{stem}.lokr_w1_a"] = _randn(g, 4, 1)
            tensors[f"{stem}.lokr_w1_b"] = _randn(g, 1, 2)
            tensors[f"{stem}.lokr_w2_a"] = _randn(g, out_f // 4, 2)
            tensors[f"{stem}.lokr_w2_b"] = _randn(g, 2, in_size // 2)
            tensors[f"{stem}.alpha"] = torch.tensor(1.0)
        elif kind == "full":
            tensors[f"{stem}.diff"] = _randn(g, *shapes[name])
        elif kind in ("lora", "dora"):
            rank = 3
            down_shape = (rank, *shapes[name][1:]) if len(shapes[name]) == 4 else (rank, in_size)
            up_shape = (out_f, rank, 1, 1) if len(shapes[name]) == 4 else (out_f, rank)
            tensors[f"{stem}.lora_down.weight"] = _randn(g, *down_shape)
            tensors[f"{stem}.lora_up.weight"] = _randn(g, *up_shape)
            tensors[f"{stem}.alpha"] = torch.tensor(1.5)
            if kind == "dora":
                tensors[f"{stem}.dora_scale"] = _randn(g, out_f, 1).abs() + 1.0
    return tensors


SUBJECT_KINDS = {"a": "loha", "b": "lokr", "d": "full", "e": "dora"}
STYLE_KINDS = {"a": "lokr", "b": "loha", "d": "lora", "e": "loha"}
FORGE_ONLY = {"a": "lokr-factored", "b": "full", "c": "lora", "e": "dora"}


def _write(tmp_path: Path, kinds: tuple[dict[str, str], dict[str, str]]) -> list[Path]:
    paths = []
    for name, seed, layer_kinds in (("subject", 1, kinds[0]), ("style", 2, kinds[1])):
        path = tmp_path / "Lora" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(_layers(seed, layer_kinds), str(path))
        paths.append(path)
    return paths


def _by_layer(table: ScoreTable) -> dict[str, tuple[int, tuple[int, ...], tuple[float, ...]]]:
    """layer (a, b, ...) -> (K, ranks, scores), whatever the route's naming."""
    out = {}
    for layer in table.layers:
        name = layer.canonical.replace("unet:", "").replace("diffusion_model_", "").split(".")[-1]
        out[name] = (layer.k, layer.ranks, layer.scores)
    return out


def _assert_agree(reader: ScoreTable, host: ScoreTable) -> None:
    ours, theirs = _by_layer(reader), _by_layer(host)
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name][:2] == theirs[name][:2], name
        assert ours[name][2] == pytest.approx(theirs[name][2], rel=1e-5), name


def _forge_table(files: list[Path]) -> ScoreTable:
    model = HostModel(TinyModel(seed=3).unet)

    def find(name: str) -> nn.Module | None:
        try:
            return get_attr(model, name)
        except AttributeError:
            return None

    def dense(value, key, weight):
        return merge_lora_to_weight([[1.0, value, 1.0, None, None]], weight, key, torch.float32)

    deltas = []
    for file in files:
        from safetensors.torch import load_file

        patches, _ = forge_load_lora(load_file(str(file)), model_lora_keys_unet(model))
        found, skipped = module_deltas(patches, find, decode, dense, describe=describe_patch)
        assert not skipped
        deltas.append(found)
    return compute_scores([score_sources(d) for d in deltas], device="cpu")


def test_forge_scores_structured_layers_as_the_file_reader(tmp_path: Path) -> None:
    for index, kinds in enumerate(((SUBJECT_KINDS, STYLE_KINDS), (FORGE_ONLY, SUBJECT_KINDS))):
        files = _write(tmp_path / str(index), kinds)
        reader = load_score_table(files, device="cpu", cache=ScoreCache())
        _assert_agree(reader, _forge_table(files))


def test_forge_k_is_the_product_of_rank_bounds(tmp_path: Path) -> None:
    files = _write(tmp_path, (SUBJECT_KINDS, STYLE_KINDS))
    table = _by_layer(_forge_table(files))
    # a: LoHa 2·3 = 6 vs LoKr min(4, 2)·2 = 4; b: LoKr 2·2 = 4 vs LoHa 6; d: full min(8, 64) = 8 vs LoRA 3;
    # e: DoRA (its LoRA rank) 3 vs LoHa 6 capped at 8
    assert {name: ranks for name, (_, ranks, _) in table.items()} == {
        "a": (6, 4),
        "b": (4, 6),
        "d": (8, 3),
        "e": (3, 6),
    }
    assert table["a"][0] == 24 and table["d"][0] == 24 and table["e"][0] == 18


def test_a1111_scores_structured_layers_as_the_file_reader(tmp_path: Path) -> None:
    kinds = (
        {"a": "loha", "b": "lokr", "c": "full", "d": "full", "e": "dora"},  # DoRA: scored by its factors
        {"a": "lokr", "b": "loha", "c": "lora", "d": "lora", "e": "loha"},
    )
    files = _write(tmp_path, kinds)
    reader = load_score_table(files, device="cpu", cache=ScoreCache())
    model = TinyModel(seed=3)
    with installed(model, files[0].parent) as nets:
        params = KLoraParams(enabled=True, subject="subject", style="style")
        job = build_job(
            nets,
            NetworkCache(),
            ScoreCache(),
            model,
            params,
            None,
            device="cpu",
            digest=lambda path: path,
        )
        _assert_agree(reader, job.table)
    assert "network" not in sys.modules or not hasattr(sys.modules["network"], "_klora_slot_class")


def test_describe_reads_forge_tuples_and_reforge_adapters_alike() -> None:
    """reForge keeps ComfyUI's weight orders in adapter objects (`.name`, `.weights`), Forge in tuples."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    w1, w2_a, w2_b = _randn(g, 4, 2), _randn(g, 4, 2), _randn(g, 2, 4)
    lokr = (w1, None, 2.0, None, None, w2_a, w2_b, None, None)
    loha = (_randn(g, 16, 2), _randn(g, 2, 8), 1.0, _randn(g, 16, 3), _randn(g, 3, 8), None, None, None)
    up, down, magnitude = _randn(g, 16, 3), _randn(g, 3, 8), _randn(g, 16, 1)
    for kind, weights, expected_rank in (("lokr", lokr, 4), ("loha", loha, 6)):
        for value in ((kind, weights), SimpleNamespace(name=kind, weights=weights)):
            assert describe_patch(value, (16, 8)) == (None, expected_rank)
    assert describe_patch(("diff", (_randn(g, 16, 8),)), (16, 8)) == (None, 8)
    for value in (
        ("lora", (up, down, 1.5, None, magnitude)),
        SimpleNamespace(name="lora", weights=(up, down, 1.5, None, magnitude, None)),
    ):
        scored, rank = describe_patch(value, (16, 8))
        assert rank is None and scored is not None and scored.rank == 3 and scored.scale == pytest.approx(0.5)
    assert describe_patch(("set", (_randn(g, 16, 8),)), (16, 8)) == (None, None)


def test_flux_split_layers_score_as_forge_slices_them(tmp_path: Path) -> None:
    """A diffusers FLUX file: the reader gathers to_q/to_k/to_v (and proj_mlp) onto the fused BFL layer;
    Forge's key map patches row slices of that layer. Same K, same scores."""
    from safetensors.torch import load_file

    hidden, rank = 8, 2
    slices = {
        "transformer.transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0, hidden),
        "transformer.transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", hidden, hidden),
        "transformer.transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", 2 * hidden, hidden),
        "transformer.single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", 0, hidden),
        "transformer.single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", 2 * hidden, hidden),
        "transformer.single_transformer_blocks.0.proj_mlp": (
            "single_blocks.0.linear1",
            3 * hidden,
            4 * hidden,
        ),
    }
    files = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for key, (_, _, size) in slices.items():
            tensors[f"{key}.lora_A.weight"] = _randn(g, rank + seed - 1, hidden)
            tensors[f"{key}.lora_B.weight"] = _randn(g, size, rank + seed - 1)
        files.append(tmp_path / f"flux-{seed}.safetensors")
        save_file(tensors, str(files[-1]))
    reader = load_score_table(files, device="cpu", cache=ScoreCache())

    flux = nn.Module()
    flux.double_blocks = nn.ModuleList([nn.Module()])
    flux.double_blocks[0].img_attn = nn.Module()
    flux.double_blocks[0].img_attn.qkv = nn.Linear(hidden, 3 * hidden)
    flux.single_blocks = nn.ModuleList([nn.Module()])
    flux.single_blocks[0].linear1 = nn.Linear(hidden, 7 * hidden)
    fused = {
        key: (f"diffusion_model.{layer}.weight", (0, start, size))
        for key, (layer, start, size) in slices.items()
    }
    model = HostModel(flux, fused)

    def find(name: str) -> nn.Module | None:
        try:
            return get_attr(model, name)
        except AttributeError:
            return None

    deltas = []
    for file in files:
        patches, _ = forge_load_lora(load_file(str(file)), model_lora_keys_unet(model))
        found, skipped = module_deltas(patches, find, decode, lambda *a: None, describe=describe_patch)
        assert not skipped and all(len(d.parts) in (2, 3) for d in found.values())
        deltas.append(found)
    host = compute_scores([score_sources(d) for d in deltas], device="cpu")
    ours = {layer.canonical.removeprefix("unet:"): layer for layer in reader.layers}
    theirs = {
        layer.canonical.removeprefix("diffusion_model.").replace(".", "_"): layer for layer in host.layers
    }
    assert set(ours) == set(theirs) == {"double_blocks_0_img_attn_qkv", "single_blocks_0_linear1"}
    for name, layer in ours.items():
        assert (layer.ranks, layer.k) == (theirs[name].ranks, theirs[name].k), name
        assert layer.scores == pytest.approx(theirs[name].scores, rel=1e-5), name
    assert ours["single_blocks_0_linear1"].ranks == (6, 9)  # three slices of rank 2, and of rank 3
