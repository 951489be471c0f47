from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_klora.errors import IncompatibleLorasError, KLoraError, LoraFileError
from lib_klora.fusion.from_files import plan_from_files
from lib_klora.loras.lora_file import read_lora_file

ATTN_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CANONICAL_Q = "unet:down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _factors(
    out_f: int = 16, in_f: int = 12, rank: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def test_kohya_format_with_alpha_scale(tmp_path: Path) -> None:
    down, up = _factors()
    stem = "lora_unet_" + ATTN_Q.replace(".", "_")
    path = _save(
        tmp_path / "k.safetensors",
        {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)},
    )
    lora = read_lora_file(path)
    module = lora.modules[CANONICAL_Q]
    assert module.stem == stem
    assert module.rank == 4 and module.scale == pytest.approx(0.5)
    torch.testing.assert_close(module.delta(), 0.5 * up @ down)
    assert len(lora.sha256) == 64


def test_diffusers_doubled_unet_prefix_without_alpha(tmp_path: Path) -> None:
    down, up = _factors()
    path = _save(
        tmp_path / "d.safetensors",
        {f"unet.unet.{ATTN_Q}.lora.down.weight": down, f"unet.unet.{ATTN_Q}.lora.up.weight": up},
    )
    module = read_lora_file(path).modules[CANONICAL_Q]
    assert module.scale == 1.0
    torch.testing.assert_close(module.delta(), up @ down)


def test_peft_format_with_alpha_in_metadata(tmp_path: Path) -> None:
    down, up = _factors(rank=8)
    tensors = {
        f"base_model.model.{ATTN_Q}.lora_A.weight": down,
        f"base_model.model.{ATTN_Q}.lora_B.weight": up,
    }
    plain = read_lora_file(_save(tmp_path / "p.safetensors", tensors, {"lora_alpha": "4"}))
    assert plain.modules[CANONICAL_Q].scale == pytest.approx(0.5)
    config = json.dumps({"r": 8, "lora_alpha": 16})
    adapter = read_lora_file(_save(tmp_path / "q.safetensors", tensors, {"lora_adapter_metadata": config}))
    assert adapter.modules[CANONICAL_Q].scale == pytest.approx(2.0)


def test_peft_transformer_prefix(tmp_path: Path) -> None:
    down, up = _factors()
    path = _save(
        tmp_path / "t.safetensors",
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up,
        },
    )
    assert list(read_lora_file(path).modules) == ["transformer:transformer_blocks_0_attn_to_q"]


def test_locon_conv_kernel_and_cp_mid(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    down = torch.randn(4, 8, 3, 3, generator=g)
    up = torch.randn(6, 4, 1, 1, generator=g)
    plain = read_lora_file(
        _save(tmp_path / "c.safetensors", {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up})
    )
    module = plain.modules["unet:down_blocks_0_resnets_0_conv1"]
    assert module.in_features == 8 * 9
    torch.testing.assert_close(module.delta(), up.reshape(6, 4) @ down.reshape(4, -1))

    cp_down = torch.randn(4, 8, 1, 1, generator=g)
    mid = torch.randn(4, 4, 3, 3, generator=g)
    cp = read_lora_file(
        _save(
            tmp_path / "cp.safetensors",
            {
                f"{stem}.lora_down.weight": cp_down,
                f"{stem}.lora_mid.weight": mid,
                f"{stem}.lora_up.weight": up,
            },
        )
    )
    # Reference: the dense 3x3 kernel W[o,i,h,w] = sum_ab up[o,a] mid[a,b,h,w] down[b,i].
    dense = torch.einsum("oa,abhw,bi->oihw", up.reshape(6, 4), mid, cp_down.reshape(4, 8))
    torch.testing.assert_close(cp.modules["unet:down_blocks_0_resnets_0_conv1"].delta(), dense.reshape(6, -1))


def test_kohya_and_diffusers_files_pair_up(lora_pair: tuple[Path, Path]) -> None:
    subject, style = (read_lora_file(p) for p in lora_pair)
    assert set(subject.modules) == set(style.modules)


def test_pickle_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for suffix in (".pt", ".ckpt", ".bin"):
        path = tmp_path / f"evil{suffix}"
        path.write_bytes(pickle.dumps(Payload()))
        with pytest.raises(LoraFileError, match="pickle"):
            read_lora_file(path)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(LoraFileError, match="pickle"):
        read_lora_file(disguised)
    assert not marker.exists()


def _valid_bytes(tmp_path: Path) -> bytes:
    down, up = _factors()
    stem = "lora_unet_" + ATTN_Q.replace(".", "_")
    path = _save(
        tmp_path / "ok.safetensors", {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    )
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ok: b"", "empty"),
        (lambda ok: ok[:5], "truncated"),
        (lambda ok: ok[:-10], "truncated"),
        (lambda ok: struct.pack("<Q", 10) + b"{not json!", "corrupt"),
        (lambda ok: struct.pack("<Q", 1 << 40) + b"{}", "header"),
    ],
    ids=["empty", "tiny", "cut-data", "bad-json", "huge-header"],
)
def test_damaged_files_name_the_file(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(_valid_bytes(tmp_path)))
    with pytest.raises(LoraFileError, match=message) as info:
        read_lora_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_key(tmp_path: Path, bad: float) -> None:
    down, up = _factors()
    up[1, 2] = bad
    key = "lora_unet_x_to_q.lora_up.weight"
    path = _save(tmp_path / "nan.safetensors", {"lora_unet_x_to_q.lora_down.weight": down, key: up})
    with pytest.raises(LoraFileError, match="NaN or Inf") as info:
        read_lora_file(path)
    assert info.value.key == key


def test_rank_mismatch_and_missing_half(tmp_path: Path) -> None:
    down, _ = _factors(rank=4)
    _, up = _factors(rank=5)
    path = _save(
        tmp_path / "m.safetensors",
        {"lora_unet_a_to_q.lora_down.weight": down, "lora_unet_a_to_q.lora_up.weight": up},
    )
    with pytest.raises(LoraFileError, match="shape mismatch"):
        read_lora_file(path)
    half = _save(tmp_path / "h.safetensors", {"lora_unet_a_to_q.lora_down.weight": down})
    with pytest.raises(LoraFileError, match=r"has lora_down\.weight but no lora_up\.weight") as info:
        read_lora_file(half)
    assert info.value.key == "lora_unet_a_to_q.lora_down.weight"


def test_missing_file_and_no_lora_modules(tmp_path: Path) -> None:
    with pytest.raises(LoraFileError, match="not found"):
        read_lora_file(tmp_path / "absent.safetensors")
    path = _save(tmp_path / "none.safetensors", {"model.weight": torch.zeros(2, 2)})
    with pytest.raises(LoraFileError, match="no LoRA"):
        read_lora_file(path)


def test_different_base_architectures_are_refused(tmp_path: Path, cache) -> None:
    down, up = _factors(in_f=768)
    sd1 = _save(
        tmp_path / "sd1.safetensors",
        {"lora_unet_a_attn2_to_k.lora_down.weight": down, "lora_unet_a_attn2_to_k.lora_up.weight": up},
        {"ss_base_model_version": "sd_v1"},
    )
    sdxl = _save(
        tmp_path / "sdxl.safetensors",
        {"lora_unet_a_attn2_to_k.lora_down.weight": down, "lora_unet_a_attn2_to_k.lora_up.weight": up},
        {"ss_base_model_version": "sdxl_base_v1-0"},
    )
    with pytest.raises(IncompatibleLorasError, match="different base models") as info:
        plan_from_files(sd1, sdxl, cache=cache)
    assert "sd1.safetensors" in str(info.value) and "sdxl.safetensors" in str(info.value)


def test_shape_conflict_on_a_shared_layer(tmp_path: Path, cache) -> None:
    a_down, a_up = _factors(in_f=12)
    b_down, b_up = _factors(in_f=20)
    a = _save(
        tmp_path / "a.safetensors",
        {"lora_unet_l_to_q.lora_down.weight": a_down, "lora_unet_l_to_q.lora_up.weight": a_up},
    )
    b = _save(
        tmp_path / "b.safetensors",
        {"lora_unet_l_to_q.lora_down.weight": b_down, "lora_unet_l_to_q.lora_up.weight": b_up},
    )
    with pytest.raises(IncompatibleLorasError, match="different shapes"):
        plan_from_files(a, b, cache=cache)


def test_no_layer_in_common(tmp_path: Path, cache) -> None:
    down, up = _factors()
    a = _save(
        tmp_path / "a.safetensors",
        {"lora_unet_a_to_q.lora_down.weight": down, "lora_unet_a_to_q.lora_up.weight": up},
    )
    b = _save(
        tmp_path / "b.safetensors",
        {"lora_unet_b_to_q.lora_down.weight": down, "lora_unet_b_to_q.lora_up.weight": up},
    )
    with pytest.raises(KLoraError, match="no layer in common"):
        plan_from_files(a, b, cache=cache)


def test_text_encoder_layers_stay_out_of_the_plan(tmp_path: Path, cache) -> None:
    down, up = _factors(in_f=12)
    tensors = {
        "lora_unet_a_to_q.lora_down.weight": down,
        "lora_unet_a_to_q.lora_up.weight": up,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down.clone(),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up.clone(),
    }
    a = _save(tmp_path / "a.safetensors", tensors)
    b = _save(tmp_path / "b.safetensors", {k: v * 2 for k, v in tensors.items()})
    plan = plan_from_files(a, b, cache=cache)
    assert plan.layer_names == ["lora_unet_a_to_q"]
