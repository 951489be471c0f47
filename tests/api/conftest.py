"""Live tests against a running WebUI with this extension installed.

Skipped unless KLORA_WEBUI_URL is set (e.g. http://127.0.0.1:7860). The server needs two LoRAs in its
LoRA list, named by KLORA_SUBJECT and KLORA_STYLE (default "subj" and "style"), and should be freshly
started: the first request of the session records the plain reference image that every later plain
generation must reproduce byte for byte.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from typing import Any

import pytest

URL = os.environ.get("KLORA_WEBUI_URL", "").rstrip("/")
SUBJECT = os.environ.get("KLORA_SUBJECT", "subj")
STYLE = os.environ.get("KLORA_STYLE", "style")
TIMEOUT = float(os.environ.get("KLORA_WEBUI_TIMEOUT", "900"))

pytestmark = pytest.mark.skipif(not URL, reason="KLORA_WEBUI_URL is not set")


class Response:
    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body

    def json(self) -> Any:
        return json.loads(self.body)


def call(method: str, path: str, payload: Any = None) -> Response:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        URL + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return Response(response.status, response.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read())


BASE = {
    "prompt": "a photo of a dog",
    "negative_prompt": "",
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 1234,
    "sampler_name": "Euler",
    "cfg_scale": 5,
    "batch_size": 1,
    "n_iter": 1,
}


def txt2img(**overrides: Any) -> dict:
    response = call("POST", "/sdapi/v1/txt2img", {**BASE, **overrides})
    assert response.status == 200, response.body[:500]
    return response.json()


def images(result: dict) -> list[bytes]:
    return [base64.b64decode(image) for image in result["images"]]


def pixels(png: bytes) -> bytes:
    """Decoded pixels: PNG bytes also carry the infotext, which differs when only the prompt text does."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


def drawn(png: bytes, what: str) -> bytes:
    """The decoded pixels of `png`, after checking they are not all one colour: a host whose text encoder or
    UNet overflows returns a black image, and two black images are equal whatever made them."""
    decoded = pixels(png)
    assert decoded != decoded[:3] * (len(decoded) // 3), (
        f"{what}: the host returned an image of one colour (NaN in its text encoder or UNet). Random test "
        f"LoRAs can be too strong for it: the host's own <lora:{SUBJECT}:1> <lora:{STYLE}:1> must give an "
        "image; use weaker ones (ΔW a fraction of the weights it changes, as in trained LoRAs)"
    )
    return decoded


def klora_args(**params: Any) -> dict:
    return {"K-LoRA": {"args": [{"enabled": True, "subject": SUBJECT, "style": STYLE, **params}]}}


def set_option(name: str, value: Any) -> None:
    response = call("POST", "/sdapi/v1/options", {name: value})
    assert response.status == 200, response.body[:500]


@pytest.fixture
def lora_functional() -> Any:
    """Lora's functional mode on for one test, then off again through the options route.

    Not through `override_settings`: A1111 v1.10.1 restores only the overridden options already saved in
    its config (`stored_opts` in `process_images`), so an override of a never-saved `lora_functional`
    stays on for the server's lifetime and turns every later LoRA job functional."""
    set_option("lora_functional", True)
    try:
        yield
    finally:
        set_option("lora_functional", False)


@pytest.fixture(scope="session", autouse=True)
def plain_reference() -> bytes:
    """The plain image of a freshly started server, taken before any K-LoRA job."""
    if not URL:
        pytest.skip("KLORA_WEBUI_URL is not set")
    return images(txt2img())[0]
