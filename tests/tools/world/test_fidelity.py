"""The fidelity benchmark end to end on a tiny random world: every method runs, deterministically, and the
engine leaves the model exactly as it found it. No test asserts which method wins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lib_klora.tools.synthetic import make_lora_tensors, write_lora  # noqa: E402
from lib_klora.tools.world import fidelity as F  # noqa: E402
from lib_klora.tools.world import render as R  # noqa: E402
from lib_klora.tools.world.encoder import WorldImageEncoder  # noqa: E402
from lib_klora.tools.world.judges import OBJECT_CLASSES, STYLE_CLASSES, Judges, SmallCNN  # noqa: E402
from lib_klora.tools.world.lora import DEFAULT_LORAS  # noqa: E402
from lib_klora.tools.world.model import (  # noqa: E402
    WorldTokenizer,
    build_text_encoder,
    build_unet,
    tiny_config,
)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> F.World:
    torch.manual_seed(0)
    cfg = tiny_config()
    tokenizer = WorldTokenizer()
    unet = build_unet(cfg).eval()
    te = build_text_encoder(cfg, tokenizer).eval()
    # Random LoRAs on the UNet's attention and ff layers, as the world's trainer targets them.
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and ("attn" in name or ".ff." in name)
    }
    folder = tmp_path_factory.mktemp("world")
    files = {}
    for i, spec in enumerate(DEFAULT_LORAS):
        tensors = make_lora_tensors(shapes, spec.rank, seed=i, key_format="kohya", alpha=spec.alpha)
        files[spec.name] = write_lora(folder / f"{spec.name}.safetensors", tensors)
    judges = Judges(SmallCNN(len(OBJECT_CLASSES), 8), SmallCNN(len(STYLE_CLASSES), 8))
    return F.World(unet, te, tokenizer, files, DEFAULT_LORAS, judges, WorldImageEncoder(8))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_every_method_runs_end_to_end_and_is_deterministic(tiny_world: F.World) -> None:
    before = _state(tiny_world.unet)
    kwargs = {"seeds": [1, 2], "steps": 4, "subjects": ("sks",), "styles": ("plk",), "keep_images": 2}
    first = F.run_fidelity(tiny_world, **kwargs)
    second = F.run_fidelity(tiny_world, **kwargs)
    pair = ("sks", "plk")
    assert set(first.per_pair[pair]) == set(F.METHODS)
    for method in F.METHODS:
        a, b = first.images[pair][method], second.images[pair][method]
        assert a.shape == (2, R.SIZE, R.SIZE, 3) and np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)
        score = first.per_pair[pair][method]
        assert 0.0 <= score.both <= min(score.subject, score.style) <= 1.0
    # The fusion changes the image; the model itself is untouched afterwards.
    assert not np.array_equal(first.images[pair]["base"], first.images[pair]["klora_s"])
    assert not np.array_equal(first.images[pair]["klora_s"], first.images[pair]["guided"])
    after = tiny_world.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert first.maps[pair].size[0] > 0
    line = F.result_line(first, world_valid=0.9)
    assert line.startswith("RESULT world_valid=0.900 both_klora=") and "klora_vs_stacked=" in line


def test_the_table_and_the_sheets_name_every_method(tiny_world: F.World, tmp_path: Path) -> None:
    methods = ("base", "stacked", "klora_s")
    result = F.run_fidelity(
        tiny_world, seeds=[3], steps=3, methods=methods, subjects=("zqx",), styles=("jrt",), keep_images=1
    )
    text = F.table(result, methods)
    assert all(f"| {m} |" in text for m in methods)
    (sheet,) = F.save_sheets(result, methods, tmp_path)
    assert sheet.name == "fidelity_zqx_jrt.png" and sheet.stat().st_size > 0


def test_unknown_methods_are_refused_before_any_work(tiny_world: F.World) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        F.run_fidelity(tiny_world, seeds=[1], methods=("klora_s", "magic"))


def test_guidance_moves_the_estimate_and_decodes_world_latents() -> None:
    latent = torch.rand(2, 12, 16, 16) * 2 - 1
    images = F.decode_world_latent(latent)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    refs = F.reference_images("vth", "wmb")
    assert len(refs["subject_refs"]) == len(refs["style_refs"]) == F.REFERENCES_PER_KIND
