"""Live API tests of method "dynamic" and reference guidance (see conftest.py for how to run them).

Guidance needs its models on the server. With KLORA_LIVE_GUIDANCE=1 the server must have them (real, or
random weights of the same architectures, in models/klora: open_clip_ViT-B-32_laion2b_s34b_b79k.safetensors,
timm_vit_small_patch16_224.dino.safetensors, taesd_decoder.safetensors); without it, a guided request is
expected to end with the clear "what to download, where to put it" message when the models are missing.
"""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

import pytest

from tests.api.conftest import BASE, call, drawn, images, klora_args, pixels, txt2img

GUIDANCE_MODELS = os.environ.get("KLORA_LIVE_GUIDANCE", "") == "1"


def _reference_png(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


STYLE_REF = _reference_png((220, 40, 30))
SUBJECT_REF = _reference_png((20, 60, 200))


def test_dynamic_differs_records_maps_and_restores(plain_reference: bytes) -> None:
    fused = txt2img(alwayson_scripts=klora_args(method="dynamic", show_map=True))
    produced = images(fused)
    assert len(produced) == 2  # the image and its selection map
    klora = images(txt2img(alwayson_scripts=klora_args()))[0]
    assert drawn(produced[0], "dynamic") not in (pixels(plain_reference), drawn(klora, "K-LoRA"))
    info = json.loads(fused["info"])["infotexts"]
    assert "K-LoRA method: dynamic" in info[0] and "dynamic (KL forward" in info[1]
    again = images(txt2img(alwayson_scripts=klora_args(method="dynamic")))[0]
    assert pixels(again) == pixels(produced[0])  # same seed, same decisions
    assert images(txt2img())[0] == plain_reference  # hooks gone, weights restored


def test_dynamic_options_change_decisions_and_tag_matches_dict() -> None:
    by_dict = images(txt2img(alwayson_scripts=klora_args(method="dynamic", kl_direction="symmetric")))[0]
    prompt = BASE["prompt"] + " <klora:{}:{}:method=dynamic:kl_direction=symmetric>"
    from tests.api.conftest import STYLE, SUBJECT

    by_tag = images(txt2img(prompt=prompt.format(SUBJECT, STYLE)))[0]
    assert pixels(by_dict) == pixels(by_tag)


def test_bad_reference_images_are_422() -> None:
    for refs, text in ((["%%%"], "not valid base64"), (["aGVsbG8="], "not a readable image")):
        body = {**BASE, "alwayson_scripts": klora_args(guidance=True, style_refs=refs)}
        response = call("POST", "/sdapi/v1/txt2img", body)
        assert response.status == 422, response.body[:300]
        assert "style_refs" in response.json()["detail"] and text in response.json()["detail"]
    no_refs = call("POST", "/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": klora_args(guidance=True)})
    assert no_refs.status == 422 and "no reference images" in no_refs.json()["detail"]


def _guided(**extra: object) -> Any:
    args = klora_args(guidance=True, style_refs=[STYLE_REF], subject_refs=[SUBJECT_REF], **extra)
    return call("POST", "/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": args})


@pytest.mark.skipif(GUIDANCE_MODELS, reason="the server has the guidance models")
def test_guidance_without_models_says_what_to_download(plain_reference: bytes) -> None:
    response = _guided()
    text = response.body.decode("utf-8", "replace")
    assert response.status != 200 and "K-LoRA guidance" in text and "klora" in text, text[:500]
    assert images(txt2img())[0] == plain_reference


@pytest.mark.skipif(not GUIDANCE_MODELS, reason="set KLORA_LIVE_GUIDANCE=1 when the server has the models")
def test_guidance_nudges_k_diffusion_samplers_and_skips_ddim(plain_reference: bytes) -> None:
    unguided = images(txt2img(alwayson_scripts=klora_args()))[0]
    guided = _guided(guidance_eta=0.3)
    assert guided.status == 200, guided.body[:500]
    guided_image = images(guided.json())[0]
    assert pixels(guided_image) != pixels(unguided)
    assert "K-LoRA guidance: true" in json.loads(guided.json()["info"])["infotexts"][0]
    ddim_plain = images(txt2img(sampler_name="DDIM", alwayson_scripts=klora_args()))[0]
    args = klora_args(guidance=True, style_refs=[STYLE_REF])
    ddim = call("POST", "/sdapi/v1/txt2img", {**BASE, "sampler_name": "DDIM", "alwayson_scripts": args})
    assert ddim.status == 200, ddim.body[:300]
    infotext = json.loads(ddim.json()["info"])["infotexts"][0]
    if call("GET", "/klora/v1/version").json().get("host", "a1111") == "a1111":
        # A1111's timestep samplers pass the noise prediction after CFG: skipped, with a message.
        assert pixels(images(ddim.json())[0]) == pixels(ddim_plain)
        assert "K-LoRA note:" in infotext and "guidance needs a k-diffusion sampler" in infotext
    else:  # Forge/reForge: the post-CFG value is x̂0 for every sampler, DDIM included
        assert pixels(images(ddim.json())[0]) != pixels(ddim_plain)
        assert "K-LoRA note:" not in infotext
    assert images(txt2img())[0] == plain_reference


@pytest.mark.skipif(not GUIDANCE_MODELS, reason="set KLORA_LIVE_GUIDANCE=1 when the server has the models")
def test_guidance_through_the_full_vae(plain_reference: bytes) -> None:
    unguided = images(txt2img(alwayson_scripts=klora_args()))[0]
    guided = _guided(guidance_decoder="vae", guidance_eta=0.3)
    assert guided.status == 200, guided.body[:500]
    assert pixels(images(guided.json())[0]) != pixels(unguided)
    assert "K-LoRA note:" not in json.loads(guided.json()["info"])["infotexts"][0]
    assert images(txt2img())[0] == plain_reference
