"""The diffusers front door (`apply_klora`) on tiny random SD, SDXL and FLUX pipelines, and `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from lib_klora.diffusers import apply_klora, pipeline_components
from lib_klora.tools.cli import main as cli_main
from tests.tiny_diffusers import (
    hook_count,
    linear_shapes,
    prompt_embeds,
    reference_png,
    same_state,
    snapshot,
    tiny_flux_pipeline,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
    write_pair,
)

STEPS = 30


def _sd(scheduler=None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(),
        unet=tiny_unet(),
        scheduler=scheduler or EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd() -> StableDiffusionPipeline:
    return _sd()


@pytest.fixture(scope="module")
def sd_pair(sd, tmp_path_factory) -> tuple[Path, Path]:
    shapes = {
        **linear_shapes(sd.unet, "unet"),
        **linear_shapes(sd.text_encoder, "text_encoder", ("self_attn",)),
    }
    return write_pair(tmp_path_factory.mktemp("sd"), shapes)


def _image(pipe, steps: int = STEPS, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a dog",
        num_inference_steps=steps,
        height=16,
        width=16,
        generator=generator,
        output_type="pt",
        **kwargs,
    ).images


def _modules(pipe) -> list[torch.nn.Module]:
    return list(pipeline_components(pipe).values())


@pytest.mark.parametrize(("method", "steps"), [("klora", STEPS), ("dynamic", 8)])
def test_sd_pipeline_fuses_clocked_by_its_scheduler_and_is_restored(sd, sd_pair, method, steps):
    before, base = snapshot(*_modules(sd)), _image(sd, steps)
    with apply_klora(sd, *sd_pair, method=method) as fusion:
        image = _image(sd, steps)
    assert (image - base).abs().max() > 1e-4
    assert fusion.fusion.steps_seen == [list(range(steps))]
    choices, _ = fusion.decisions()
    assert all(len(row) == steps for row in choices)
    assert same_state(before, *_modules(sd)) and hook_count(*_modules(sd)) == 0
    assert "step" not in vars(sd.scheduler) and "set_timesteps" not in vars(sd.scheduler)
    assert torch.equal(_image(sd, steps), base)
    assert fusion.selection_map().size[0] > 0


def test_cfg_batched_or_not_and_second_order_schedulers_make_one_decision_per_step(sd_pair):
    for scheduler, cfg_scale in ((DDIMScheduler(), 1.0), (HeunDiscreteScheduler(), 7.5)):
        pipe = _sd(scheduler)
        calls: list[int] = []
        handle = pipe.unet.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        with apply_klora(pipe, *sd_pair, method="dynamic") as fusion:
            _image(pipe, steps=6, guidance_scale=cfg_scale)
        handle.remove()
        assert fusion.fusion.steps_seen == [list(range(6))]
        assert len(calls) == 6 * pipe.scheduler.order - (pipe.scheduler.order - 1)
        assert bool(fusion.fusion.selector.dynamic.decided(fusion.passes[-1].label).all())


def test_the_plan_is_the_plan_command_s(sd, sd_pair, tmp_path):
    out = tmp_path / "plan.json"
    assert (
        cli_main(
            ["plan", *map(str, sd_pair), "--steps", "12", "--pattern", "s*", "--json", str(out), "--quiet"]
        )
        == 0
    )
    with apply_klora(sd, *sd_pair, pattern="s*") as fusion:
        _image(sd, steps=12)
    choices, labels = fusion.decisions()
    plan = json.loads(out.read_text())["layers"]
    assert [[labels[c] for c in row] for row in choices] == [layer["choices"] for layer in plan]


def test_an_interrupt_inside_a_pipeline_callback_restores_everything(sd, sd_pair):
    before, base = snapshot(*_modules(sd)), _image(sd, steps=4)

    def stop(pipe, step, timestep, kwargs):
        if step == 2:
            raise KeyboardInterrupt
        return kwargs

    with pytest.raises(KeyboardInterrupt), apply_klora(sd, *sd_pair):
        _image(sd, steps=4, callback_on_step_end=stop)
    assert same_state(before, *_modules(sd)) and hook_count(*_modules(sd)) == 0
    assert "step" not in vars(sd.scheduler)
    assert torch.equal(_image(sd, steps=4), base)


def test_reference_guidance_nudges_x0_inside_the_scheduler_step(sd, sd_pair):
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from lib_klora.guidance.run import GuidanceModels

    models = GuidanceModels(None, random_weights=True)
    images = []
    for guidance in (False, True):
        settings = dict(
            guidance=guidance, style_refs=[reference_png()], guidance_decoder="vae", guidance_end=0.5
        )
        with apply_klora(sd, *sd_pair, guidance_models=models, **settings) as fusion:
            images.append(_image(sd, steps=4))
    assert fusion.fusion.guidance is not None and fusion.fusion.guidance.guided == 2
    assert (images[1] - images[0]).abs().max() > 1e-4


def test_sdxl_pipeline_with_both_text_encoders_under_the_policy(tmp_path):
    unet = tiny_unet(sdxl=True)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        text_encoder_2=tiny_text_encoder(with_projection=True),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    assert set(pipeline_components(pipe)) == {"unet", "te1", "te2"}
    shapes = {
        **linear_shapes(unet, "unet"),
        **linear_shapes(pipe.text_encoder, "text_encoder", ("self_attn",)),
        **linear_shapes(pipe.text_encoder_2, "text_encoder_2", ("self_attn",)),
    }
    pair = write_pair(tmp_path, shapes)
    with torch.no_grad():
        base = pipe.encode_prompt("a dog", do_classifier_free_guidance=False)[0]
        embeds = {}
        for policy in ("none", "subject", "both"):
            with apply_klora(pipe, *pair, te_policy=policy) as fusion:
                embeds[policy] = pipe.encode_prompt("a dog", do_classifier_free_guidance=False)[0]
    assert fusion.skipped == []
    width = pipe.text_encoder.config.hidden_size  # the embeds are [te1 | te2] along the channels
    assert torch.equal(embeds["none"], base)
    for policy in ("subject", "both"):
        assert not torch.allclose(embeds[policy][..., :width], base[..., :width])
        assert not torch.allclose(embeds[policy][..., width:], base[..., width:])
    assert not torch.allclose(embeds["subject"], embeds["both"])
    base_image = _image(pipe, steps=5)
    with apply_klora(pipe, *pair, pattern="s") as fusion:
        image = _image(pipe, steps=5)
    assert fusion.fusion.steps_seen == [list(range(5))]
    assert (image - base_image).abs().max() > 1e-4
    assert torch.equal(_image(pipe, steps=5), base_image)


def test_flux_pipeline_clocked_by_the_flow_matching_scheduler(tmp_path):
    pipe = tiny_flux_pipeline()
    transformer = pipe.transformer
    pair = write_pair(tmp_path, linear_shapes(transformer, "transformer"))
    embeds = prompt_embeds()

    def run() -> torch.Tensor:
        return pipe(
            num_inference_steps=8,
            height=16,
            width=16,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **embeds,
        ).images

    before, base = snapshot(transformer), run()
    with apply_klora(pipe, *pair, pattern="s*") as fusion:
        latents = run()
    assert fusion.skipped == []
    assert fusion.fusion.steps_seen == [list(range(8))]
    assert (latents - base).abs().max() > 1e-4
    assert same_state(before, transformer) and hook_count(transformer) == 0
    assert torch.equal(run(), base)


def test_generate_refuses_missing_model_files_without_downloading(sd_pair, tmp_path, capsys):
    code = cli_main(
        [
            "generate",
            *map(str, sd_pair),
            "--model",
            str(tmp_path / "nowhere"),
            "--prompt",
            "x",
            "--steps",
            "5",
        ]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "local files" in message and "--allow-download" in message
    assert cli_main(["generate", *map(str, sd_pair), "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_generate_validates_settings_before_loading(sd_pair, tmp_path, capsys):
    assert cli_main(["generate", *map(str, sd_pair), "--model", "x", "--prompt", "p", "--alpha", "-1"]) == 2
    assert "alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # the CLI's shared --steps rule (argparse error)
        cli_main(["generate", *map(str, sd_pair), "--model", "x", "--prompt", "p", "--steps", "1001"])
    assert refused.value.code == 2 and "1000" in capsys.readouterr().err


def test_generate_from_a_local_diffusers_folder(sd, sd_pair, tmp_path):
    folder = tmp_path / "model"
    sd.save_pretrained(folder)
    out, map_png = tmp_path / "out.png", tmp_path / "map.png"
    args = ["generate", *map(str, sd_pair), "--model", str(folder), "--prompt", "a dog", "--steps", "3"]
    args += ["--width", "16", "--height", "16", "--out", str(out), "--map", str(map_png), "--method", "fixed"]
    assert cli_main(args) == 0
    assert Image.open(out).size == (16, 16) and Image.open(map_png).size[0] > 0
    written = tmp_path / "weights.png"  # the same fusion written into the weights at the switch steps
    assert cli_main([*args, "--apply-to", "weights", "--out", str(written)]) == 0
    hooked, switched = (np.asarray(Image.open(f), dtype=np.int16) for f in (out, written))
    assert np.abs(hooked - switched).max() <= 2  # 8-bit images of (W0 + ΔW)·x and W0·x + ΔW·x
