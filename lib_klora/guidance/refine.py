"""Latent-level refinement (LLR): nudge the sampler's x̂0 towards reference images with CLIP/DINO gradients.

Algorithm (dynamic-fusion.md §3.2, recommended defaults §5):

* Once per job, embed the references (:class:`ReferenceSet`): style images with CLIP, subject images with
  DINO (and optionally CLIP), optionally the prompt with CLIP's text tower.
* At each guided step (:func:`should_guide`), with the UNet detached (∂x̂0/∂x_t ≈ I): decode x̂0 to an image,
  embed it, and take the gradient of the objective (:func:`objective`: weighted mean cosine similarities to
  the references, the quantity the evaluation reports) w.r.t. x̂0. Normalise it per sample and step
  ``x̂0 + η·s(σ)·ĝ``, ``iters`` times (:func:`guide_x0`).

The noise-level scale is s(σ) = σ/√(σ²+1) (k-diffusion σ), which equals √(1−ᾱ_t) for SD's variance-preserving
schedule: large corrections while the image is still noise, vanishing ones as it settles, so late steps do not
get high-frequency artefacts. ĝ is the per-sample L2-normalised gradient rescaled by √D (D = latent elements
per sample), i.e. unit RMS, so η is in units of the latent's RMS whatever the resolution (η0 = 0.05 default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from PIL import Image

from lib_klora.errors import KLoraError
from lib_klora.guidance.encoders import ClipImageEncoder, DinoEncoder, ImageEncoder

Decode = Callable[[torch.Tensor], torch.Tensor]
"""Latent [B, C, h, w] (sampler space) → image [B, 3, H, W] in [0, 1], differentiable."""


class GuidanceError(KLoraError):
    """Invalid guidance settings, missing references or unusable guidance models."""


@dataclass(frozen=True)
class GuidanceConfig:
    """Settings of latent guidance. Weights ≥ 0; a term whose weight is 0 or whose references are missing is
    off. Guidance is active when η > 0 and some weight > 0.

    start/end: progress window [start, end) over r = step/steps (0 = first step). every: guide every k-th
    step of that window, counting from its first step. iters: gradient steps per guided step. decoder: which
    decoder the host should pass as ``decode`` ("taesd" is cheap; "vae" is the full VAE in fp32).
    """

    style_clip: float = 1.0
    subject_dino: float = 1.0
    subject_clip: float = 0.0
    text_clip: float = 0.0
    eta: float = 0.05
    start: float = 0.0
    end: float = 0.9
    every: int = 1
    iters: int = 1
    decoder: Literal["taesd", "vae"] = "taesd"

    @property
    def weights(self) -> dict[str, float]:
        return {
            "style_clip": self.style_clip,
            "subject_dino": self.subject_dino,
            "subject_clip": self.subject_clip,
            "text_clip": self.text_clip,
        }

    @property
    def active(self) -> bool:
        return self.eta > 0 and any(w > 0 for w in self.weights.values())

    def effective_weights(self, refs: ReferenceSet | None) -> dict[str, float]:
        """Weights of the terms that will actually run: positive weight and references present."""
        if refs is None:
            return {}
        return {k: w for k, w in self.weights.items() if w > 0 and refs.get(k) is not None}

    def missing_references(self, refs: ReferenceSet | None) -> list[str]:
        """Terms with a positive weight but no references (they are silently off; worth a UI warning)."""
        return [k for k, w in self.weights.items() if w > 0 and (refs is None or refs.get(k) is None)]

    def validate(self, refs: ReferenceSet | None = None, *, check_refs: bool = True) -> GuidanceConfig:
        """Raise :class:`GuidanceError` listing every problem; return self when valid.

        With ``check_refs``, an active config must have references for at least one of its terms: guidance
        switched on with nothing to guide towards is a user mistake, not a silent no-op.
        """
        problems: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name} must be a finite number, got {value!r}")
        for name, w in self.weights.items():
            if w < 0:
                problems.append(f"{name} weight must be ≥ 0, got {w:g}")
        if self.eta < 0:
            problems.append(f"eta must be ≥ 0, got {self.eta:g}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            problems.append(f"need 0 ≤ start ≤ end ≤ 1, got start {self.start:g}, end {self.end:g}")
        if self.every < 1:
            problems.append(f"every must be ≥ 1, got {self.every}")
        if self.iters < 1:
            problems.append(f"iters must be ≥ 1, got {self.iters}")
        if self.decoder not in ("taesd", "vae"):
            problems.append(f"decoder must be 'taesd' or 'vae', got {self.decoder!r}")
        if check_refs and not problems and self.active and not self.effective_weights(refs):
            wanted = ", ".join(self.missing_references(refs))
            problems.append(
                f"guidance is on ({wanted}) but there are no reference images for it: upload style and/or "
                "subject reference images (or a prompt for text_clip), or set eta / the weights to 0"
            )
        if problems:
            raise GuidanceError("; ".join(problems))
        return self


def should_guide(step: int, steps: int, cfg: GuidanceConfig) -> bool:
    """Whether 0-based ``step`` of ``steps`` is guided.

    Step i has progress r = i/steps and is in the window when start ≤ r < end. Within the window every
    ``every``-th step is guided, counting from the window's first step, so the first one always is.
    """
    if not cfg.active or steps <= 0 or not 0 <= step < steps:
        return False
    first = math.ceil(cfg.start * steps - 1e-9)  # first i with i/steps ≥ start (tolerant of float noise)
    if step < first or step / steps >= cfg.end:
        return False
    return (step - first) % cfg.every == 0


def guided_steps(steps: int, cfg: GuidanceConfig) -> list[int]:
    """Every guided 0-based step index (the paper's "m" is its length)."""
    return [i for i in range(steps) if should_guide(i, steps, cfg)]


@dataclass
class GuidanceEncoders:
    """The encoders guidance may use; a term whose encoder is missing cannot be built into references."""

    clip: ClipImageEncoder | ImageEncoder | None = None
    dino: DinoEncoder | ImageEncoder | None = None


# Which encoder embeds each term's generated image.
_TERM_ENCODER = {"style_clip": "clip", "subject_clip": "clip", "text_clip": "clip", "subject_dino": "dino"}


@dataclass
class ReferenceSet:
    """Normalised reference embeddings [N, D] per term, computed once per job (None = no references)."""

    style_clip: torch.Tensor | None = None
    subject_dino: torch.Tensor | None = None
    subject_clip: torch.Tensor | None = None
    text_clip: torch.Tensor | None = None

    def get(self, term: str) -> torch.Tensor | None:
        emb = getattr(self, term)
        return emb if emb is not None and emb.numel() else None

    @property
    def empty(self) -> bool:
        return all(self.get(k) is None for k in _TERM_ENCODER)

    @classmethod
    def build(
        cls,
        encoders: GuidanceEncoders,
        *,
        style_images: Sequence[Image.Image] = (),
        subject_images: Sequence[Image.Image] = (),
        prompt: str | None = None,
        cfg: GuidanceConfig | None = None,
    ) -> ReferenceSet:
        """Embed the references. With ``cfg``, only terms with a positive weight are computed (saves time)."""

        def wanted(term: str) -> bool:
            return cfg is None or cfg.weights[term] > 0

        def need(kind: str, term: str) -> ImageEncoder:
            enc = getattr(encoders, kind)
            if enc is None:
                raise GuidanceError(f"{term} guidance needs a {kind.upper()} encoder, and none was given")
            return enc

        refs = cls()
        if style_images and wanted("style_clip"):
            refs.style_clip = need("clip", "style_clip").embed_pil(list(style_images))
        if subject_images and wanted("subject_dino"):
            refs.subject_dino = need("dino", "subject_dino").embed_pil(list(subject_images))
        if subject_images and wanted("subject_clip"):
            refs.subject_clip = need("clip", "subject_clip").embed_pil(list(subject_images))
        if prompt and prompt.strip() and wanted("text_clip"):
            clip = need("clip", "text_clip")
            if not hasattr(clip, "embed_text"):
                raise GuidanceError("text_clip guidance needs a CLIP encoder with a text tower")
            refs.text_clip = clip.embed_text([prompt])  # type: ignore[union-attr]
        return refs


def _usable(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Reference embeddings made inside inference mode are inference tensors, which autograd cannot save for
    # the backward pass; a clone made outside inference mode is an ordinary tensor.
    t = t.to(device=like.device, dtype=like.dtype)
    return t.clone() if t.is_inference() else t


def objective(
    x0_latent: torch.Tensor,
    decode: Decode,
    encoders: GuidanceEncoders,
    refs: ReferenceSet,
    cfg: GuidanceConfig,
) -> torch.Tensor:
    """Σ_term weight · mean over (image, reference) pairs of cos(embedding(image), reference): a scalar to
    maximise. Zero (a constant) when no term is effective."""
    weights = cfg.effective_weights(refs)
    if not weights:
        return x0_latent.new_zeros(())
    image = decode(x0_latent)
    embedded: dict[str, torch.Tensor] = {}
    total = x0_latent.new_zeros((), dtype=torch.float32)
    for term, w in weights.items():
        kind = _TERM_ENCODER[term]
        if kind not in embedded:
            enc = getattr(encoders, kind)
            if enc is None:
                raise GuidanceError(f"{term} guidance needs a {kind.upper()} encoder, and none was given")
            embedded[kind] = enc.embed(image)
        emb = embedded[kind]
        ref = _usable(refs.get(term), emb)  # type: ignore[arg-type]
        total = total + w * (emb @ ref.T).mean()
    return total


def sigma_scale(sigma: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """s(σ) = σ/√(σ²+1) as a [B, 1, 1, 1] float32 tensor; σ may be a number, a scalar or one per row."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device).detach().flatten()
    if s.numel() == 1:
        s = s.expand(batch)
    elif s.numel() != batch:
        raise GuidanceError(f"sigma has {s.numel()} values for a batch of {batch}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise GuidanceError(f"sigma must be finite and ≥ 0, got {s.tolist()}")
    return (s / torch.sqrt(s * s + 1.0)).view(batch, *([1] * (like.ndim - 1)))


def normalise_gradient(g: torch.Tensor) -> torch.Tensor:
    """Per-sample unit-RMS gradient (L2 over the latent dims, ×√D); rows that are not finite become zero
    (a NaN from an fp16 backward must not poison the image)."""
    dims = tuple(range(1, g.ndim))
    finite = torch.isfinite(g).all(dim=dims, keepdim=True)
    g = torch.where(finite, g, torch.zeros_like(g))
    rms = g.pow(2).mean(dim=dims, keepdim=True).sqrt()
    # Exact unit RMS however small the gradient (random or saturated models give tiny ones); zero rows stay 0.
    return torch.where(rms > 0, g / rms.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))


def _check_models(decode: Decode, encoders: GuidanceEncoders) -> None:
    owner = getattr(decode, "__self__", decode)  # a bound method such as TaesdDecoder.decode
    for m in (owner, getattr(encoders.clip, "model", None), getattr(encoders.dino, "model", None)):
        p = next(m.parameters(), None) if isinstance(m, torch.nn.Module) else None
        if p is not None and p.is_inference():
            raise GuidanceError(
                "guidance models were built inside torch.inference_mode(), so autograd cannot use them; "
                "build them under torch.inference_mode(False) (the encoder and TAESD loaders do so)"
            )


def guide_x0(
    x0: torch.Tensor,
    sigma: float | torch.Tensor,
    decode: Decode,
    encoders: GuidanceEncoders,
    refs: ReferenceSet | None,
    cfg: GuidanceConfig,
) -> torch.Tensor:
    """Return x̂0 moved up the objective's gradient; ``x0`` itself is never modified.

    Samplers run under ``torch.no_grad()`` (A1111) or ``torch.inference_mode()`` (Forge), so the gradient is
    taken under ``inference_mode(False)`` + ``enable_grad()`` on a detached float32 clone. The final add runs
    in the caller's mode, so the result is an inference tensor exactly when the caller expects one. Returns
    ``x0`` unchanged (same object) when guidance is inactive or there is nothing to guide towards.
    """
    if not cfg.active or refs is None or not cfg.effective_weights(refs):
        return x0
    if isinstance(decode, torch.nn.Module) and hasattr(decode, "decode"):
        decode = decode.decode  # a TaesdDecoder passed directly: use its [0, 1] differentiable view
    _check_models(decode, encoders)
    batch = x0.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        start = x0.detach().to(torch.float32).clone()  # a clone outside inference mode is an ordinary tensor
        scale = sigma_scale(sigma, batch, start)
        z = start
        for _ in range(cfg.iters):
            z = z.detach().requires_grad_(True)
            value = objective(z, decode, encoders, refs, cfg)
            (grad,) = torch.autograd.grad(value, z)
            z = z.detach() + cfg.eta * scale * normalise_gradient(grad)
        delta = (z - start).detach()
    return (x0.to(torch.float32) + delta).to(x0.dtype)
