"""K-LoRA for diffusers pipelines in three lines::

    from lib_klora.diffusers import apply_klora

    with apply_klora(pipe, "my_dog.safetensors", "ink_wash.safetensors", pattern="s") as fusion:
        image = pipe("a sks dog in ink wash style", num_inference_steps=30).images[0]
    fusion.selection_map().save("map.png")

Works with StableDiffusionPipeline, StableDiffusionXLPipeline (both text encoders follow `te_policy`),
StableDiffusion3Pipeline and FluxPipeline (kohya/BFL FLUX LoRAs with fused q/k/v and single-block layers
are split onto diffusers' projections; fused `to_qkv` projections get slices), and with other pipelines
built from a UNet or a transformer and CLIP-style text encoders. Any `KLoraParams` field is a keyword:
``method`` ("klora", "merge", "fixed", "random", "dynamic"), ``pattern`` ("s", "s*"), ``alpha``, ``beta``,
``gamma``, ``subject_strength``, ``style_strength``, ``te_policy``, ``kl_*``, ``guidance*`` ...

The clock is the pipeline's own scheduler: `set_timesteps` announces a pass (its length is the
scheduler's timesteps after any img2img start, divided by the scheduler's order) and each
`scheduler.step` moves the fusion to the next step, so a 30-step run makes 30 decisions per layer however
many denoiser calls a step makes (batched CFG or not). Reference guidance nudges each guided step's x̂0
inside `scheduler.step` (x̂0 = x − σ·v on the flow-matching schedulers of SD3 and FLUX, whose packed
latents are unpacked on the token grid of the transformer's `img_ids`); the decoder is the pipeline's VAE
(with its scaling and shift factors) or a TAESD decoder of the pipeline's latents (taesd, taesdxl, taesd3,
taef1): `taesd_path`, else the file in `guidance_weights_dir`, downloaded there on first use.

The pipeline's weights are never left modified (forward hooks add the chosen LoRA delta, or with
`apply_to="weights"` the deltas are written and copied back); leaving the `with` block, normally or by an
exception or KeyboardInterrupt, removes every hook and scheduler wrapper and restores every weight.
diffusers itself is not imported here: any object with the pipeline's attributes works.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lib_klora.engines.torch_module import FusionError, ModuleFusion, check_apply_to, klora_params
from lib_klora.fusion.cache import ScoreCache
from lib_klora.guidance.refine import Decode
from lib_klora.guidance.run import GuidanceModels
from lib_klora.guidance.scheduler_x0 import x0_map
from lib_klora.params.model import KLoraParams

__all__ = ["PackedLatents", "PipelineFusion", "apply_klora", "latent_kind", "pipeline_components"]

PathLike = str | os.PathLike[str]


def _is_flux(pipe: Any) -> bool:
    return type(getattr(pipe, "transformer", None)).__name__.startswith("Flux")


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's denoiser and text encoders under the LoRA files' component names."""
    components: dict[str, nn.Module] = {}
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            components[attr] = module
    if not components:
        raise FusionError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    encoders = [getattr(pipe, a, None) for a in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    is_flux = _is_flux(pipe)
    if isinstance(encoders[0], nn.Module):  # CLIP-L: kohya's te1 when a second encoder exists
        components["te1" if encoders[1] is not None else "te"] = encoders[0]
    if isinstance(encoders[1], nn.Module):  # FLUX's second encoder is T5, which kohya calls te3
        components["te3" if is_flux else "te2"] = encoders[1]
    if isinstance(encoders[2], nn.Module):
        components["te3"] = encoders[2]
    return components


def latent_kind(pipe: Any) -> str:
    """The pipeline's latent space, as TAESD decoders are named: "sd", "sdxl", "sd3" or "flux"."""
    transformer = type(getattr(pipe, "transformer", None)).__name__
    if _is_flux(pipe):
        return "flux"
    if transformer.startswith("SD3"):
        return "sd3"
    unet = getattr(pipe, "unet", None)
    if getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time":
        return "sdxl"
    if isinstance(getattr(pipe, "transformer", None), nn.Module):
        raise FusionError(
            f"TAESD decoders exist for SD, SDXL, SD3 and FLUX latents, not {transformer}'s: use "
            "guidance_decoder='vae'"
        )
    return "sd"


def _vae_decode(pipe: Any) -> Decode:
    """The pipeline's own VAE (its scaling and shift factors), differentiable, to [0, 1]."""
    vae = pipe.vae
    scaling = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        image = vae.decode((latents / scaling + shift).to(vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    return decode


def _taesd_decode(pipe: Any, kind: str, taesd_path: PathLike | None, weights_dir: Path | None) -> Decode:
    """A TAESD decoder for the pipeline's latents: `taesd_path`, else `weights_dir`'s file of that kind
    (downloaded into it on first use; offline, an error naming the URL and the path)."""
    from lib_klora.guidance.taesd import DECODER_FILES, find_taesd_decoder, load_taesd_decoder

    if taesd_path is not None:
        path = Path(taesd_path)
    elif weights_dir is not None:
        path = find_taesd_decoder(kind, weights_dir)
    else:
        raise FusionError(
            f"guidance_decoder 'taesd' needs taesd_path= ({DECODER_FILES[kind]} for {kind} latents, from "
            "github.com/madebyollin/taesd) or guidance_weights_dir= (the decoder is looked for there); "
            "or use guidance_decoder='vae'"
        )
    decoder = load_taesd_decoder(path, device=pipe.device)
    channels = getattr(getattr(getattr(pipe, "vae", None), "config", None), "latent_channels", None)
    if channels is not None and decoder.latent_channels != int(channels):
        raise FusionError(
            f"{path.name} decodes {decoder.latent_channels}-channel latents, this pipeline's VAE makes "
            f"{channels}: use {DECODER_FILES[kind]} ({kind} latents), or guidance_decoder='vae'"
        )
    return decoder.decode


class PackedLatents:
    """FLUX's packed latents [B, (h/2)(w/2), 4C] as the image latents [B, C, h, w] the decoders read.

    The grid comes from the `img_ids` of the transformer's last call (row and column of each token).
    Guidance differentiates through the unpacking, a permutation, so its nudge lands in packed form with
    the same per-sample norm: nothing needs repacking.
    """

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None

    def grid(self, tokens: int) -> tuple[int, int]:
        if self.ids is None:
            raise FusionError("packed latents, but the transformer was not called with img_ids")
        ids = self.ids[0] if self.ids.ndim == 3 else self.ids
        ids = ids[:tokens]  # FLUX Kontext appends its reference image's tokens
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if rows * cols != tokens:
            raise FusionError(f"img_ids give a {rows}x{cols} grid for {tokens} latent tokens")
        return rows, cols

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """The maths of FluxPipeline._unpack_latents, from the token grid."""
        batch, tokens, features = latents.shape
        rows, cols = self.grid(tokens)
        x = latents.view(batch, rows, cols, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(batch, features // 4, rows * 2, cols * 2)

    def decoding(self, decode: Decode) -> Decode:
        """`decode` reading packed latents too."""

        def decode_packed(latents: torch.Tensor) -> torch.Tensor:
            return decode(self.unpack(latents) if latents.ndim == 3 else latents)

        return decode_packed


class PipelineFusion:
    """A `ModuleFusion` on a pipeline's modules, clocked by the pipeline's scheduler; a context manager."""

    def __init__(self, pipe: Any, fusion: ModuleFusion, packed: PackedLatents | None = None) -> None:
        self.pipe = pipe
        self.fusion = fusion
        self.packed = packed
        self.scheduler: Any = None
        self._saved: dict[str, Any] = {}
        self._pending = False
        self._calls = 0
        self._pre_hook: torch.utils.hooks.RemovableHandle | None = None

    # -- the scheduler as the clock

    def _order(self) -> int:
        return max(1, int(getattr(self.scheduler, "order", 1) or 1))

    def _wrap_scheduler(self) -> None:
        scheduler = self.scheduler = self.pipe.scheduler
        originals = {name: getattr(scheduler, name) for name in ("set_timesteps", "step")}
        self._saved = {name: vars(scheduler).get(name) for name in originals}

        # functools.wraps keeps the signatures: pipelines inspect set_timesteps for `sigmas`/`timesteps`.
        @functools.wraps(originals["set_timesteps"])
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = originals["set_timesteps"](*args, **kwargs)
            self._pending = True  # the pass starts at the denoiser's first call, once img2img has cut it
            return result

        @functools.wraps(originals["step"])
        def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
            if self.fusion.wants_guidance():
                model_output = self._guided(model_output, timestep, sample)
            result = originals["step"](model_output, timestep, sample, *args, **kwargs)
            self._calls += 1
            step_index, steps = self.fusion.current_step
            following = self._calls // self._order()
            if steps and following < steps and following != step_index:
                self.fusion.step(following)
            return result

        scheduler.set_timesteps = set_timesteps
        scheduler.step = step

    def _unwrap_scheduler(self) -> None:
        if self.scheduler is None:
            return
        for name, value in self._saved.items():
            if value is None:
                vars(self.scheduler).pop(name, None)
            else:
                setattr(self.scheduler, name, value)
        self.scheduler, self._saved = None, {}

    def _begin_pass(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self.packed is not None and kwargs.get("img_ids") is not None:
            self.packed.ids = kwargs["img_ids"]
        if not self._pending:
            return
        self._pending = False
        timesteps = len(self.scheduler.timesteps) - int(getattr(self.scheduler, "begin_index", None) or 0)
        self._calls = 0
        self.fusion.begin(max(1, math.ceil(timesteps / self._order())))

    def _guided(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
        if sample.ndim != 4 and not (sample.ndim == 3 and self.packed is not None):
            raise FusionError(f"reference guidance cannot read latents of shape {tuple(sample.shape)}")
        maps = x0_map(self.scheduler, timestep, sample)
        x0 = maps.to_x0(model_output)
        guided = self.fusion.guide(x0, maps.sigma)
        if guided is x0:
            return model_output
        return maps.from_x0(guided).to(model_output.dtype)

    # -- on / off

    def install(self) -> PipelineFusion:
        if self.scheduler is not None:
            return self
        try:
            self._wrap_scheduler()
            denoiser = next(
                m for k, m in pipeline_components(self.pipe).items() if k in ("unet", "transformer")
            )
            self._pre_hook = denoiser.register_forward_pre_hook(self._begin_pass, with_kwargs=True)
            self.fusion.install()
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Every hook and wrapper off (idempotent); the pipeline is exactly as before."""
        self.fusion.remove()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        self._unwrap_scheduler()
        self._pending = False

    def __enter__(self) -> PipelineFusion:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # -- records (the engine's)

    @property
    def passes(self) -> list[Any]:
        return self.fusion.passes

    @property
    def skipped(self) -> list[str]:
        return self.fusion.skipped

    def decisions(self, pass_index: int = -1) -> tuple[list[list[int]], tuple[str, ...]]:
        return self.fusion.decisions(pass_index)

    def selection_map(self, pass_index: int = -1) -> Image.Image:
        return self.fusion.selection_map(pass_index)


def apply_klora(
    pipe: Any,
    subject: PathLike,
    style: PathLike,
    params: KLoraParams | Mapping[str, Any] | None = None,
    *,
    guidance_models: GuidanceModels | None = None,
    guidance_weights_dir: PathLike | None = None,
    taesd_path: PathLike | None = None,
    prompt: str = "",
    cache: ScoreCache | None = None,
    device: str | torch.device | None = "auto",
    apply_to: str = "activations",
    **settings: Any,
) -> PipelineFusion:
    """Fuse the `subject` and `style` LoRA files on `pipe` for the runs inside a `with` block.

    Settings are `KLoraParams` fields, as keywords or as `params`; they are validated before anything is
    read. Reference guidance (``guidance=True`` with ``style_refs``/``subject_refs`` as base64 images)
    loads its CLIP/DINO weights from `guidance_weights_dir` (or `guidance_models`) and the `prompt` for
    the text term; its decoder (``guidance_decoder``) is the pipeline's VAE ("vae") or TAESD ("taesd":
    `taesd_path`, else the decoder file of the pipeline's latents in the weights folder, downloaded there
    on first use). `apply_to="weights"` (K-LoRA and the baselines) writes the chosen deltas into the
    denoiser's weights at each layer's switch steps instead of hooking it (no per-step cost; the adapted
    weights' originals are kept on the CPU and copied back bit for bit when the block ends).
    """
    if params is not None and settings:
        raise TypeError("give the settings either as params or as keywords, not both")
    resolved = klora_params(subject, style, params if params is not None else settings)
    check_apply_to(apply_to, resolved)
    decode: Decode | None = None
    packed: PackedLatents | None = None
    if resolved.uses_guidance:
        if guidance_models is None:
            guidance_models = GuidanceModels(guidance_weights_dir)
        if resolved.guidance_decoder == "vae":
            decode = _vae_decode(pipe)
        else:
            weights_dir = Path(guidance_weights_dir) if guidance_weights_dir else guidance_models.weights_dir
            decode = _taesd_decode(pipe, latent_kind(pipe), taesd_path, weights_dir)
        if _is_flux(pipe):
            packed = PackedLatents()
            decode = packed.decoding(decode)
    fusion = ModuleFusion(
        pipeline_components(pipe),
        subject,
        style,
        resolved,
        guidance_models=guidance_models,
        decode=decode,
        prompt=prompt,
        device=device,
        cache=cache,
        apply_to=apply_to,
    )
    return PipelineFusion(pipe, fusion, packed)
