"""Which TAESD decodes a WebUI model's latents for guidance, and where it comes from (A1111 fakes)."""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lib_klora.errors import KLoraError
from lib_klora.guidance.taesd import DECODER_FILES, TaesdDecoder
from tests.hosts.fake_a1111_webui import KLORA_HOST_MODULES, Callbacks, gradio_stand_in, webui_modules
from tests.hosts.module_swap import swapped_modules

# The model flags the hosts set (A1111: is_sd3/is_sdxl; Forge: FLUX is not a "webui legacy" model).
MODELS = {
    "sd": types.SimpleNamespace(is_sd3=False, is_sdxl=False),
    "sdxl": types.SimpleNamespace(is_sd3=False, is_sdxl=True),
    "sd3": types.SimpleNamespace(is_sd3=True, is_sdxl=False),
    "flux": types.SimpleNamespace(is_sd3=False, is_sdxl=False, is_webui_legacy_model=lambda: False),
}
CHANNELS = {"sd": 4, "sdxl": 4, "sd3": 16, "flux": 16}


class HostPreview(nn.Module):
    """`sd_vae_taesd.TAESDDecoder`: the live-preview decoder, its layers under `decoder.`."""

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.decoder = TaesdDecoder(channels)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Any]:
    """The guidance glue imported against A1111 fakes; `host.previews` are what `decoder_model()` returns by
    latent kind (a missing kind raises, as the host does when it cannot download the file)."""
    previews: dict[str, HostPreview] = {}

    def decoder_model() -> HostPreview:
        kind = glue.latent_kind()
        if kind not in previews:
            raise FileNotFoundError(f"models/VAE-taesd/{DECODER_FILES[kind].replace('.safetensors', '.pth')}")
        return previews[kind]

    fakes = {**webui_modules(tmp_path / "models", Callbacks(), MODELS["sd"]), **gradio_stand_in()}
    fakes["modules.sd_vae_taesd"] = types.ModuleType("modules.sd_vae_taesd")
    fakes["modules.sd_vae_taesd"].decoder_model = decoder_model
    fakes["modules"].sd_vae_taesd = fakes["modules.sd_vae_taesd"]
    with swapped_modules(fakes, KLORA_HOST_MODULES):
        glue = importlib.import_module("lib_klora.hosts.guidance_glue")
        glue.previews, glue.models_dir = previews, tmp_path / "models"
        yield glue


def use_model(host: Any, kind: str) -> None:
    importlib.import_module("modules.shared").sd_model = MODELS[kind]


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_gets_the_taesd_of_its_latents_from_the_hosts_preview(host: Any, kind: str) -> None:
    use_model(host, kind)
    assert host.latent_kind() == kind
    host.previews[kind] = HostPreview(CHANNELS[kind], seed=1)
    decoder = host.taesd_decoder()
    latent = torch.randn(1, CHANNELS[kind], 4, 6)
    with torch.no_grad():
        assert torch.equal(decoder(latent), host.previews[kind].decoder(latent))
    assert decoder.decode(latent).shape == (1, 3, 32, 48)
    assert host.taesd_decoder() is decoder  # one private copy per kind for the WebUI's lifetime


def test_a_decoder_file_in_models_klora_comes_before_the_hosts(host: Any) -> None:
    use_model(host, "sd3")
    host.previews["sd3"] = HostPreview(16, seed=1)
    own = HostPreview(16, seed=2).decoder
    (host.models_dir / "klora").mkdir(parents=True)
    save_file(dict(own.state_dict()), str(host.models_dir / "klora" / "taesd3_decoder.safetensors"))
    latent = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(host.taesd_decoder()(latent), own(latent))


def test_a_missing_decoder_names_both_files_and_the_vae_decoder(host: Any) -> None:
    use_model(host, "sd3")
    with pytest.raises(KLoraError, match=r"taesd3_decoder\.safetensors.*taesd3_decoder\.pth.*'vae' decoder"):
        host.taesd_decoder()
    assert host.taesd_decoders == {}
