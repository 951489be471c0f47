"""Forge (lllyasviel, `backend/`) and reForge (Panchovix, `ldm_patched`) glue.

Both hosts keep LoRAs in ComfyUI-style model patchers. K-LoRA reads the two LoRAs through the host's own key
maps and adds the chosen low-rank delta with forward hooks on the host's layers (`engines/patcher.py`); the
text encoder gets the policy's LoRAs through a clone of the host's clip patcher; reference guidance runs as
the unet patcher's post-CFG function, whose input is x̂0 for every sampler. The two hosts differ only in the
functions of `ForgeApi` / `ReForgeApi`.
"""

from __future__ import annotations

import copy
import traceback
from pathlib import Path
from typing import Any

import torch
from modules import script_callbacks, shared

from lib_klora.engines import patcher as engine
from lib_klora.hosts import guidance_glue, job_start, webui
from lib_klora.loras.lora_file import LowRankModule
from lib_klora.params.model import KLoraParams


class ForgeApi:
    """lllyasviel/stable-diffusion-webui-forge (mirrors commit dfdcbab): `backend.patcher.lora`."""

    name = "forge"

    def load_file(self, filename: str) -> dict[str, torch.Tensor]:
        from backend.utils import load_torch_file

        return load_torch_file(filename, safe_load=True)

    def unet_patches(self, unet: Any, lora: dict) -> dict:
        from backend.patcher.lora import load_lora, model_lora_keys_unet

        return load_lora(lora, model_lora_keys_unet(unet.model, {}))[0]  # a fresh dict: the default is shared

    def clip_patches(self, clip: Any, lora: dict) -> dict:
        from backend.patcher.lora import load_lora, model_lora_keys_clip

        return load_lora(lora, model_lora_keys_clip(clip.cond_stage_model, {}))[0]

    def decode(self, value: Any) -> engine.LowRankFactors | None:
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "lora":
            up, down, alpha, mid, dora_scale = value[1][:5]
            if dora_scale is None:
                return _low_rank(up, down, alpha, mid)
        return None

    def dense(self, value: Any, key: str, weight: torch.Tensor) -> torch.Tensor:
        from backend.patcher.lora import merge_lora_to_weight

        _refuse_replacements(value)
        return merge_lora_to_weight([[1.0, value, 1.0, None, None]], weight, key, torch.float32)

    def add_clip_patches(self, clip: Any, patches: dict, strength: float, label: str) -> Any:
        clip.add_patches(filename=label, patches=patches, strength_patch=strength, online_mode=False)
        return clip

    def get_attr(self, obj: Any, name: str) -> Any:
        from backend.utils import get_attr

        return get_attr(obj, name)

    def latent_unscale(self, p: Any, vae: Any) -> Any:
        return vae.process_out  # IntegratedAutoencoderKL: latent / scaling factor + shift

    def vae_decoder(self, p: Any) -> Any:
        """A private, differentiable fp32 copy of the checkpoint's VAE. The host's parameters are inference
        tensors (loaded under inference_mode); a copy made outside it holds ordinary ones."""
        with torch.inference_mode(False):
            vae = copy.deepcopy(p.sd_model.forge_objects.vae.first_stage_model).float().eval()
            vae.requires_grad_(False)
        unscale = self.latent_unscale(p, vae)

        def decode(z: torch.Tensor) -> torch.Tensor:
            weight = next(vae.parameters())
            image = vae.decode(unscale(z.to(device=weight.device, dtype=weight.dtype)))
            return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)

        return decode


class ReForgeApi(ForgeApi):
    """Panchovix/stable-diffusion-webui-reForge (mirrors commit 3b56b26): `ldm_patched.modules.lora`."""

    name = "reforge"

    def load_file(self, filename: str) -> dict[str, torch.Tensor]:
        from ldm_patched.modules.utils import load_torch_file

        return load_torch_file(filename, safe_load=True)

    def _load(self, lora: dict, key_map: dict) -> dict:
        from ldm_patched.modules.lora import load_lora
        from ldm_patched.modules.lora_convert import convert_lora

        return load_lora(convert_lora(dict(lora)), key_map, log_missing=False)

    def unet_patches(self, unet: Any, lora: dict) -> dict:
        from ldm_patched.modules.lora import model_lora_keys_unet

        return self._load(lora, model_lora_keys_unet(unet.model, {}))

    def clip_patches(self, clip: Any, lora: dict) -> dict:
        from ldm_patched.modules.lora import model_lora_keys_clip

        return self._load(lora, model_lora_keys_clip(clip.cond_stage_model, {}))

    def decode(self, value: Any) -> engine.LowRankFactors | None:
        # weight_adapter.LoRAAdapter: .weights = (up, down, alpha, mid, dora_scale, reshape); older builds
        # (and Forge) use ("lora", (up, down, alpha, mid, dora_scale)) tuples.
        if getattr(value, "name", None) == "lora" and hasattr(value, "weights"):
            up, down, alpha, mid, dora_scale = value.weights[:5]
            reshape = value.weights[5] if len(value.weights) > 5 else None
            if dora_scale is None and reshape is None:
                return _low_rank(up, down, alpha, mid)
            return None
        return super().decode(value)

    def dense(self, value: Any, key: str, weight: torch.Tensor) -> torch.Tensor:
        from ldm_patched.modules.lora import calculate_weight

        _refuse_replacements(value)
        return calculate_weight([(1.0, value, 1.0, None, None)], weight, key)

    def add_clip_patches(self, clip: Any, patches: dict, strength: float, label: str) -> Any:
        clip.add_patches(patches, strength)
        return clip

    def get_attr(self, obj: Any, name: str) -> Any:
        from ldm_patched.modules.utils import get_attr

        return get_attr(obj, name)

    def latent_unscale(self, p: Any, vae: Any) -> Any:
        # what reForge's own decode_first_stage applies before its VAE (modules_forge/forge_loader.py)
        return p.sd_model.forge_objects.unet.model.model_config.latent_format.process_out


def _low_rank(up: Any, down: Any, alpha: Any, mid: Any) -> engine.LowRankFactors:
    """Plain factors; a LoCon CP core is folded into `down` (still rank r), as lora_file does."""
    alpha = None if alpha is None else float(alpha)
    if mid is None:
        return engine.LowRankFactors(up, down, alpha)
    module = LowRankModule(canonical="", stem="", down=down, up=up, mid=mid, alpha=alpha)
    up_scaled, down_folded = module.factors(up.device)  # alpha/rank now inside up
    folded = down_folded.reshape(down_folded.shape[0], down.shape[1], *mid.shape[2:])
    return engine.LowRankFactors(up_scaled.reshape(up.shape[0], -1), folded, None)


def _refuse_replacements(value: Any) -> None:
    """Patches that replace a weight instead of adding to it cannot be one LoRA's delta."""
    kind = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else None
    if kind in ("set", "model_as_lora"):
        raise ValueError(f"a '{kind}' patch replaces the weight; it is not a LoRA delta")


def host_api(host: str) -> ForgeApi:
    return ReForgeApi() if host == "reforge" else ForgeApi()


API: ForgeApi = ForgeApi()


# ---------------------------------------------------------------- the script


def _strengths(params: KLoraParams) -> tuple[float, float]:
    return (params.subject_strength, params.style_strength)


class KLoraScript(webui.KLoraScriptBase):
    def process(self, p: Any, *args: Any) -> None:
        # K-LoRA's authors recommend S* for FLUX: the default there, unless the request chose a pattern.
        model_pattern = "s*" if webui.is_flux_model() else None
        job = job_start.begin_job(
            p,
            args,
            lambda first, hires: build_job(p, first, hires),
            model_pattern=model_pattern,
            check_loras=webui.check_lora_pair,
        )
        if job is None:
            return
        pair = job.params or job.hires_params
        engine.guard_sample(p, job, on_failure=lambda exc: guidance_glue.end_guidance(job))

        def decoder() -> Any:
            return (
                API.vae_decoder(p) if pair.guidance_decoder == "vae" else guidance_glue.taesd_decoder().decode
            )

        if guidance_glue.start_guidance(p, job, pair, decoder, lambda: engine.teardown(job)):
            job_start.prepare_job(p, pair)

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        # First pass: forge_objects were just reset from the LoRA-applied ones; the conds come next.
        job = getattr(p, "_klora", None)
        if job is not None and not getattr(p, "is_hr_pass", False):
            apply_text_encoder(p, job, job.params)

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        # Hires pass: activation is followed directly by the hires conds.
        job = getattr(p, "_klora", None)
        if job is not None and getattr(p, "is_hr_pass", False):
            apply_text_encoder(p, job, job.hires_params)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        # Forge calls this twice before the hires pass; everything here is idempotent.
        job = getattr(p, "_klora", None)
        if job is None or job.failed:
            return
        is_hires = bool(getattr(p, "is_hr_pass", False))
        params = job.params_for(is_hires)
        if params is None:
            engine.remove_hooks(job)
            return
        try:
            engine.install(job, _strengths(params))
            if job.guidance is not None and params.uses_guidance:
                unet = p.sd_model.forge_objects.unet.clone()
                unet.set_model_sampler_post_cfg_function(_post_cfg(p, job))
                # Ask the host's memory manager to leave room for the guidance models (it offloads instead).
                reserve = getattr(unet, "add_extra_preserved_memory_during_sampling", None)
                if callable(reserve):
                    reserve(job.guidance.memory_bytes())
                p.sd_model.forge_objects.unet = unet
        except Exception as exc:
            fail_job(p, job, exc)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        job = getattr(p, "_klora", None)
        if job is None:
            return
        engine.teardown(job)
        guidance_glue.end_guidance(job)
        p._klora = None
        if not job.failed:
            job_start.add_selection_maps(processed, job)


class ReadLoras:
    """The last job's two LoRAs as read through the host's key maps (module deltas, text-encoder patches),
    reused while the files' contents, the model and the text-encoder need stay the same: an identical next
    job reads and maps nothing (K-LoRA spent about 1 s more than stacked outside sampling per SDXL job on
    the CPU, live on Forge and reForge, most of it presumably this reading). A pair with a
    dense ΔW (LoHa, LoKr, DoRA ...) is read afresh each job: keeping dense ΔWs would hold a second copy of
    every adapted layer between jobs, and a DoRA ΔW depends on the weights the host holds when it is read."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.read: tuple[list[dict[str, engine.ModuleDelta]], list[dict]] | None = None

    def get(self, key: tuple) -> tuple[list[dict[str, engine.ModuleDelta]], list[dict]] | None:
        return self.read if key == self.key else None

    def put(self, key: tuple, deltas: list[dict[str, engine.ModuleDelta]], te: list[dict]) -> None:
        if any(delta.has_dense for found in deltas for delta in found.values()):
            self.clear()
        else:
            self.key, self.read = key, (deltas, te)

    def clear(self) -> None:
        self.key = self.read = None


read_loras = ReadLoras()


def build_job(p: Any, first: KLoraParams | None, hires: KLoraParams | None) -> engine.PatcherJob:
    """Read both LoRAs through the host's key maps (or reuse the last job's reading) and score their shared
    layers (cached by content)."""
    params = first or hires
    assert params is not None
    forge_objects = p.sd_model.forge_objects
    unet = forge_objects.unet
    files = [webui.lora_file(name) for name in (params.subject, params.style)]
    digests = [webui.score_cache.digests.digest(Path(f)) for f in files]
    read_key = (API.name, id(unet.model), *digests, params.te_policy != "none")
    kept = read_loras.get(read_key)
    if kept is None:
        kept = read_pair(forge_objects, files, params.te_policy != "none")
        read_loras.put(read_key, *kept)
    deltas, te = kept
    key = (*digests, f"{API.name}-{type(unet.model).__name__}")
    job = engine.build_patcher_job(
        first,
        hires,
        (deltas[0], deltas[1]),
        table=webui.score_cache.get(key),
        device=webui.score_device(),
        should_stop=lambda: bool(shared.state.interrupted),
    )
    webui.score_cache.put(key, job.table)
    job.te_patches = (te[0], te[1])
    return job


def read_pair(forge_objects: Any, files: list[str], with_te: bool) -> tuple[list[dict], list[dict]]:
    unet = forge_objects.unet

    def find(name: str) -> Any:
        try:
            return API.get_attr(unet.model, name)
        except AttributeError:
            return None

    deltas: list[dict[str, engine.ModuleDelta]] = []
    te: list[dict] = []
    for file in files:
        lora = API.load_file(file)
        found, _skipped = engine.module_deltas(
            API.unet_patches(unet, lora), find, API.decode, API.dense, describe=engine.describe_patch
        )
        deltas.append(found)
        te.append(API.clip_patches(forge_objects.clip, lora) if with_te else {})
    return deltas, te


def apply_text_encoder(p: Any, job: engine.PatcherJob, params: KLoraParams | None) -> None:
    """The policy's text-encoder LoRA parts, on a clone of the host's clip patcher (the host restores it)."""
    if params is None or params.te_policy == "none" or job.failed:
        return
    wanted = {"both": (0, 1), "subject": (0,), "style": (1,)}[params.te_policy]
    patches = [(which, job.te_patches[which]) for which in wanted if job.te_patches[which]]
    if not patches:
        return
    clip = p.sd_model.forge_objects.clip.clone()
    strengths = _strengths(params)
    for which, patch in patches:
        label = f"klora:{('subject', 'style')[which]}:{(params.subject, params.style)[which]}"
        clip = API.add_clip_patches(clip, patch, strengths[which], label)
    p.sd_model.forge_objects.clip = clip


def _post_cfg(p: Any, job: engine.PatcherJob) -> Any:
    def post_cfg(args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if job.guidance is None or job.failed or shared.state.interrupted:
            return denoised
        try:
            return job.guidance.apply(denoised, args["sigma"], job.tracker.step, job.tracker.steps)
        except Exception as exc:  # guidance stops, the fusion goes on
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            guidance_glue.guidance_off(p, job, f"guidance failed and was switched off: {exc}")
            return denoised

    return post_cfg


# ---------------------------------------------------------------- callbacks


def on_cfg_denoiser(params: Any) -> None:
    denoiser = params.denoiser
    p = getattr(denoiser, "p", None)
    job = getattr(p, "_klora", None)
    if job is None or job.failed:
        return
    try:
        is_hires = bool(getattr(p, "is_hr_pass", False))
        engine.on_step(job, denoiser, is_hires, job_start.evals_per_step(denoiser))
    except Exception as exc:  # callbacks must not raise: the host logs it every step
        fail_job(p, job, exc)


def fail_job(p: Any, job: engine.PatcherJob, exc: BaseException) -> None:
    job_start.report_failure(p, job, exc)
    engine.teardown(job)
    guidance_glue.end_guidance(job)


def on_model_loaded(_model: Any) -> None:
    guidance_glue.taesd_decoders.clear()
    read_loras.clear()  # it holds the old model's layers


def register_callbacks(host: str) -> None:
    global API
    API = host_api(host)
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_ui_settings(webui.on_ui_settings)
    script_callbacks.on_before_ui(webui.on_before_ui)
    script_callbacks.on_app_started(webui.make_app_started(plan_for_names))


def plan_for_names(subject: str, style: str, settings: Any) -> Any:
    """The plan route's plan. OFT/BOFT: Forge skips those layers and reForge rotates with ComfyUI's maths
    (another norm constraint than A1111's), so a plan from the file would not be the host's: refused."""
    from lib_klora.fusion.from_files import BaseWeightsNeeded

    try:
        return webui.plan_for_names(subject, style, settings)
    except BaseWeightsNeeded as exc:
        raise BaseWeightsNeeded(exc.path, exc.layer, FORGE_OFT_HINT) from None


FORGE_OFT_HINT = (
    "Forge does not apply OFT/BOFT layers and reForge applies them with its own maths, so this route does "
    "not plan them; a generation on reForge scores them with reForge's own ΔW, and "
    "`python -m lib_klora plan --model` plans them as AUTOMATIC1111 applies them"
)
