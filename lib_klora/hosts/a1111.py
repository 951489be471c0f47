"""AUTOMATIC1111 v1.10 glue: slot networks in the built-in Lora, the sampler callbacks and guidance decoders.

With `webui.py`, `job_start.py` and `guidance_glue.py` (shared by every host) the only files that import
the WebUI's `modules` for A1111.
"""

from __future__ import annotations

import traceback
import weakref
from pathlib import Path
from typing import Any

import torch
from modules import script_callbacks, shared

from lib_klora.engines import slots as engine
from lib_klora.engines.kept_merges import kept_layers
from lib_klora.errors import KLoraError
from lib_klora.hosts import guidance_glue, job_start, webui
from lib_klora.params.model import KLoraParams

network_cache = engine.NetworkCache()
# The denoiser of the evaluation in progress: `on_cfg_after_cfg` gets no processing object, only x̂0. A weak
# reference, so nothing of a finished generation is kept alive by it.
_current_denoiser: Any = None


class KLoraScript(webui.KLoraScriptBase):
    def before_process(self, p: Any, *args: Any) -> None:
        # Self-healing: a previous job that died before postprocess may have left slots behind.
        engine.remove_slots(engine.lora_extension())

    def process(self, p: Any, *args: Any) -> None:
        def build(first: KLoraParams | None, hires: KLoraParams | None) -> engine.Job:
            nets = engine.lora_extension()
            if nets is None:
                raise KLoraError("K-LoRA: the built-in Lora extension is not loaded (is it disabled?)")
            return engine.build_job(
                nets,
                network_cache,
                webui.score_cache,
                shared.sd_model,
                first,
                hires,
                device=webui.score_device(),
                digest=lambda path: webui.score_cache.digests.digest(Path(path)),
                should_stop=lambda: bool(shared.state.interrupted),
                switch_on_activations=bool(webui.opt("klora_switch_on_activations", True)),
            )

        job = job_start.begin_job(p, args, build, check_loras=webui.check_lora_pair)
        if job is None:
            # This job wants no K-LoRA weights: restore the layers an earlier job left merged now (Lora
            # would do it lazily, but not in functional mode without networks: pitfall P4).
            kept_layers.release(engine.lora_extension())
            return
        nets = engine.lora_extension()
        pair = job.params or job.hires_params
        engine.guard_sample(p, job, nets, on_failure=lambda exc: guidance_glue.end_guidance(job))

        def decoder() -> Any:
            return guidance_decoder(pair.guidance_decoder)

        if guidance_glue.start_guidance(p, job, pair, decoder, lambda: engine.teardown(nets, job)):
            job_start.prepare_job(p, pair)

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        job = getattr(p, "_klora", None)
        if job is not None:
            engine.inject_slots(engine.lora_extension(), job, bool(getattr(p, "is_hr_pass", False)))

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(p, "disable_extra_networks", False):  # no activation, so no hook above: inject here
            self.after_extra_networks_activate(p)

    def before_hr(self, p: Any, *args: Any) -> None:
        if getattr(p, "disable_extra_networks", False):
            self.after_extra_networks_activate(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        job = getattr(p, "_klora", None)
        if job is None:
            return
        nets = engine.lora_extension()
        if job.failed or shared.state.interrupted:
            engine.teardown(nets, job)  # restore now: the merged state may be part-way through a pass
        else:
            engine.finish(nets, job)  # merges stay: an identical next job re-merges only what it changes
        guidance_glue.end_guidance(job)
        p._klora = None
        if not job.failed:
            job_start.add_selection_maps(processed, job)


# ---------------------------------------------------------------- callbacks


def on_cfg_denoiser(params: Any) -> None:
    global _current_denoiser
    denoiser = params.denoiser
    p = getattr(denoiser, "p", None)
    job = getattr(p, "_klora", None)
    if job is None or job.failed:
        return
    _current_denoiser = weakref.ref(denoiser)
    job.sigma = params.sigma
    try:
        if shared.sd_model is not job.model:
            raise KLoraError("the checkpoint changed during the job (refiner or hires checkpoint)")
        engine.on_step(
            job, denoiser, bool(getattr(p, "is_hr_pass", False)), job_start.evals_per_step(denoiser)
        )
    except Exception as exc:  # callbacks must not raise: the host logs it every step
        fail_job(p, job, exc)


def on_cfg_after_cfg(params: Any) -> None:
    """Reference guidance: nudge the CFG-combined x̂0 of a guided step (k-diffusion samplers only)."""
    denoiser = _current_denoiser() if _current_denoiser is not None else None
    p = getattr(denoiser, "p", None)
    job = getattr(p, "_klora", None)
    if job is None or job.failed or job.guidance is None or shared.state.interrupted:
        return
    pass_params = job.params_for(bool(getattr(p, "is_hr_pass", False)))
    if pass_params is None or not pass_params.uses_guidance:
        return
    from modules import sd_samplers_timesteps

    if isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps):
        # DDIM, PLMS, UniPC: the value after CFG is the noise prediction, not x̂0.
        guidance_glue.guidance_off(
            p, job, f"guidance needs a k-diffusion sampler; {p.sampler_name} passes no x̂0 here"
        )
        return
    try:
        x0 = params.x
        nudged = job.guidance.apply(x0, _sigma_of(job.sigma), job.tracker.step, job.tracker.steps)
        if nudged is not x0:
            if getattr(denoiser, "mask", None) is not None:  # inpainting: keep the unmasked area as given
                nudged = nudged * denoiser.nmask + denoiser.init_latent * denoiser.mask
            params.x = nudged
    except Exception as exc:  # callbacks must not raise; guidance stops, the fusion goes on
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        guidance_glue.guidance_off(p, job, f"guidance failed and was switched off: {exc}")


def _sigma_of(sigma: Any) -> Any:
    # sigma_in holds one value per row (cond rows, then uncond rows); they are equal within a step.
    return sigma.reshape(-1)[0] if isinstance(sigma, torch.Tensor) and sigma.numel() else sigma


def guidance_decoder(kind: str) -> Any:
    """A differentiable latent → [0, 1] image decode for guidance: a private TAESD copy, or the full VAE."""
    model = shared.sd_model
    if kind == "vae":
        vae, scale = model.first_stage_model, float(model.scale_factor)

        def decode_vae(z: torch.Tensor) -> torch.Tensor:
            weight = next(vae.parameters())
            image = vae.decode(z.to(device=weight.device, dtype=weight.dtype) / scale)
            return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)

        return decode_vae
    return guidance_glue.taesd_decoder().decode


def fail_job(p: Any, job: engine.Job, exc: BaseException) -> None:
    job_start.report_failure(p, job, exc)
    engine.teardown(engine.lora_extension(), job)
    guidance_glue.end_guidance(job)


def on_model_loaded(_model: Any) -> None:
    # Another model (or the same one reloaded): merges kept on the previous one go back at once. A model
    # loaded in place has already had its Lora backups reset, so nothing is written over its new weights.
    kept_layers.release(engine.lora_extension())
    network_cache.clear()
    guidance_glue.taesd_decoders.clear()  # SD1 and SDXL latents need different decoders


def on_script_unloaded() -> None:
    """The extension is being disabled or reloaded: no layer may keep a K-LoRA merge."""
    kept_layers.release(engine.lora_extension())


def register_callbacks() -> None:
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
    script_callbacks.on_cfg_after_cfg(on_cfg_after_cfg)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_script_unloaded(on_script_unloaded)
    script_callbacks.on_ui_settings(webui.on_ui_settings)
    script_callbacks.on_before_ui(webui.on_before_ui)
    script_callbacks.on_app_started(webui.make_app_started(plan_for_names))


def plan_for_names(subject: str, style: str, settings: Any) -> Any:
    """The plan route's plan; OFT/BOFT layers rotate the loaded model's weights, matched by Lora itself."""
    nets = engine.lora_extension()
    if nets is None:
        raise KLoraError("K-LoRA: the built-in Lora extension is not loaded (is it disabled?)")
    weights = engine.network_base_weights(nets, network_cache, shared.sd_model, (subject, style))
    return webui.plan_for_names(subject, style, settings, base_weights=weights)
