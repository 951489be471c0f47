"""OFT and BOFT layers: read from kohya-style hand-made files and from files LyCORIS writes, turned into
ΔW given the base weight exactly as AUTOMATIC1111 v1.10.1 does (the reference is the matrix form in
tests/hosts/fake_network_oft.py), K = min(out, in·kh·kw), and refused with an actionable message where no
base weights are given."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_klora.errors import LoraFileError
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import load_score_table, plan_from_files
from lib_klora.fusion.plan import PlanSettings
from lib_klora.fusion.scores import compute_scores
from lib_klora.loras.lora_file import read_lora_file
from lib_klora.loras.oft import BaseWeights, OftModule
from tests.hosts.fake_network_oft import reference_rotated

# base weights of a tiny "UNet": two Linears and a 3x3 conv
SHAPES = {"a": (16, 8), "b": (32, 24), "c": (8, 4, 3, 3)}


def _base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g) * 0.3 for name, shape in SHAPES.items()}


def _lookup(weights: dict[str, torch.Tensor], identity: str = "tiny") -> BaseWeights:
    return BaseWeights(lambda _path, canonical, _stem: weights.get(canonical.removeprefix("unet:")), identity)


def _oft_file(path: Path, seed: int, kind: str, alpha: float | None = 0.01) -> Path:
    """kind: "kohya" (oft_blocks + alpha), "diag" (old LyCORIS oft_diag), "boft" (4-D blocks + rescale)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    blocks_of = {"a": 4, "b": 8, "c": 2}  # block counts
    for name, shape in SHAPES.items():
        out, stem = shape[0], f"lora_unet_{name}"
        if kind == "boft":
            size = 4
            factors = {"a": 2, "b": 3, "c": 2}[name]  # blocks 4, 8, 2: divisible by 2^(m-1)
            tensors[f"{stem}.oft_blocks"] = torch.randn(factors, out // size, size, size, generator=g) * 0.2
            tensors[f"{stem}.rescale"] = 1.0 + torch.randn(out, 1, generator=g) * 0.1
        elif kind == "diag":
            q = torch.randn(blocks_of[name], out // blocks_of[name], out // blocks_of[name], generator=g)
            tensors[f"{stem}.oft_diag"] = torch.linalg.matrix_exp(0.1 * (q - q.transpose(1, 2)))
        else:
            size = out // blocks_of[name]
            tensors[f"{stem}.oft_blocks"] = torch.randn(blocks_of[name], size, size, generator=g) * 0.2
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def _reference_delta(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for name, weight in weights.items():
        stem = f"lora_unet_{name}"
        diag = f"{stem}.oft_diag" in tensors
        alpha = tensors.get(f"{stem}.alpha")
        rotated = reference_rotated(
            weight,
            tensors[f"{stem}.oft_diag" if diag else f"{stem}.oft_blocks"],
            alpha=None if alpha is None else float(alpha),
            stores_rotation=diag,
            rescale=tensors.get(f"{stem}.rescale"),
        )
        out[f"unet:{name}"] = (rotated - weight.double()).reshape(weight.shape[0], -1).float()
    return out


@pytest.mark.parametrize(
    ("kind", "alpha"), [("kohya", 0.01), ("kohya", 100.0), ("kohya", None), ("diag", None), ("boft", 0.02)]
)
def test_delta_is_a1111s_rotation_of_the_base_weight(tmp_path: Path, kind: str, alpha: float | None) -> None:
    path = _oft_file(tmp_path / f"{kind}.safetensors", 1, kind, alpha)
    weights = _base()
    before = {n: w.clone() for n, w in weights.items()}
    lora = read_lora_file(path)
    expected = _reference_delta(path, weights)
    for name, module in lora.modules.items():
        assert isinstance(module, OftModule)
        assert module.format_name == ("BOFT" if kind == "boft" else "OFT")
        bound = module.bind(weights[name.removeprefix("unet:")])
        torch.testing.assert_close(bound.delta(), expected[name], rtol=1e-4, atol=1e-6)
        out, in_size = expected[name].shape
        assert bound.rank == min(out, in_size) and bound.numel == out * in_size
    assert all(torch.equal(weights[n], before[n]) for n in weights)  # the base weight is never written


def test_the_constraint_changes_the_delta_only_when_it_binds(tmp_path: Path) -> None:
    weights = _base()
    loose = read_lora_file(_oft_file(tmp_path / "loose.safetensors", 3, "kohya", 100.0))
    tight = read_lora_file(_oft_file(tmp_path / "tight.safetensors", 3, "kohya", 0.001))
    free = read_lora_file(_oft_file(tmp_path / "free.safetensors", 3, "kohya", None))
    w = weights["b"]
    d_loose, d_tight, d_free = (f.modules["unet:b"].delta_for(w) for f in (loose, tight, free))
    torch.testing.assert_close(d_loose, d_free)
    assert d_tight.norm() < 0.5 * d_free.norm()


def test_plan_without_base_weights_is_refused_with_what_to_do(tmp_path: Path) -> None:
    subject = _oft_file(tmp_path / "oft-subject.safetensors", 1, "kohya")
    style = _oft_file(tmp_path / "boft-style.safetensors", 2, "boft")
    with pytest.raises(LoraFileError) as caught:
        plan_from_files(subject, style, PlanSettings(), device="cpu", cache=ScoreCache())
    message = str(caught.value)
    assert "oft-subject.safetensors" in message
    assert "OFT layer lora_unet_a: its ΔW depends on the base model's weights" in message
    assert "plan --model" in message and "/klora/v1/plan" in message


def test_plan_with_base_weights_scores_the_rotation(tmp_path: Path) -> None:
    subject = _oft_file(tmp_path / "subject.safetensors", 1, "kohya")
    style = _oft_file(tmp_path / "style.safetensors", 2, "boft")
    weights = _base()
    cache = ScoreCache()
    table = load_score_table([subject, style], device="cpu", cache=cache, base_weights=_lookup(weights))

    class Dense:
        def __init__(self, delta: torch.Tensor) -> None:
            self._delta, self.numel = delta, delta.numel()
            self.rank = min(delta.shape)

        def delta(self, device="cpu") -> torch.Tensor:
            return self._delta.to(device)

    expected = compute_scores(
        [{n: Dense(d) for n, d in _reference_delta(p, weights).items()} for p in (subject, style)],
        device="cpu",
    )
    for ours, theirs in zip(table.layers, expected.layers, strict=True):
        assert (ours.canonical, ours.k, ours.ranks) == (theirs.canonical, theirs.k, theirs.ranks)
        assert ours.scores == pytest.approx(theirs.scores, rel=1e-4)
    # the cached scores belong to that model: another model's weights give other scores
    other = load_score_table(
        [subject, style], device="cpu", cache=cache, base_weights=_lookup(_base(9), "other")
    )
    assert other.layers[0].scores != table.layers[0].scores
    again = load_score_table([subject, style], device="cpu", cache=cache, base_weights=_lookup(weights))
    assert again is table


def test_a_model_without_the_layer_or_with_other_rows_is_named(tmp_path: Path) -> None:
    subject = _oft_file(tmp_path / "subject.safetensors", 1, "kohya")
    style = _oft_file(tmp_path / "style.safetensors", 2, "kohya")
    missing = {k: v for k, v in _base().items() if k != "b"}
    with pytest.raises(LoraFileError, match="the model has no layer unet:b"):
        load_score_table([subject, style], device="cpu", cache=ScoreCache(), base_weights=_lookup(missing))
    wrong = _base() | {"b": torch.zeros(40, 24)}
    with pytest.raises(LoraFileError, match=r"rotates 32 output rows; the model's layer has weight of shape"):
        load_score_table([subject, style], device="cpu", cache=ScoreCache(), base_weights=_lookup(wrong))


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"x.oft_blocks": torch.zeros(2, 3, 4)}, "OFT layer lora_unet_x has oft_blocks of shape (2, 3, 4)"),
        ({"x.oft_blocks": torch.zeros(3, 2, 4, 4)}, "BOFT layer lora_unet_x has oft_blocks of shape"),
        ({"x.oft_blocks": torch.zeros(2, 4, 3, 3)}, "need an even block size"),
        ({"x.oft_blocks": torch.zeros(2, 4, 4), "x.rescale": torch.ones(5)}, "rescale with 5 entries for 8"),
        ({"x.rescale": torch.ones(8)}, "OFT layer lora_unet_x has rescale but no oft_blocks"),
        (
            {"x.oft_blocks": torch.zeros(2, 4, 4), "x.hada_w1_a": torch.zeros(8, 2)},
            "two formats in one layer",
        ),
        ({"x.oft_blocks": torch.full((2, 4, 4), float("nan"))}, "NaN or Inf"),
    ],
)
def test_malformed_oft_layers_are_named(tmp_path: Path, tensors: dict, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({f"lora_unet_{k}": v for k, v in tensors.items()}, str(path))
    with pytest.raises(LoraFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_lora_file(path)


# ---------------------------------------------------------------- files LyCORIS writes


lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.to_q = torch.nn.Linear(16, 32)
        self.proj = torch.nn.Linear(32, 16)
        self.conv = torch.nn.Conv2d(8, 16, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _lycoris_file(path: Path, algo: str, seed: int, **options) -> tuple[Path, _Tiny, dict]:
    from lycoris import LycorisNetwork, create_lycoris

    model = _Tiny()
    LycorisNetwork.apply_preset({"target_name": ["to_q", "proj", "conv"]})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1.0, algo=algo, **options)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        library = {
            "unet:" + m.lora_name.removeprefix("lycoris_"): m.get_diff_weight(multiplier=1.0)[0]
            for m in net.loras
        }
    net.save_weights(str(path), torch.float32, {})
    net.restore()
    return path, model, library


LYCORIS_VARIANTS = {
    "diag-oft": {},
    "diag-oft-constrained-rescaled": {"algo": "diag-oft", "constraint": 1e-3, "rescaled": True},
    "boft": {},
    "boft-constrained-rescaled": {"algo": "boft", "constraint": 1e-3, "rescaled": True},
}


@pytest.mark.parametrize("variant", list(LYCORIS_VARIANTS))
def test_lycoris_files_read_as_a1111_applies_them(tmp_path: Path, variant: str) -> None:
    options = dict(LYCORIS_VARIANTS[variant])
    algo = options.pop("algo", variant)
    path, model, library = _lycoris_file(tmp_path / f"{variant}.safetensors", algo, 1, **options)
    layers = {"unet:to_q": model.to_q, "unet:proj": model.proj, "unet:conv": model.conv}
    lora = read_lora_file(path)
    assert set(lora.modules) == set(library)
    expected = _reference_delta_of(path, {n: layers[n].weight.detach() for n in layers})
    for name, module in lora.modules.items():
        assert isinstance(module, OftModule) and module.is_butterfly == algo.startswith("boft")
        delta = module.delta_for(layers[name].weight.detach())
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-6)
        # LyCORIS's own ΔW agrees (its constraint is alpha·out too)
        torch.testing.assert_close(delta, library[name].reshape(delta.shape).float(), rtol=1e-4, atol=1e-6)


def _reference_delta_of(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for name, weight in weights.items():
        stem = "lycoris_" + name.removeprefix("unet:")
        alpha = tensors.get(f"{stem}.alpha")
        rotated = reference_rotated(
            weight,
            tensors[f"{stem}.oft_blocks"],
            alpha=None if alpha is None else float(alpha),
            rescale=tensors.get(f"{stem}.rescale"),
        )
        out[name] = (rotated - weight.double()).reshape(weight.shape[0], -1).float()
    return out


def test_lycoris_pair_plans_with_the_models_weights(tmp_path: Path) -> None:
    subject, model, _ = _lycoris_file(tmp_path / "s.safetensors", "diag-oft", 1, constraint=1e-3)
    style, _, _ = _lycoris_file(tmp_path / "t.safetensors", "boft", 2, rescaled=True)
    layers = {"unet:to_q": model.to_q, "unet:proj": model.proj, "unet:conv": model.conv}
    weights = BaseWeights(lambda _p, canonical, _s: layers[canonical].weight.detach(), "tiny")
    table = load_score_table([subject, style], device="cpu", cache=ScoreCache(), base_weights=weights)
    ks = {layer.canonical: layer.k for layer in table.layers}
    # K = (min(out, in·kh·kw))² for both OFT layers: to_q 16², proj 16², conv min(16, 72)²
    assert ks == {"unet:to_q": 256, "unet:proj": 256, "unet:conv": 256}
    with pytest.raises(LoraFileError, match="depends on the base model's weights"):
        load_score_table([subject, style], device="cpu", cache=ScoreCache())
