"""From LoRA files to a fusion plan: read, check compatibility, score once (cached), plan."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from lib_klora.errors import IncompatibleLorasError, LoraFileError
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.plan import FusionPlan, PlanSettings
from lib_klora.fusion.scores import ScoreTable, compute_scores
from lib_klora.loras.lora_file import LoraFile, read_lora_file
from lib_klora.loras.oft import BaseWeights, OftModule, OftShapeError

default_cache = ScoreCache()
DENOISER_COMPONENTS = ("unet:", "transformer:")


NEEDS_MODEL_HINT = (
    "score it where the model is: `python -m lib_klora plan --model <diffusers folder or .safetensors "
    "checkpoint>`, the WebUI's /klora/v1/plan route, or a generation in the WebUI"
)


class BaseWeightsNeeded(LoraFileError):
    """A layer's ΔW depends on the base model's weights (OFT/BOFT) and none were given."""

    def __init__(self, path: str | Path, layer: str, hint: str = NEEDS_MODEL_HINT) -> None:
        super().__init__(
            path,
            f"{layer}: its ΔW depends on the base model's weights, which a LoRA file does not hold; {hint}",
            layer.rpartition(" ")[2],
        )
        self.layer = layer  # "OFT layer <stem>"


def denoiser_modules(lora: LoraFile, base_weights: BaseWeights | None = None) -> dict:
    """Only denoiser layers take part in per-step selection: a text encoder runs once per prompt, so its
    LoRA layers follow the text-encoder policy instead, and they stay out of scores and γ. OFT/BOFT layers
    are bound to the base model's weights (`base_weights`); without them they are refused."""
    chosen = {name: m for name, m in lora.modules.items() if name.startswith(DENOISER_COMPONENTS)}
    return bind_base_weights(lora, chosen, base_weights)


def bind_base_weights(
    lora: LoraFile, modules: Mapping[str, object], base_weights: BaseWeights | None
) -> dict:
    """`modules` with each OFT/BOFT layer bound to its base weight; raises `LoraFileError` naming the file,
    the layer and what to do when the weight is not there."""
    out: dict[str, object] = {}
    for name, module in modules.items():
        if not isinstance(module, OftModule):
            out[name] = module
            continue
        what = f"{module.format_name} layer {module.stem}"
        if base_weights is None:
            raise BaseWeightsNeeded(lora.path, what)
        weight = base_weights.lookup(lora.path, name, module.stem)
        if weight is None:
            raise LoraFileError(
                lora.path,
                f"{what}: the model has no layer {name} to rotate (a LoRA for another base model?)",
                module.stem,
            )
        try:
            out[name] = module.bind(weight)
        except OftShapeError as exc:
            raise LoraFileError(lora.path, str(exc), module.stem) from None
    return out


def _uses_base_weights(lora: LoraFile) -> bool:
    return any(isinstance(m, OftModule) for n, m in lora.modules.items() if n.startswith(DENOISER_COMPONENTS))


def check_compatible(loras: Sequence[LoraFile], model_architecture: str | None = None) -> None:
    """Refuse LoRAs made for different base models (or for another model than the loaded one, where the
    host tells it) before any scoring work."""
    _check_architectures([(lora.path, lora.architecture) for lora in loras], model_architecture)


def _check_architectures(found: Sequence[tuple[Path, str | None]], model_architecture: str | None) -> None:
    known = [(path, arch) for path, arch in found if arch]
    if len({arch for _, arch in known}) > 1:
        detail = ", ".join(f"{path.name} is {arch}" for path, arch in known)
        raise IncompatibleLorasError(f"the LoRAs were trained for different base models ({detail})")
    for path, arch in known:
        if model_architecture and arch != model_architecture:
            raise IncompatibleLorasError(
                f"{path.name} was trained for a different base model ({arch}) than the loaded one "
                f"({model_architecture})"
            )


_checked: dict[tuple[str, int, int], str | LoraFileError | None] = {}  # (path, size, mtime) -> arch or error
_CHECKED_LIMIT = 64


def checked_architecture(path: str | os.PathLike[str]) -> str | None:
    """Read a LoRA file as the plan route does (header, tensors, NaN/Inf, layers) and return its base
    architecture; raises `LoraFileError`. Remembered per (path, size, mtime), so a request validator can
    call it for every request. The file is only read."""
    file = Path(path)
    try:
        stat = file.stat()
        key: tuple[str, int, int] | None = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _checked:
        result = _checked[key]
    else:
        try:
            result = read_lora_file(file).architecture
        except LoraFileError as exc:
            result = exc
        if key is not None:
            while len(_checked) >= _CHECKED_LIMIT:
                _checked.pop(next(iter(_checked)))
            _checked[key] = result
    if isinstance(result, LoraFileError):
        raise result
    return result


def check_lora_files(paths: Sequence[str | os.PathLike[str]], model_architecture: str | None = None) -> None:
    """The plan route's checks of a subject/style pair, for every other route (API validator, UI job
    start): each file readable and finite, both for the same base model (and the loaded one when known)."""
    _check_architectures([(Path(p), checked_architecture(p)) for p in paths], model_architecture)


def load_score_table(
    paths: Sequence[str | os.PathLike[str]],
    *,
    device: str | torch.device | None = "auto",
    cache: ScoreCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    base_weights: BaseWeights | None = None,
) -> ScoreTable:
    """Scores of the files' layer pairs (cached by file content). `base_weights`: the model's weights, which
    OFT/BOFT layers need (their scores are cached for that model only); other files do not use them."""
    cache = default_cache if cache is None else cache
    files = [Path(p) for p in paths]
    known = [cache.digests.peek(f) for f in files]
    looked_up = all(known)
    if looked_up:  # unchanged files: answer without reading them (an OFT table is never under this key)
        table = cache.get(tuple(known))  # type: ignore[arg-type]
        if table is not None:
            return table
    loras = [read_lora_file(f) for f in files]
    for lora in loras:
        cache.digests.remember(lora.path, lora.sha256)
    digests = tuple(lora.sha256 for lora in loras)
    model_bound = base_weights is not None and any(_uses_base_weights(lora) for lora in loras)
    if model_bound:
        assert base_weights is not None
        digests += (hashlib.sha256(base_weights.identity.encode()).hexdigest(),)
    if (model_bound or not looked_up) and (table := cache.get(digests)) is not None:
        return table
    check_compatible(loras)
    table = compute_scores(
        [denoiser_modules(lora, base_weights) for lora in loras],
        device=device,
        progress=progress,
        labels=[str(f) for f in files],
    )
    cache.put(digests, table)
    return table


def plan_from_files(
    subject: str | os.PathLike[str],
    style: str | os.PathLike[str],
    settings: PlanSettings | None = None,
    *,
    device: str | torch.device | None = "auto",
    cache: ScoreCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    base_weights: BaseWeights | None = None,
) -> FusionPlan:
    table = load_score_table(
        [subject, style], device=device, cache=cache, progress=progress, base_weights=base_weights
    )
    return FusionPlan(table, settings)
