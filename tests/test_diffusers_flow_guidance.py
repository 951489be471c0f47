"""Reference guidance on the transformer pipelines (FLUX's packed latents, SD3), and SD3 fusion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import FluxPipeline
from safetensors.torch import save_file

from lib_klora.diffusers import PackedLatents, apply_klora, latent_kind, pipeline_components
from lib_klora.engines.torch_module import FusionError
from lib_klora.errors import ModelUnavailableError
from lib_klora.guidance.taesd import DECODER_FILES, TaesdDecoder
from tests.tiny_diffusers import (
    hook_count,
    linear_shapes,
    prompt_embeds,
    reference_png,
    same_state,
    snapshot,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    write_pair,
)

STEPS = 4  # guidance_end 0.5: steps 0 and 1 are guided


@pytest.fixture(scope="module")
def flux() -> FluxPipeline:
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def flux_pair(flux, tmp_path_factory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("flux"), linear_shapes(flux.transformer, "transformer"))


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from lib_klora.guidance.run import GuidanceModels

    return GuidanceModels(None, random_weights=True)


def _latents(pipe, steps: int = STEPS) -> torch.Tensor:
    return pipe(
        num_inference_steps=steps,
        height=16,
        width=16,
        guidance_scale=1.0,  # SD3: no CFG, so no negative embeds needed
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **prompt_embeds(),
    ).images


def _guided(**extra):
    return {"guidance": True, "style_refs": [reference_png()], "guidance_end": 0.5, **extra}


def _decoder_calls(vae: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    return calls, vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(1))


def test_packed_latents_unpack_as_the_flux_pipeline_does():
    rows, cols, channels = 3, 5, 16
    ids = FluxPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", torch.float32)
    packed = PackedLatents()
    packed.ids = ids
    latents = torch.randn(2, rows * cols, channels * 4)
    expected = FluxPipeline._unpack_latents(latents, rows * 16, cols * 16, 8)
    assert torch.equal(packed.unpack(latents), expected)
    packed.ids = torch.cat([ids, ids + torch.tensor([1.0, 0, 0])])  # Kontext: reference tokens follow
    assert torch.equal(packed.unpack(latents), expected)
    with pytest.raises(FusionError, match="grid"):
        packed.unpack(torch.randn(1, rows * cols - 1, 64))


def test_flux_guidance_nudges_packed_latents_once_per_guided_step_and_restores(flux, flux_pair, models):
    modules = [*pipeline_components(flux).values(), flux.vae]
    before, base = snapshot(*modules), _latents(flux)
    with apply_klora(flux, *flux_pair, guidance_models=models, guidance=False) as plain:
        unguided = _latents(flux)
    calls, handle = _decoder_calls(flux.vae)
    try:
        with apply_klora(
            flux, *flux_pair, guidance_models=models, **_guided(guidance_decoder="vae")
        ) as fusion:
            guided = _latents(flux)
    finally:
        handle.remove()
    assert fusion.fusion.guidance is not None and fusion.fusion.guidance.guided == 2
    assert len(calls) == 2  # one decode per guided step (iters 1)
    assert fusion.fusion.steps_seen == plain.fusion.steps_seen == [list(range(STEPS))]
    assert guided.shape == unguided.shape and (guided - unguided).abs().max() > 1e-4
    assert same_state(before, *modules) and hook_count(*modules) == 0
    assert "step" not in vars(flux.scheduler)
    assert torch.equal(_latents(flux), base)


def test_flux_guidance_reads_taef1_from_the_weights_folder(flux, flux_pair, models, tmp_path):
    assert latent_kind(flux) == "flux"
    folder = {"guidance_models": models, "guidance_weights_dir": tmp_path}
    torch.manual_seed(3)
    save_file(TaesdDecoder(latent_channels=4).state_dict(), str(tmp_path / DECODER_FILES["flux"]))
    images = []
    for guidance in (False, True):
        settings = _guided(guidance=guidance, guidance_decoder="taesd")
        with apply_klora(flux, *flux_pair, **folder, **settings) as fusion:
            images.append(_latents(flux))
    assert fusion.fusion.guidance.guided == 2
    assert (images[1] - images[0]).abs().max() > 1e-4
    save_file(TaesdDecoder(latent_channels=16).state_dict(), str(tmp_path / DECODER_FILES["flux"]))
    with pytest.raises(FusionError, match="16-channel"):
        apply_klora(flux, *flux_pair, **folder, **_guided(guidance_decoder="taesd"))


def test_offline_without_decoder_or_encoder_weights_says_what_to_download(
    flux, flux_pair, tmp_path, monkeypatch
):
    pytest.importorskip("open_clip")
    from lib_klora.guidance.run import GuidanceModels

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "weights"
    with pytest.raises(ModelUnavailableError) as decoder:
        apply_klora(flux, *flux_pair, guidance_weights_dir=empty, **_guided(guidance_decoder="taesd"))
    message = str(decoder.value)
    assert "huggingface.co/madebyollin/taef1" in message and str(empty / DECODER_FILES["flux"]) in message
    with pytest.raises(FusionError, match=DECODER_FILES["flux"]):  # no folder to look in or download to
        apply_klora(
            flux, *flux_pair, guidance_models=GuidanceModels(None), **_guided(guidance_decoder="taesd")
        )
    with pytest.raises(ModelUnavailableError) as encoder:
        apply_klora(flux, *flux_pair, guidance_weights_dir=empty, **_guided(guidance_decoder="vae"))
    assert str(empty) in str(encoder.value)
    assert hook_count(flux.transformer) == 0 and "step" not in vars(flux.scheduler)


def test_sd3_pipeline_fuses_and_guides_its_flow_matching_latents(models, tmp_path):
    pipe = tiny_sd3_pipeline()
    assert latent_kind(pipe) == "sd3" and set(pipeline_components(pipe)) == {"transformer"}
    pair = write_pair(tmp_path, linear_shapes(pipe.transformer, "transformer"))
    before, base = snapshot(pipe.transformer), _latents(pipe)
    with apply_klora(pipe, *pair, guidance_models=models, guidance=False) as plain:
        fused = _latents(pipe)
    with apply_klora(pipe, *pair, guidance_models=models, **_guided(guidance_decoder="vae")) as guided:
        nudged = _latents(pipe)
    assert plain.skipped == [] and plain.fusion.steps_seen == [list(range(STEPS))]
    assert (fused - base).abs().max() > 1e-4 and (nudged - fused).abs().max() > 1e-4
    assert guided.fusion.guidance.guided == 2
    assert same_state(before, pipe.transformer) and hook_count(pipe.transformer, pipe.vae) == 0
    assert torch.equal(_latents(pipe), base)
