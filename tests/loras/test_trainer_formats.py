"""Files written by the real trainer libraries (peft + diffusers, LyCORIS) on tiny random diffusers models.

For each format: the reader's ΔW equals the library's own, scale included, and a plan from the file makes
the same per-layer choices as the same weights written in plain kohya format.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402

from lib_klora.fusion.from_files import plan_from_files  # noqa: E402
from lib_klora.fusion.plan import PlanSettings  # noqa: E402
from lib_klora.fusion.scores import ScoreTable, compute_scores  # noqa: E402
from lib_klora.loras.lora_file import LowRankModule, read_lora_file  # noqa: E402
from lib_klora.loras.structured import StructuredModule  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
STEPS = 20


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def _randomize(parameters, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _choices(subject: Path, style: Path, cache) -> tuple[torch.Tensor, ScoreTable]:
    plan = plan_from_files(subject, style, PlanSettings(), device="cpu", cache=cache)
    return plan.schedule(STEPS).choices, plan.table


def _kohya_copy(path: Path, modules: dict, out: Path) -> Path:
    """The same weights as a plain kohya LoRA: lora_unet_ names, lora_down/lora_up, an F32 alpha."""
    tensors = {}
    for name, module in modules.items():
        assert isinstance(module, LowRankModule)
        stem = "lora_unet_" + name.split(":", 1)[1]
        tensors[f"{stem}.lora_down.weight"] = module.down.float().contiguous()
        tensors[f"{stem}.lora_up.weight"] = module.up.float().contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(module.scale * module.rank)
    save_file(tensors, str(out))
    return out


def _assert_same_plan(files: tuple[Path, Path], kohya: tuple[Path, Path], cache) -> None:
    choices, table = _choices(*files, cache)
    kohya_choices, kohya_table = _choices(*kohya, cache)
    assert [layer.canonical for layer in table.layers] == [layer.canonical for layer in kohya_table.layers]
    assert [layer.k for layer in table.layers] == [layer.k for layer in kohya_table.layers]
    for ours, theirs in zip(table.layers, kohya_table.layers, strict=True):
        assert ours.scores == pytest.approx(theirs.scores, rel=1e-5)
    assert torch.equal(choices, kohya_choices)


# ---------------------------------------------------------------- peft + diffusers


def _peft_unet(seed: int, config: LoraConfig) -> UNet2DConditionModel:
    unet = tiny_unet()
    unet.add_adapter(config)
    _randomize([p for n, p in unet.named_parameters() if "lora_" in n], seed)
    return unet


def _peft_truth(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """ΔW per module as peft computes it (lora_B @ lora_A · scaling), keyed by diffusers path."""
    truth = {}
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            truth[name] = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * module.scaling["default"]
    return truth


CONFIG = dict(
    r=4,
    lora_alpha=8,
    target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    alpha_pattern={"attn2.to_k": 2},
    rank_pattern={"attn2.to_v": 2},
)


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory) -> dict:
    """subject/style pairs in three spellings, all from the same two peft adapters."""
    root = tmp_path_factory.mktemp("peft")
    out: dict[str, list[Path]] = {"diffusers": [], "kohya-converted": []}
    truths = []
    for seed in (1, 2):
        unet = _peft_unet(seed, LoraConfig(**CONFIG))
        truths.append(_peft_truth(unet))
        layers = get_peft_model_state_dict(unet)
        folder = root / f"diffusers-{seed}"
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
        )
        out["diffusers"].append(folder / "pytorch_lora_weights.safetensors")
        # diffusers' own kohya converter: I64 alphas equal to each layer's rank (it drops lora_alpha).
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in layers.items()})
        path = root / f"kohya-converted-{seed}.safetensors"
        save_file(kohya, str(path))
        out["kohya-converted"].append(path)
    return {**{name: (paths[0], paths[1]) for name, paths in out.items()}, "truths": truths}


def test_diffusers_metadata_scales_match_peft(peft_files) -> None:
    path = peft_files["diffusers"][0]
    metadata = json.loads(read_lora_file(path).metadata["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 8 and metadata["unet.alpha_pattern"] == {"attn2.to_k": 2}
    lora = read_lora_file(path)
    truth = peft_files["truths"][0]
    assert len(lora.modules) == len(truth)
    for name, expected in truth.items():
        module = lora.modules["unet:" + name.replace(".", "_")]
        torch.testing.assert_close(module.delta(), expected.detach(), rtol=1e-5, atol=1e-6)
    ranks = {m.stem.rsplit(".", 1)[-1] + m.stem.split("attn")[-1][:1]: m.rank for m in lora.modules.values()}
    assert ranks["to_v2"] == 2 and ranks["to_v1"] == 4  # rank_pattern, read from the tensor shapes


def test_kohya_converted_file_with_int64_alpha(peft_files) -> None:
    path = peft_files["kohya-converted"][0]
    assert any(t.dtype == torch.int64 for t in load_file(str(path)).values())
    lora = read_lora_file(path)
    truth = peft_files["truths"][0]
    for name, _expected in truth.items():
        module = lora.modules["unet:" + name.replace(".", "_")]
        # the converter stores alpha = rank: scale 1, i.e. peft's ΔW divided by peft's scaling
        assert module.scale == 1.0
        assert module.rank in (2, 4)


@pytest.mark.parametrize("spelling", ["diffusers", "kohya-converted"])
def test_peft_spellings_plan_like_plain_kohya(peft_files, spelling, tmp_path: Path, cache) -> None:
    files = peft_files[spelling]
    kohya = tuple(
        _kohya_copy(f, read_lora_file(f).modules, tmp_path / f"plain-{i}.safetensors")
        for i, f in enumerate(files)
    )
    _assert_same_plan(files, kohya, cache)


def test_peft_dora_magnitude_is_read_and_scored_by_its_low_rank_update(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], use_dora=True)
    unet = _peft_unet(3, config)
    layers = get_peft_model_state_dict(unet)
    assert any("lora_magnitude_vector" in k for k in layers)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    lora = read_lora_file(tmp_path / "pytorch_lora_weights.safetensors")
    for name, expected in _peft_truth(unet).items():
        module = lora.modules["unet:" + name.replace(".", "_")]
        assert module.dora_scale is not None and module.dora_scale.numel() == module.out_features
        torch.testing.assert_close(module.delta(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_prefixed_metadata_alpha_differs_from_rank(tmp_path: Path) -> None:
    """A diffusers file whose lora_alpha ≠ r (the issue's silent wrong scale) and a text-encoder prefix."""
    g = torch.Generator().manual_seed(0)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {
        f"unet.{q}.lora_A.weight": torch.randn(4, 32, generator=g),
        f"unet.{q}.lora_B.weight": torch.randn(32, 4, generator=g),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
            2, 32, generator=g
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
            32, 2, generator=g
        ),
    }
    metadata = {"unet.r": 4, "unet.lora_alpha": 16, "text_encoder.r": 2, "text_encoder.lora_alpha": 1}
    metadata.update({"text_encoder.use_rslora": False})
    save_file(tensors, str(tmp_path / "p.safetensors"), {"lora_adapter_metadata": json.dumps(metadata)})
    lora = read_lora_file(tmp_path / "p.safetensors")
    assert lora.modules["unet:" + q.replace(".", "_")].scale == pytest.approx(4.0)
    assert lora.modules["te:text_model_encoder_layers_0_self_attn_q_proj"].scale == pytest.approx(0.5)


# ---------------------------------------------------------------- LyCORIS


ALGOS = {
    "loha": {},
    "loha-tucker": {"algo": "loha", "use_tucker": True},
    "lokr": {"factor": 4},
    "lokr-full": {"algo": "lokr", "factor": 4, "full_matrix": True},
    "lokr-both": {"algo": "lokr", "factor": 16, "decompose_both": True},  # lokr_w1_a / lokr_w1_b
    "lokr-tucker": {"algo": "lokr", "factor": 4, "use_tucker": True},  # lokr_t2 on 3x3 convolutions
    "locon-tucker": {"algo": "locon", "use_tucker": True},
    "full": {},
    "dora": {"algo": "lora", "dora_wd": True},
}


def _lycoris_file(root: Path, variant: str, seed: int) -> tuple[Path, dict[str, torch.Tensor], dict]:
    from lycoris import LycorisNetwork, create_lycoris

    options = dict(ALGOS[variant])
    algo = options.pop("algo", variant)
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D"]})
    unet = tiny_unet()
    net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **options)
    net.apply_to()
    _randomize([p for p in net.parameters()], seed)
    truth, modules = {}, {}
    with torch.no_grad():
        for module in net.loras:
            name = "unet:" + module.lora_name.removeprefix("lycoris_")
            if variant == "dora":  # scored by its low-rank update (see lora_file's docstring)
                up, down = module.lora_up.weight, module.lora_down.weight
                truth[name] = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * module.scale
            elif variant.startswith(("loha", "lokr")):
                # get_weight is what training's forward adds (scale once; lycoris 4.1's get_diff_weight
                # multiplies by the scale a second time)
                diff = module.get_weight(module.shape)
                truth[name] = diff.reshape(diff.shape[0], -1)
            else:
                diff = module.get_diff_weight(multiplier=1.0)[0]
                truth[name] = diff.reshape(diff.shape[0], -1)
            modules[name] = module
    path = root / f"{variant}-{seed}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    net.restore()
    return path, truth, modules


@pytest.fixture(scope="module")
def lycoris_files(tmp_path_factory) -> dict[str, list[tuple[Path, dict, dict]]]:
    root = tmp_path_factory.mktemp("lycoris")
    return {variant: [_lycoris_file(root, variant, seed) for seed in (1, 2)] for variant in ALGOS}


def _expected_rank(variant: str, module, out_f: int, in_f: int) -> int:
    if variant.startswith("loha"):
        bound = module.hada_w1_b.shape[0] * module.hada_w2_b.shape[0]
    elif variant.startswith("lokr"):
        first = module.lokr_w1_b.shape[0] if module.use_w1 is False else min(module.lokr_w1.shape)
        second = (
            module.lokr_w2_b.shape[0]
            if not module.use_w2
            else min(module.lokr_w2.shape[0], module.lokr_w2[0].numel())
        )
        bound = first * second
    elif variant == "full":
        bound = min(out_f, in_f)
    else:
        return module.lora_dim
    return min(bound, out_f, in_f)


@pytest.mark.parametrize("variant", list(ALGOS))
def test_lycoris_delta_and_rank_bound(lycoris_files, variant: str) -> None:
    path, truth, modules = lycoris_files[variant][0]
    keys = set(load_file(str(path)))
    wanted = {"lokr-both": ".lokr_w1_a", "lokr-tucker": ".lokr_t2", "loha-tucker": ".hada_t1"}.get(variant)
    assert wanted is None or any(k.endswith(wanted) for k in keys), variant
    lora = read_lora_file(path)
    assert set(lora.modules) == set(truth)
    expected_type = LowRankModule if variant in ("locon-tucker", "dora") else StructuredModule
    for name, expected in truth.items():
        module = lora.modules[name]
        assert isinstance(module, expected_type)
        torch.testing.assert_close(module.delta(), expected.float(), rtol=1e-4, atol=1e-5)
        out_f, in_f = expected.shape
        assert module.rank == _expected_rank(variant, modules[name], out_f, in_f), name
        if variant == "dora":
            assert module.dora_scale is not None


@pytest.mark.parametrize("variant", list(ALGOS))
def test_lycoris_plan_equals_plan_of_the_library_deltas(lycoris_files, variant: str, cache) -> None:
    """Scores from the file equal scores of the library's own ΔW with K from the rank bound; and the file
    under kohya names (lora_unet_...) plans the same."""
    pair = lycoris_files[variant]
    _, table = _choices(pair[0][0], pair[1][0], cache)

    class Source:
        def __init__(self, delta: torch.Tensor, rank: int) -> None:
            self._delta, self.rank, self.numel = delta.float(), rank, delta.numel()

        def delta(self, device="cpu") -> torch.Tensor:
            return self._delta.to(device)

    sources = []
    for path, truth, _ in pair:
        lora = read_lora_file(path)
        sources.append({n: Source(d, lora.modules[n].rank) for n, d in truth.items()})
    expected = compute_scores(sources, device="cpu")
    for ours, theirs in zip(table.layers, expected.layers, strict=True):
        assert (ours.canonical, ours.k) == (theirs.canonical, theirs.k)
        assert ours.scores == pytest.approx(theirs.scores, rel=1e-4)
    renamed = []
    for index, (path, _, _) in enumerate(pair):
        tensors = {k.replace("lycoris_", "lora_unet_", 1): v for k, v in load_file(str(path)).items()}
        renamed.append(path.with_name(f"kohya-{variant}-{index}.safetensors"))
        save_file(tensors, str(renamed[-1]))
    _assert_same_plan((pair[0][0], pair[1][0]), (renamed[0], renamed[1]), cache)


def test_lycoris_messages_name_the_format(lycoris_files, tmp_path: Path) -> None:
    from lib_klora.errors import LoraFileError

    path = lycoris_files["loha"][0][0]
    tensors = load_file(str(path))
    victim = next(k for k in tensors if k.endswith("hada_w2_b"))
    del tensors[victim]
    broken = tmp_path / "broken-loha.safetensors"
    save_file(tensors, str(broken))
    stem = victim.rsplit(".", 1)[0]
    with pytest.raises(LoraFileError, match=f"LoHa layer {stem} has hada_w2_a but no hada_w2_b"):
        read_lora_file(broken)
    path = lycoris_files["lokr"][0][0]
    tensors = load_file(str(path))
    victim = next(k for k in tensors if k.endswith(("lokr_w1_b", "lokr_w1")))
    del tensors[victim]
    save_file(tensors, str(broken))
    with pytest.raises(LoraFileError, match=r"LoKr layer .* has lokr_w"):
        read_lora_file(broken)


def test_math_of_k_is_capped_at_the_layer(lycoris_files) -> None:
    path, truth, _ = lycoris_files["full"][0]
    module = read_lora_file(path).modules[next(iter(truth))]
    assert module.rank == min(module.out_features, module.in_features)
    assert math.prod(truth[next(iter(truth))].shape) == module.numel
