"""x̂0 from a diffusers scheduler's model output and back, so guidance can nudge x̂0 inside `scheduler.step`.

Three families cover diffusers' schedulers; each is an affine map between the model output m and x̂0 for
the step's sample x (so the nudged x̂0 turns back into the model output the scheduler expects):

* flow matching (FLUX, SD3: ``FlowMatch*``): x = (1 − σ)·x0 + σ·ε, m = ε − x0  →  x0 = x − σ·m;
* k-diffusion scale (Euler, Heun, DPM2 ...; ``init_noise_sigma`` > 1): x = x0 + σ·ε;
* DDPM scale (DDIM, DDPM, PNDM, DPM-Solver, UniPC ...): x = √ᾱ·x0 + √(1 − ᾱ)·ε.

The σ returned is the variance-exploding noise level of the step (what `guide_x0` scales its nudge by).
Duck-typed: nothing here imports diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lib_klora.guidance.refine import GuidanceError

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class X0Map:
    to_x0: Map  # model output -> x̂0
    from_x0: Map  # x̂0 -> model output
    sigma: float


def _step_index(scheduler: Any, timestep: Any) -> int:
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = scheduler.index_for_timestep(timestep)
    return int(index)


def x0_map(scheduler: Any, timestep: Any, sample: torch.Tensor) -> X0Map:
    """The model output ↔ x̂0 maps of this step; raises GuidanceError for schedulers it does not know."""
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    name = type(scheduler).__name__
    x = sample.float()
    if name.startswith("FlowMatch"):
        sigma = float(scheduler.sigmas[_step_index(scheduler, timestep)])
        if sigma <= 0:
            raise GuidanceError("flow-matching step at σ = 0: nothing left to guide")
        return X0Map(
            lambda m: x - sigma * m.float(), lambda x0: (x - x0) / sigma, sigma / max(1 - sigma, 1e-6)
        )
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
        sigma = float(sigmas[_step_index(scheduler, timestep)])
        if sigma <= 0:
            raise GuidanceError("step at σ = 0: nothing left to guide")
        if kind == "epsilon":
            return X0Map(lambda m: x - sigma * m.float(), lambda x0: (x - x0) / sigma, sigma)
        if kind == "v_prediction":
            c = (sigma * sigma + 1) ** 0.5
            return X0Map(
                lambda m: x / (c * c) - sigma / c * m.float(),
                lambda x0: (x / (c * c) - x0) * c / sigma,
                sigma,
            )
    elif hasattr(scheduler, "alphas_cumprod"):
        t = int(torch.as_tensor(timestep).flatten()[0])
        a = float(scheduler.alphas_cumprod[t])
        root_a, root_b = a**0.5, (1 - a) ** 0.5
        sigma = root_b / root_a
        if kind == "epsilon":
            return X0Map(
                lambda m: (x - root_b * m.float()) / root_a, lambda x0: (x - root_a * x0) / root_b, sigma
            )
        if kind == "v_prediction":
            return X0Map(
                lambda m: root_a * x - root_b * m.float(), lambda x0: (root_a * x - x0) / root_b, sigma
            )
    else:
        raise GuidanceError(f"reference guidance does not know the scheduler {name}")
    if kind == "sample":
        return X0Map(lambda m: m.float(), lambda x0: x0, sigma)
    raise GuidanceError(f"reference guidance does not support prediction_type {kind!r} ({name})")
