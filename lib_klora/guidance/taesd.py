"""TAESD decoder: a tiny, differentiable stand-in for the SD VAE decoder, used by latent guidance.

The architecture (a tanh soft-clamp, 64-channel conv/ReLU residual blocks and three nearest-neighbour 2×
upsamplings; about 1.2 M parameters) follows the public Tiny AutoEncoder for Stable Diffusion
(madebyollin/taesd). The module is an ``nn.Sequential`` whose child indices reproduce that project's layout,
so ``taesd_decoder.safetensors`` (SD1/SD2), ``taesdxl_decoder.safetensors`` (SDXL) and the state dict of the
WebUI's own ``models/VAE-taesd/taesd*_decoder.pth`` model load without renaming. SD1/SD2 and SDXL decoders are
the same architecture with different weights; 16-channel variants (SD3/FLUX) are detected from the weights.

Input is the UNet-space latent (the sampler's tensor, already multiplied by the VAE scaling factor), output an
RGB image in [0, 1] at 8× the latent resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lib_klora.errors import KLoraError
from lib_klora.guidance.downloads import Progress, download_file
from lib_klora.loras.lora_file import PICKLE_SUFFIXES

LATENT_CHANNELS = 4
WIDTH = 64
# Public file names (github.com/madebyollin/taesd); the WebUI keeps the .pth twins in models/VAE-taesd.
DECODER_FILES = {
    "sd": "taesd_decoder.safetensors",
    "sdxl": "taesdxl_decoder.safetensors",
    "sd3": "taesd3_decoder.safetensors",  # 16 latent channels
    "flux": "taef1_decoder.safetensors",  # 16 latent channels (Forge's FLUX)
}
# The same decoders on the Hugging Face hub, in diffusers' AutoencoderTiny layout (decoder.layers.N keys,
# which the loader reads; the encoder half in the same file is skipped).
HUB_REPOS = {
    "sd": "madebyollin/taesd",
    "sdxl": "madebyollin/taesdxl",
    "sd3": "madebyollin/taesd3",
    "flux": "madebyollin/taef1",
}
HUB_FILE = "diffusion_pytorch_model.safetensors"


class TaesdError(KLoraError):
    """A TAESD decoder file or state dict cannot be used."""


class _SoftClamp(nn.Module):
    """Squashes latents smoothly into (-3, 3); the decoder was trained on this range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3.0) * 3.0


def _conv3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, padding=1, bias=bias)


class _ResBlock(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + x); attribute names fix the state-dict keys (conv.0/2/4)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(channels, channels),
            nn.ReLU(),
            _conv3(channels, channels),
            nn.ReLU(),
            _conv3(channels, channels),
        )
        self.skip = nn.Identity()  # in == out everywhere in the decoder, so no 1×1 projection
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TaesdDecoder(nn.Sequential):
    """Latent [B, C, h, w] → image [B, 3, 8h, 8w]. ``forward`` gives the raw output (≈[0, 1], as the WebUI's
    preview uses it); :meth:`decode` gives the guidance view, exactly in [0, 1]."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS) -> None:
        layers: list[nn.Module] = [_SoftClamp(), _conv3(latent_channels, WIDTH), nn.ReLU()]
        for _ in range(3):  # three stages of 3 blocks, each followed by a 2× upsampling and a bias-free conv
            layers += [_ResBlock(WIDTH) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2), _conv3(WIDTH, WIDTH, bias=False)]
        layers += [_ResBlock(WIDTH), _conv3(WIDTH, 3)]
        super().__init__(*layers)
        self.latent_channels = latent_channels

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Differentiable decode to [0, 1] in float32, whatever the decoder's dtype.

        A plain clamp, so guidance follows the true gradient of what the encoders see (saturated pixels get
        none); the raw output only overshoots [0, 1] slightly with trained weights.
        """
        weight = self[1].weight
        return self(latent.to(device=weight.device, dtype=weight.dtype)).float().clamp(0.0, 1.0)


def _normalise_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the public/WebUI layout ("1.weight"), a wrapper's ("decoder.1.weight") and diffusers'
    AutoencoderTiny ("decoder.layers.0.weight": no clamp module, so every index is one lower)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        k = key
        for prefix in ("module.", "first_stage_model.", "taesd_decoder.", "decoder."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k.startswith("layers."):
            index, _, rest = k[len("layers.") :].partition(".")
            if not index.isdigit():
                continue
            k = f"{int(index) + 1}.{rest}"
        elif k.startswith("encoder.") or not k[:1].isdigit():
            continue  # encoder weights in a combined file, or non-decoder extras
        out[k] = value
    return out


def decoder_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> TaesdDecoder:
    """Build a decoder (latent channels read from the weights) and load ``state_dict`` strictly."""
    sd = _normalise_keys(state_dict)
    first = sd.get("1.weight")
    if first is None or first.ndim != 4 or first.shape[0] != WIDTH:
        raise TaesdError(
            f"{source}: not a TAESD decoder (no 64-channel input conv '1.weight'); "
            f"expected e.g. {DECODER_FILES['sd']} or {DECODER_FILES['sdxl']}"
        )
    # Built outside inference mode so the parameters are ordinary tensors usable in autograd.
    with torch.inference_mode(False):
        decoder = TaesdDecoder(latent_channels=int(first.shape[1]))
        try:
            decoder.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise TaesdError(f"{source}: weights do not fit the TAESD decoder layout: {exc}") from exc
    decoder.eval().requires_grad_(False)
    return decoder


def find_taesd_decoder(kind: str, weights_dir: str | Path, *, progress: Progress | None = None) -> Path:
    """``<weights_dir>/<DECODER_FILES[kind]>``, downloaded from the hub into that folder on first use.

    Offline (or on any download failure) raises :class:`~lib_klora.guidance.downloads.DownloadError` naming
    the URL to fetch by hand and the path to save it as, as the guidance encoders do.
    """
    if kind not in DECODER_FILES:
        raise TaesdError(f"no TAESD decoder for {kind!r} latents (known: {', '.join(DECODER_FILES)})")
    local = Path(weights_dir) / DECODER_FILES[kind]
    if not local.is_file():
        download_file(HUB_REPOS[kind], HUB_FILE, local, progress=progress)
    return local


def load_taesd_decoder(
    path: str | Path | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TaesdDecoder:
    """Load a TAESD decoder from a ``.safetensors`` file, or from a state dict the host already loaded.

    Pickle files (``.pth``) are refused without being opened: unpickling runs arbitrary code. The WebUI glue
    should pass ``state_dict=`` from the model its own loader produced (e.g. A1111's
    ``modules.sd_vae_taesd.decoder_model().state_dict()``).
    """
    if (path is None) == (state_dict is None):
        raise TaesdError("load_taesd_decoder: give exactly one of path= or state_dict=")
    if state_dict is not None:
        decoder = decoder_from_state_dict(state_dict)
    else:
        p = Path(path)  # type: ignore[arg-type]
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise TaesdError(
                f"{p}: pickle checkpoints are not loaded (unpickling can run arbitrary code). Download the "
                f"safetensors file instead ({DECODER_FILES['sd']} for SD1/SD2, {DECODER_FILES['sdxl']} for "
                "SDXL, from https://github.com/madebyollin/taesd), convert this one with "
                "safetensors.torch.save_file, or let the WebUI load it and pass its state dict (state_dict=)"
            )
        if not p.is_file():
            raise TaesdError(
                f"{p}: file not found. Download {DECODER_FILES['sd']} (SD1/SD2) or {DECODER_FILES['sdxl']} "
                "(SDXL) from https://github.com/madebyollin/taesd and put it there"
            )
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TaesdError(f"{p}: cannot read as safetensors: {exc}") from exc
        decoder = decoder_from_state_dict(sd, source=str(p))
    if device is not None or dtype is not None:
        with torch.inference_mode(False):  # a .to() inside inference mode would make inference tensors
            decoder.to(device=device, dtype=dtype)
    return decoder
