"""Image encoders for latent guidance and evaluation: a CLIP image/text tower (open_clip) and DINO (timm).

Both wrap a private copy of a real architecture with differentiable preprocessing done in torch, so a gradient
flows from the embedding back to the image and, through the decoder, to the latent.

Weights, in order of preference:
1. ``<weights_dir>/open_clip_<model>_<tag>.safetensors`` or ``<weights_dir>/timm_<model>.safetensors``;
2. with a ``weights_dir``: a download of that file from the Hugging Face hub into it (guidance/downloads.py);
   without one, the library's own download (open_clip / timm via the hub, which also finds its local cache);
3. otherwise :class:`ModelUnavailableError`, naming the Hugging Face repo, the file and where to put it.

Models are built under ``torch.inference_mode(False)`` so their parameters are ordinary tensors: Forge samples
inside ``inference_mode``, and inference tensors cannot take part in autograd. The host glue may therefore
construct them from anywhere. All parameters get ``requires_grad_(False)`` and the models are in eval mode.

Only ``open_clip.create_model_and_transforms``, ``get_tokenizer``, ``encode_image`` and ``encode_text`` are
used (plus ``get_pretrained_cfg`` where present, for messages), so open-clip-torch 2.20 (A1111 v1.10.1) works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib_klora.errors import KLoraError, ModelUnavailableError
from lib_klora.guidance.downloads import Progress, download_file, hub_reachable

DEFAULT_CLIP = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_DINO = "vit_small_patch16_224.dino"
# Hugging Face repos of common tags, for messages when open_clip has no hub entry (2.20 + openai)
_CLIP_HF_REPOS = {
    ("ViT-B-32", "laion2b_s34b_b79k"): "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    ("ViT-B-16", "laion2b_s34b_b88k"): "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    ("ViT-L-14", "laion2b_s32b_b82k"): "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
    ("ViT-L-14", "openai"): "timm/vit_large_patch14_clip_224.openai",
    ("ViT-B-32", "openai"): "timm/vit_base_patch32_clip_224.openai",
    ("ViT-B-16", "openai"): "timm/vit_base_patch16_clip_224.openai",
}
_OPEN_CLIP_HF_FILE = "open_clip_model.safetensors"
_TIMM_HF_FILE = "model.safetensors"
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _weights_hint(weights_dir: str | Path | None) -> str:
    return str(weights_dir) if weights_dir is not None else "<weights_dir> (the folder passed as weights_dir)"


@contextlib.contextmanager
def _normal_tensors() -> Iterator[None]:
    """Create parameters as ordinary tensors, even when called from inside ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextlib.contextmanager
def _library_download() -> Iterator[None]:
    """Let open_clip/timm fetch weights; when the hub is unreachable, switch huggingface_hub to offline mode
    for the call, so a cached copy still loads and a miss fails at once instead of after ~1 min of retries."""
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        yield
        return
    if getattr(hub, "HF_HUB_OFFLINE", False) or hub_reachable():
        yield
        return
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelUnavailableError(f"{path}: cannot read as safetensors: {exc}") from exc


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image → float tensor [3, H, W] in [0, 1] (alpha dropped, greyscale/palette converted)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    exact: bool = False,
) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] → normalised [B, 3, size, size]: shorter side to ``size``, centre crop.

    ``exact=False`` (guidance) is cheap and differentiable: integer average pooling first when shrinking by
    2× or more (a cheap anti-alias; plain bilinear would alias badly from 512+ px), then bilinear without
    antialias. ``exact=True`` (references, evaluation) uses bicubic with antialias, close to the models' own
    PIL pipelines.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise KLoraError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    short = min(h, w)
    x = images
    if exact:
        nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    else:
        factor = short // size
        if factor >= 2:
            x = F.avg_pool2d(x, kernel_size=factor)
            h, w = x.shape[-2:]
        nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class ImageEncoder:
    """Shared plumbing: device/dtype moves, preprocessing, normalised embeddings."""

    kind = "image"

    def __init__(
        self, model: torch.nn.Module, name: str, size: int, mean: Sequence[float], std: Sequence[float]
    ):
        model.eval().requires_grad_(False)
        self.model = model
        self.name = name
        self.size = int(size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.random_weights = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImageEncoder:
        # A move inside inference mode would turn the parameters into inference tensors.
        with _normal_tensors():
            self.model.to(device=device, dtype=dtype)
        return self

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, images: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → L2-normalised float32 embeddings [B, D]; differentiable."""
        x = preprocess(images.to(self.device), self.size, self.mean, self.std, exact=exact)
        feats = self._features(x.to(self.dtype)).float()
        return F.normalize(feats, dim=-1)

    def embed_pil(self, images: Sequence[Image.Image], *, batch_size: int = 8) -> torch.Tensor:
        """Embeddings of PIL images of any sizes (exact preprocessing, no gradient): [N, D]."""
        out: list[torch.Tensor] = []
        with _normal_tensors():
            for i in range(0, len(images), batch_size):
                chunk = [pil_to_tensor(im) for im in images[i : i + batch_size]]
                # Same-size images share one forward; others go one by one (preprocessing crops per image).
                if all(t.shape == chunk[0].shape for t in chunk):
                    out.append(self.embed(torch.stack(chunk), exact=True))
                else:
                    out.extend(self.embed(t[None], exact=True) for t in chunk)
        if not out:
            return torch.empty(0, 0)
        return torch.cat(out)


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise ModelUnavailableError(
            "CLIP guidance/evaluation needs the open_clip package: pip install open-clip-torch"
        ) from exc
    return open_clip


def _clip_hf_repo(open_clip: Any, model_name: str, tag: str) -> str | None:
    """The Hugging Face repo open_clip downloads from ("org/name/" or "org/name/file" in its config)."""
    hub = ""
    get_cfg = getattr(open_clip, "get_pretrained_cfg", None)
    if get_cfg is not None:
        with contextlib.suppress(Exception):
            hub = (get_cfg(model_name, tag) or {}).get("hf_hub", "") or ""
    parts = hub.strip("/").split("/")
    if len(parts) >= 2:
        return "/".join(parts[:2])
    return _CLIP_HF_REPOS.get((model_name, tag))


def _clip_known_tag(open_clip: Any, model_name: str, tag: str) -> bool | None:
    """True/False when the installed open_clip can tell, None when it cannot."""
    get_cfg = getattr(open_clip, "get_pretrained_cfg", None)
    if get_cfg is None:
        return None
    try:
        return bool(get_cfg(model_name, tag))
    except Exception:
        return None


def _transform_info(preprocess_val: Any, model: torch.nn.Module) -> tuple[int, tuple, tuple]:
    """Input size and mean/std from open_clip's own eval transform (present in every version)."""
    size: Any = None
    mean, std = _OPENAI_MEAN, _OPENAI_STD
    for t in getattr(preprocess_val, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            mean, std = tuple(t.mean), tuple(t.std)
        elif type(t).__name__ == "CenterCrop":
            size = t.size
    if size is None:
        size = getattr(getattr(model, "visual", None), "image_size", 224)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size), mean, std


class ClipImageEncoder(ImageEncoder):
    """open_clip model: image embeddings (:meth:`embed`) and text embeddings (:meth:`embed_text`).

    ``pretrained=None`` gives randomly initialised weights (tests, demos). OpenAI weights use QuickGELU; that
    is switched on for the ``openai`` tag when loading from a local file.
    """

    kind = "clip"

    def __init__(
        self,
        model_name: str = DEFAULT_CLIP,
        pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        weights_dir: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        download: bool = True,
        progress: Progress | None = None,
    ) -> None:
        self.progress = progress
        open_clip = _import_open_clip()
        self.pretrained = pretrained
        self.weights_file = self.local_filename(model_name, pretrained) if pretrained else None
        with _normal_tensors():
            model, preprocess_val = self._build(open_clip, model_name, pretrained, weights_dir, download)
        size, mean, std = _transform_info(preprocess_val, model)
        super().__init__(model, f"{model_name}:{pretrained}" if pretrained else model_name, size, mean, std)
        self.random_weights = pretrained is None
        self.tokenizer = open_clip.get_tokenizer(model_name)
        if device is not None or dtype is not None:
            self.to(device, dtype)

    @staticmethod
    def local_filename(model_name: str, pretrained: str) -> str:
        return f"open_clip_{model_name}_{pretrained}.safetensors"

    @classmethod
    def _create(
        cls, open_clip: Any, model_name: str, pretrained: str | None, **kwargs: Any
    ) -> tuple[Any, Any]:
        try:
            model, _, preprocess_val = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, **kwargs
            )
        except RuntimeError as exc:
            if "not found" in str(exc) and "onfig" in str(exc):  # "Model config for X not found"
                raise KLoraError(f"unknown open_clip model '{model_name}': {exc}") from exc
            raise
        return model, preprocess_val

    def _build(
        self, open_clip: Any, model_name: str, tag: str | None, weights_dir: str | Path | None, download: bool
    ) -> tuple[torch.nn.Module, Any]:
        if tag is None:
            return self._create(open_clip, model_name, None)
        local = Path(weights_dir) / self.local_filename(model_name, tag) if weights_dir is not None else None
        if local is not None and local.is_file():
            kwargs = {"force_quick_gelu": True} if tag == "openai" else {}
            model, preprocess_val = self._create(open_clip, model_name, None, **kwargs)
            sd = _strip_prefix(_load_safetensors(local), "module.")
            try:
                model.load_state_dict(sd, strict=True)
            except RuntimeError as exc:
                raise ModelUnavailableError(
                    f"{local}: weights do not fit open_clip model '{model_name}': {exc}"
                ) from exc
            return model, preprocess_val
        # Checked after the local file, so custom weights with any tag name still load.
        if _clip_known_tag(open_clip, model_name, tag) is False:
            raise KLoraError(
                f"open_clip has no pretrained weights '{tag}' for model '{model_name}' "
                '(list them with: python -c "import open_clip; print(open_clip.list_pretrained())")'
            )
        reason = "downloads are disabled"
        repo = _clip_hf_repo(open_clip, model_name, tag)
        if download and local is not None and repo:  # into the weights folder, then load from there
            download_file(repo, _OPEN_CLIP_HF_FILE, local, progress=self.progress)
            return self._build(open_clip, model_name, tag, weights_dir, download=False)
        if download:
            try:
                with _library_download():
                    return self._create(open_clip, model_name, tag)
            except KLoraError:
                raise
            except Exception as exc:  # network errors come in many types across hub/requests/urllib versions
                reason = f"download failed: {type(exc).__name__}: {exc}"
        where = (
            f"Download '{_OPEN_CLIP_HF_FILE}' from the Hugging Face repo '{repo}' (https://huggingface.co/{repo})"
            if repo
            else f"Download the open_clip safetensors weights for {model_name}/{tag} from Hugging Face"
        )
        raise ModelUnavailableError(
            f"CLIP weights {model_name}/{tag} are not available ({reason}). {where} and save it as "
            f"{Path(_weights_hint(weights_dir)) / self.local_filename(model_name, tag)}"
        )

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def embed_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts → L2-normalised float32 text embeddings [N, D] (no gradient)."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        with _normal_tensors():
            tokens = self.tokenizer(texts).to(self.device)
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ModelUnavailableError(
            "DINO guidance/evaluation needs the timm package: pip install timm"
        ) from exc
    return timm


class DinoEncoder(ImageEncoder):
    """timm ViT trained with DINO; the embedding is the CLS token after the final norm (``num_classes=0``)."""

    kind = "dino"

    def __init__(
        self,
        model_name: str = DEFAULT_DINO,
        pretrained: bool = True,
        weights_dir: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        download: bool = True,
        progress: Progress | None = None,
    ) -> None:
        self.progress = progress
        timm = _import_timm()
        self.pretrained = pretrained
        self.weights_file = self.local_filename(model_name)
        with _normal_tensors():
            model = self._build(timm, model_name, pretrained, weights_dir, download)
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
        super().__init__(
            model,
            model_name,
            int(input_size[-1]),
            cfg.get("mean", (0.485, 0.456, 0.406)),
            cfg.get("std", (0.229, 0.224, 0.225)),
        )
        self.random_weights = not pretrained
        if device is not None or dtype is not None:
            self.to(device, dtype)

    @staticmethod
    def local_filename(model_name: str) -> str:
        return f"timm_{model_name}.safetensors"

    @staticmethod
    def _create(timm: Any, model_name: str, pretrained: bool) -> torch.nn.Module:
        try:
            return timm.create_model(model_name, pretrained=pretrained, num_classes=0)
        except RuntimeError as exc:
            if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
                raise KLoraError(f"unknown timm model '{model_name}': {exc}") from exc
            raise

    def _build(
        self, timm: Any, model_name: str, pretrained: bool, weights_dir: str | Path | None, download: bool
    ) -> torch.nn.Module:
        if not pretrained:
            return self._create(timm, model_name, False)
        local = Path(weights_dir) / self.local_filename(model_name) if weights_dir is not None else None
        if local is not None and local.is_file():
            model = self._create(timm, model_name, False)
            sd = _strip_prefix(_load_safetensors(local), "module.")
            missing, _unexpected = model.load_state_dict(sd, strict=False)  # a classifier head may be extra
            if missing:
                raise ModelUnavailableError(
                    f"{local}: weights do not fit timm model '{model_name}' (missing {', '.join(missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''})"
                )
            return model
        reason = "downloads are disabled"
        if download and local is not None:  # into the weights folder, then load from there
            download_file(f"timm/{model_name}", _TIMM_HF_FILE, local, progress=self.progress)
            return self._build(timm, model_name, pretrained, weights_dir, download=False)
        if download:
            try:
                with _library_download():
                    return self._create(timm, model_name, True)
            except KLoraError:
                raise
            except Exception as exc:  # network errors come in many types across hub/requests/urllib versions
                reason = f"download failed: {type(exc).__name__}: {exc}"
        repo = f"timm/{model_name}"
        raise ModelUnavailableError(
            f"DINO weights {model_name} are not available ({reason}). Download '{_TIMM_HF_FILE}' from the "
            f"Hugging Face repo '{repo}' (https://huggingface.co/{repo}) and save it as "
            f"{Path(_weights_hint(weights_dir)) / self.local_filename(model_name)}"
        )

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """Split ``MODEL[:PRETRAINED]`` into (model, tag or None)."""
    model, _, tag = spec.partition(":")
    if not model:
        raise KLoraError(
            f"bad CLIP model spec '{spec}': expected MODEL[:PRETRAINED], e.g. ViT-B-32:laion2b_s34b_b79k"
        )
    return model, (tag or None)
