"""FLUX and SDXL files as their trainers write them, read by the file reader (CLI, plan route).

FLUX: diffusers/ai-toolkit files written by peft + diffusers' FluxPipeline on a tiny FluxTransformer2DModel,
their split q/k/v/MLP layers gathered onto BFL's fused layers as Forge does, must plan exactly like the same
weights in kohya sd-scripts' BFL format (lora_unet_double_blocks_0_img_attn_qkv, ..._single_blocks_0_linear1)
and in XLabs' format (double_blocks.0.processor.qkv_lora1.down.weight). SDXL: a diffusers file with both
text encoders, diffusers' own kohya conversion (lora_te1_/lora_te2_) and kohya's LDM UNet names
(input_blocks_4_1_...) name the same layers and plan alike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_klora.fusion.from_files import plan_from_files
from lib_klora.fusion.plan import PlanSettings
from lib_klora.loras.flux_names import bfl_name, slot_rows
from lib_klora.loras.lora_file import SlicedModule, read_lora_file

STEPS = 12
FLUX_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_mlp",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
]


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers path -> (down, scaled up) as peft computes the layer's ΔW = up @ down."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            down = module.lora_A["default"].weight.detach().clone()
            up = module.lora_B["default"].weight.detach() * module.scaling["default"]
            out[name] = (down, up)
    return out


def _same_plans(first: tuple[Path, Path], second: tuple[Path, Path], cache) -> None:
    plans = [plan_from_files(*pair, PlanSettings(), device="cpu", cache=cache) for pair in (first, second)]
    tables = [plan.table for plan in plans]
    assert [layer.canonical for layer in tables[0].layers] == [layer.canonical for layer in tables[1].layers]
    assert [layer.k for layer in tables[0].layers] == [layer.k for layer in tables[1].layers]
    for ours, theirs in zip(tables[0].layers, tables[1].layers, strict=True):
        assert ours.scores == pytest.approx(theirs.scores, rel=1e-5), ours.canonical
    assert torch.equal(plans[0].schedule(STEPS).choices, plans[1].schedule(STEPS).choices)


# ---------------------------------------------------------------- FLUX


def _flux_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def _bfl_layers(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same weights on BFL's fused layers: split layers become one LoRA of the summed rank whose up is
    block-diagonal at the slices' rows (exactly the same ΔW)."""
    grouped: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
    whole: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, (down, up) in factors.items():
        layer, slot = bfl_name("transformer:" + path.replace(".", "_"))  # type: ignore[misc]
        if slot is None:
            whole[layer] = (down, up)
            continue
        start, _, height = slot_rows(slot, down.shape[1], layer)
        grouped.setdefault(layer, []).append((start, height, down, up))
    for layer, parts in grouped.items():
        height = parts[0][1]
        down = torch.cat([p[2] for p in sorted(parts, key=lambda p: p[0])])
        up = torch.zeros(height, down.shape[0])
        column = 0
        for start, _, part_down, part_up in sorted(parts, key=lambda p: p[0]):
            up[start : start + part_up.shape[0], column : column + part_down.shape[0]] = part_up
            column += part_down.shape[0]
        whole[layer] = (down, up)
    return whole


def _save_kohya(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> Path:
    tensors = {}
    for layer, (down, up) in layers.items():
        stem = "lora_unet_" + layer.removeprefix("unet:")
        tensors[f"{stem}.lora_down.weight"] = down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(float(down.shape[0]))  # scale 1: it is folded into up
    save_file(tensors, str(path), {"ss_base_model_version": "flux1"})
    return path


_XLABS = {
    "img_attn_qkv": "qkv_lora1",
    "img_attn_proj": "proj_lora1",
    "txt_attn_qkv": "qkv_lora2",
    "txt_attn_proj": "proj_lora2",
    "linear2": "proj_lora",
}


def _save_xlabs(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> tuple[Path, dict]:
    """XLabs' processor names for the layers XLabs trains; a single block's qkv_lora is linear1's first
    3·hidden rows. Returns the file and the BFL layers it holds (for the kohya reference)."""
    tensors, kept = {}, {}
    for layer, (down, up) in layers.items():
        m = re.match(r"unet:(double|single)_blocks_(\d+)_(.+)$", layer)
        if m is None:
            continue
        part = m.group(3)
        if part == "linear1":
            hidden = down.shape[1]
            name, up_used = "qkv_lora", up[: 3 * hidden]
            kept[layer] = (down, torch.cat([up_used, torch.zeros(up.shape[0] - 3 * hidden, up.shape[1])]))
        elif part in _XLABS:
            name, up_used = _XLABS[part], up
            kept[layer] = (down, up)
        else:
            continue
        stem = f"{m.group(1)}_blocks.{m.group(2)}.processor.{name}"
        tensors[f"{stem}.down.weight"] = down.contiguous()
        tensors[f"{stem}.up.weight"] = up_used.contiguous()
    save_file(tensors, str(path))
    return path, kept


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("flux")
    files: dict[str, list[Path]] = {"diffusers": [], "kohya": [], "xlabs": [], "kohya-xlabs": []}
    for seed in (1, 2):
        transformer = _flux_transformer()
        config = LoraConfig(r=4, lora_alpha=8, target_modules=FLUX_TARGETS, rank_pattern={"proj_mlp": 2})
        transformer.add_adapter(config)
        _randomize(transformer, seed)
        folder = root / f"diffusers-{seed}"
        FluxPipeline.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            transformer_lora_adapter_metadata=config.to_dict(),
        )
        files["diffusers"].append(folder / "pytorch_lora_weights.safetensors")
        layers = _bfl_layers(_peft_factors(transformer))
        files["kohya"].append(_save_kohya(layers, root / f"kohya-{seed}.safetensors"))
        xlabs, kept = _save_xlabs(layers, root / f"xlabs-{seed}.safetensors")
        files["xlabs"].append(xlabs)
        files["kohya-xlabs"].append(_save_kohya(kept, root / f"kohya-xlabs-{seed}.safetensors"))
    return files


def test_diffusers_flux_reads_onto_bfl_layers_with_slices(flux_files) -> None:
    path = flux_files["diffusers"][0]
    assert json.loads(read_lora_file(path).metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 8
    lora = read_lora_file(path)
    assert lora.architecture == "flux"
    linear1 = lora.modules["unet:single_blocks_0_linear1"]
    assert isinstance(linear1, SlicedModule)
    assert (linear1.out_features, linear1.in_features) == (7 * 32, 32)
    assert linear1.rank == 4 + 4 + 4 + 2  # q, k, v and proj_mlp (rank_pattern), as Forge sums its patches
    assert isinstance(lora.modules["unet:double_blocks_0_img_attn_qkv"], SlicedModule)
    kohya = read_lora_file(flux_files["kohya"][0])
    assert set(kohya.modules) == set(lora.modules) and kohya.architecture == "flux"
    for name, module in lora.modules.items():
        torch.testing.assert_close(module.delta(), kohya.modules[name].delta(), rtol=1e-5, atol=1e-6)


def test_diffusers_flux_plans_like_kohya_bfl(flux_files, cache) -> None:
    _same_plans(tuple(flux_files["diffusers"]), tuple(flux_files["kohya"]), cache)


def test_xlabs_flux_plans_like_kohya_bfl(flux_files, cache) -> None:
    lora = read_lora_file(flux_files["xlabs"][0])
    assert lora.architecture == "flux"
    assert set(lora.modules) == {
        "unet:double_blocks_0_img_attn_qkv",
        "unet:double_blocks_0_img_attn_proj",
        "unet:double_blocks_0_txt_attn_qkv",
        "unet:double_blocks_0_txt_attn_proj",
        "unet:single_blocks_0_linear1",
        "unet:single_blocks_0_linear2",
    }
    _same_plans(tuple(flux_files["xlabs"]), tuple(flux_files["kohya-xlabs"]), cache)


# ---------------------------------------------------------------- SDXL


def _sdxl_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def _text_encoder(cls: type, hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        projection_dim=32,
    )
    return cls(config)


def _ldm_names(key: str) -> str:
    """kohya sd-scripts' SDXL UNet names (LDM layout: three input blocks per level, resnet then attention)."""

    def down(m: re.Match) -> str:
        return f"input_blocks_{3 * int(m.group(1)) + int(m.group(2)) + 1}_1_"

    def up(m: re.Match) -> str:
        return f"output_blocks_{3 * int(m.group(1)) + int(m.group(2))}_1_"

    key = re.sub(r"down_blocks_(\d+)_attentions_(\d+)_", down, key)
    key = re.sub(r"up_blocks_(\d+)_attentions_(\d+)_", up, key)
    return key.replace("mid_block_attentions_0_", "middle_block_1_")


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("sdxl")
    files: dict[str, list[Path]] = {"diffusers": [], "kohya-converted": [], "kohya-ldm": []}
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    text = ["q_proj", "k_proj", "v_proj", "out_proj"]
    for seed in (1, 2):
        unet = _sdxl_unet()
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=attention))
        te1 = _text_encoder(CLIPTextModel, 32)
        te2 = _text_encoder(CLIPTextModelWithProjection, 48)
        layers = {}
        for name, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
            if model is not unet:  # transformers' add_adapter wants a newer peft: peft's own injection
                model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=text), model)
            _randomize(model, seed)
            layers[name] = get_peft_model_state_dict(model)
        folder = root / f"diffusers-{seed}"
        StableDiffusionXLPipeline.save_lora_weights(
            folder,
            unet_lora_layers=layers["unet"],
            text_encoder_lora_layers=layers["text_encoder"],
            text_encoder_2_lora_layers=layers["text_encoder_2"],
        )
        files["diffusers"].append(folder / "pytorch_lora_weights.safetensors")
        prefixed = {f"{component}.{k}": v for component, sd in layers.items() for k, v in sd.items()}
        kohya = convert_state_dict_to_kohya(prefixed)
        files["kohya-converted"].append(root / f"kohya-{seed}.safetensors")
        save_file(kohya, str(files["kohya-converted"][-1]))
        files["kohya-ldm"].append(root / f"kohya-ldm-{seed}.safetensors")
        save_file({_ldm_names(k): v for k, v in kohya.items()}, str(files["kohya-ldm"][-1]))
    return files


def test_sdxl_spellings_name_the_same_layers(sdxl_files) -> None:
    readings = {spelling: read_lora_file(paths[0]) for spelling, paths in sdxl_files.items()}
    names = {spelling: set(lora.modules) for spelling, lora in readings.items()}
    assert names["diffusers"] == names["kohya-converted"] == names["kohya-ldm"]
    assert any(n.startswith("te1:") for n in names["diffusers"])
    assert any(n.startswith("te2:") for n in names["diffusers"])
    assert {lora.architecture for lora in readings.values()} == {"sdxl"}
    ldm_stems = {m.stem for m in readings["kohya-ldm"].modules.values()}
    assert any("input_blocks_4_1_" in stem for stem in ldm_stems)
    for name, module in readings["diffusers"].modules.items():
        torch.testing.assert_close(module.delta(), readings["kohya-ldm"].modules[name].delta())


@pytest.mark.parametrize("spelling", ["kohya-converted", "kohya-ldm"])
def test_sdxl_spellings_plan_alike(sdxl_files, spelling: str, cache) -> None:
    _same_plans(tuple(sdxl_files["diffusers"]), tuple(sdxl_files[spelling]), cache)
