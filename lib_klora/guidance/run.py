"""One generation's reference guidance, host-free: models, references, the per-step decision and the nudge.

Hosts build a :class:`GuidanceRun` before sampling (outside any inference mode) with a differentiable
``decode`` of their latents, then call :meth:`GuidanceRun.apply` with the CFG-combined x̂0 of each step.
Encoders are expensive to build, so :class:`GuidanceModels` keeps them between jobs (optionally moved to
the CPU while idle).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib_klora.guidance.encoders import ClipImageEncoder, DinoEncoder
from lib_klora.guidance.refine import (
    Decode,
    GuidanceConfig,
    GuidanceEncoders,
    ReferenceSet,
    guide_x0,
    should_guide,
)
from lib_klora.params.model import KLoraParams
from lib_klora.params.parsing import clip_model_parts
from lib_klora.params.references import decode_reference_image

Progress = Callable[[str], None]
_CLIP_TERMS = ("style_clip", "subject_clip", "text_clip")


def guidance_config(params: KLoraParams) -> GuidanceConfig:
    return GuidanceConfig(
        style_clip=params.guidance_style,
        subject_dino=params.guidance_subject,
        subject_clip=params.guidance_subject_clip,
        text_clip=params.guidance_text,
        eta=params.guidance_eta,
        start=params.guidance_start,
        end=params.guidance_end,
        every=params.guidance_every,
        iters=params.guidance_iters,
        decoder=params.guidance_decoder,
    )


class GuidanceModels:
    """CLIP/DINO encoders kept between jobs, keyed by model name; weights live in `weights_dir`.

    `random_weights` builds the real architectures with random weights (tests, offline demos).
    """

    def __init__(self, weights_dir: str | Path | None, *, random_weights: bool = False) -> None:
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.random_weights = random_weights
        self._encoders: dict[tuple[str, str], Any] = {}

    def clip(
        self, spec: str, device: torch.device | str, progress: Progress | None = None
    ) -> ClipImageEncoder:
        key = ("clip", spec)
        if key not in self._encoders:
            model, tag = clip_model_parts(spec)
            self._encoders[key] = ClipImageEncoder(
                model, None if self.random_weights else tag, self.weights_dir, progress=progress
            )
        return self._encoders[key].to(device)

    def dino(self, name: str, device: torch.device | str, progress: Progress | None = None) -> DinoEncoder:
        key = ("dino", name)
        if key not in self._encoders:
            self._encoders[key] = DinoEncoder(
                name, not self.random_weights, self.weights_dir, progress=progress
            )
        return self._encoders[key].to(device)

    def offload(self) -> None:
        """Move every encoder to the CPU (between jobs, to free accelerator memory)."""
        for encoder in self._encoders.values():
            encoder.to("cpu")

    def clear(self) -> None:
        self._encoders.clear()

    def __len__(self) -> int:
        return len(self._encoders)


class GuidanceRun:
    """Guidance of one job: which steps, towards which references, and the x̂0 nudge."""

    def __init__(
        self, config: GuidanceConfig, encoders: GuidanceEncoders, references: ReferenceSet, decode: Decode
    ) -> None:
        self.config = config
        self.encoders = encoders
        self.references = references
        self.decode = decode
        self.guided = 0  # guided evaluations so far, for the job's summary

    @classmethod
    def build(
        cls,
        params: KLoraParams,
        models: GuidanceModels,
        decode: Decode,
        *,
        prompt: str = "",
        device: torch.device | str = "cpu",
        progress: Progress | None = None,
    ) -> GuidanceRun:
        """Load the encoders the active terms need and embed the references (once per job).

        Raises ReferenceImageError, ModelUnavailableError (with what to download where) or GuidanceError.
        """
        config = guidance_config(params)
        terms = params.guidance_terms()
        style_images = [
            decode_reference_image(data, name=f"style reference {i}")
            for i, data in enumerate(params.style_refs, 1)
        ]
        subject_images = [
            decode_reference_image(data, name=f"subject reference {i}")
            for i, data in enumerate(params.subject_refs, 1)
        ]
        encoders = GuidanceEncoders(
            clip=models.clip(params.clip_model, device, progress) if set(terms) & set(_CLIP_TERMS) else None,
            dino=models.dino(params.dino_model, device, progress) if "subject_dino" in terms else None,
        )
        references = ReferenceSet.build(
            encoders, style_images=style_images, subject_images=subject_images, prompt=prompt, cfg=config
        )
        config.validate(references)
        return cls(config, encoders, references, decode)

    def memory_bytes(self) -> int:
        """Rough device memory guidance needs while sampling: its models' parameters, plus about as much
        again for the activations and gradients of one guided step (encoders at 224 px, batch-sized)."""
        modules = [getattr(self.encoders.clip, "model", None), getattr(self.encoders.dino, "model", None)]
        modules.append(getattr(self.decode, "__self__", None))  # a TaesdDecoder's bound decode
        total = 0
        for module in modules:
            if isinstance(module, torch.nn.Module):
                total += sum(p.numel() * p.element_size() for p in module.parameters())
        return 2 * total

    def wants(self, step: int, steps: int) -> bool:
        return should_guide(step, steps, self.config)

    def apply(self, x0: torch.Tensor, sigma: float | torch.Tensor, step: int, steps: int) -> torch.Tensor:
        """x̂0 nudged towards the references when `step` of `steps` is guided; else `x0` itself."""
        if not self.wants(step, steps):
            return x0
        self.guided += 1
        return guide_x0(x0, sigma, self.decode, self.encoders, self.references, self.config)
