"""Reference guidance on every WebUI host: its models (kept for the WebUI's lifetime), decoders, switches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules import devices, paths, shared

from lib_klora.errors import KLoraError
from lib_klora.guidance.refine import Decode
from lib_klora.guidance.run import GuidanceModels, GuidanceRun
from lib_klora.hosts.job_start import first_prompt, stop_job
from lib_klora.hosts.webui import EXTRA_NETWORK_TAG, NOTE_KEY, is_flux_model, opt
from lib_klora.params.model import KLoraParams

guidance_models = GuidanceModels(Path(paths.models_path) / "klora")
taesd_decoders: dict[str, Any] = {}  # private differentiable TAESD copies, by latent kind


def build_guidance(params: KLoraParams, prompt: str, decode: Decode) -> GuidanceRun:
    """Guidance models and reference embeddings for one job (call outside inference mode)."""
    shared.state.textinfo = "K-LoRA: loading guidance models"

    def progress(text: str) -> None:
        shared.state.textinfo = f"K-LoRA: {text}"
        print(f"K-LoRA: {text}")

    return GuidanceRun.build(
        params,
        guidance_models,
        decode,
        prompt=EXTRA_NETWORK_TAG.sub("", prompt),
        device=devices.device,
        progress=progress,
    )


def latent_kind() -> str:
    """Which TAESD decodes the sampler's latents. SD3 and FLUX samplers work on shifted and scaled latents,
    which is what taesd3/taef1 take (the hosts' own live previews feed them the same tensor)."""
    model = shared.sd_model
    if getattr(model, "is_sd3", False):
        return "sd3"
    if is_flux_model():
        return "flux"
    return "sdxl" if getattr(model, "is_sdxl", False) else "sd"


def taesd_decoder() -> Any:
    """A private, differentiable TAESD decoder for the current model on the WebUI's device, built outside
    inference mode: from models/klora (safetensors), else from the WebUI's own live-preview decoder."""
    from lib_klora.guidance.taesd import DECODER_FILES, load_taesd_decoder

    kind = latent_kind()
    decoder = taesd_decoders.get(kind)
    if decoder is None:
        local = guidance_models.weights_dir / DECODER_FILES[kind]
        if local.is_file():
            decoder = load_taesd_decoder(local)
        else:
            from modules import sd_vae_taesd

            host_file = DECODER_FILES[kind].replace(".safetensors", ".pth")
            try:  # the WebUI's own loader (and download) of the live-preview decoder
                host_decoder = sd_vae_taesd.decoder_model()
            except Exception as exc:
                host_dir = Path(paths.models_path) / "VAE-taesd"
                raise KLoraError(
                    f"no TAESD decoder for guidance ({type(exc).__name__}: {exc}). Put "
                    f"{DECODER_FILES[kind]} into {guidance_models.weights_dir}, or {host_file} into "
                    f"{host_dir} (both from https://github.com/madebyollin/taesd); or use the 'vae' decoder"
                ) from exc
            decoder = load_taesd_decoder(state_dict=host_decoder.state_dict())
        taesd_decoders[kind] = decoder
    decoder.to(devices.device)
    return decoder


def start_guidance(
    p: Any, job: Any, pair: KLoraParams, decoder: Callable[[], Decode], teardown: Callable[[], None]
) -> bool:
    """Build the job's guidance when a pass uses it; on failure end the job with its message (False)."""
    if not any(params is not None and params.uses_guidance for params in (job.params, job.hires_params)):
        return True
    try:
        job.guidance = build_guidance(pair, first_prompt(p), decoder())
    except (KLoraError, ValueError, OSError) as exc:
        teardown()
        p._klora = None
        stop_job(p, f"K-LoRA guidance: {exc}")
        return False
    return True


def end_guidance(job: Any) -> None:
    """Guidance is over for this job; models go to the CPU when the setting says so."""
    job.guidance = None
    if opt("klora_guidance_offload", True):
        guidance_models.offload()
        for decoder in taesd_decoders.values():
            decoder.to("cpu")
        devices.torch_gc()


def guidance_off(p: Any, job: Any, reason: str) -> None:
    message = f"K-LoRA: {reason}"
    print(message)
    p.comment(message)  # shown under the images in the UI
    # API clients see only the infotext; from_infotext ignores this key, so pasting still works.
    p.extra_generation_params[NOTE_KEY] = reason
    end_guidance(job)
