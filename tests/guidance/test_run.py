"""GuidanceRun: one job's guidance built from KLoraParams, with randomly initialised real architectures."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")
pytest.importorskip("timm")

from lib_klora.errors import ModelUnavailableError
from lib_klora.guidance.refine import objective
from lib_klora.guidance.run import GuidanceModels, GuidanceRun, guidance_config
from lib_klora.guidance.taesd import TaesdDecoder
from lib_klora.params.model import KLoraParams


def _png(color: tuple[int, int, int], size: int = 40) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def models() -> GuidanceModels:
    return GuidanceModels(None, random_weights=True)


@pytest.fixture(scope="module")
def decoder() -> TaesdDecoder:
    torch.manual_seed(0)
    with torch.no_grad():
        return TaesdDecoder().eval().requires_grad_(False)


def params(**overrides: object) -> KLoraParams:
    values: dict[str, object] = {
        "enabled": True,
        "subject": "dog",
        "style": "ink",
        "guidance": True,
        "style_refs": [_png((230, 20, 20))],
        "subject_refs": [_png((20, 20, 230)), _png((20, 200, 20), 56)],
        "guidance_eta": 0.2,
        "guidance_end": 0.5,
        "guidance_every": 2,
    }
    return KLoraParams(**{**values, **overrides})


def test_builds_the_encoders_its_terms_need_and_embeds_references_once(
    models: GuidanceModels, decoder: TaesdDecoder
) -> None:
    run = GuidanceRun.build(params(), models, decoder.decode)
    assert run.encoders.clip is not None and run.encoders.dino is not None
    assert run.references.style_clip.shape[0] == 1 and run.references.subject_dino.shape[0] == 2
    assert run.references.subject_clip is None  # weight 0 by default: not embedded
    only_style = GuidanceRun.build(params(subject_refs=[]), models, decoder.decode)
    assert only_style.encoders.dino is None  # a missing reference disables its term (and its model)
    assert len(models) == 2  # the CLIP model is shared between runs


def test_apply_respects_window_and_every_k_and_raises_the_objective(
    models: GuidanceModels, decoder: TaesdDecoder
) -> None:
    run = GuidanceRun.build(params(), models, decoder.decode)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    steps = 10
    guided = [step for step in range(steps) if run.apply(x0, 2.0, step, steps) is not x0]
    assert guided == [0, 2, 4]  # window [0, 0.5), every 2nd step
    assert run.guided == 3
    config = guidance_config(params())
    with torch.no_grad():
        before = objective(x0, decoder.decode, run.encoders, run.references, config)
        after = objective(run.apply(x0, 2.0, 0, steps), decoder.decode, run.encoders, run.references, config)
    assert after > before


def test_bad_reference_and_missing_weights_are_clear_errors(tmp_path: Path, decoder: TaesdDecoder) -> None:
    real = GuidanceModels(tmp_path / "klora")  # real weights wanted, none on disk, no hub here
    with pytest.raises(ModelUnavailableError, match=r"open_clip_ViT-B-32_laion2b_s34b_b79k\.safetensors"):
        GuidanceRun.build(params(), real, decoder.decode)


def test_memory_estimate_counts_the_models_it_uses(models: GuidanceModels, decoder: TaesdDecoder) -> None:
    run = GuidanceRun.build(params(), models, decoder.decode)
    sizes = [
        sum(p.numel() * p.element_size() for p in module.parameters())
        for module in (run.encoders.clip.model, run.encoders.dino.model, decoder)
    ]
    assert run.memory_bytes() == 2 * sum(sizes)
