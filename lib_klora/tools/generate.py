"""``python -m lib_klora generate``: one image with two LoRAs fused, from a local diffusers model.

The model is a diffusers folder (with ``model_index.json``) or a single-file checkpoint (``.safetensors``;
diffusers needs the matching config, from ``--config DIR`` or its cache). No model file is downloaded unless
``--allow-download`` is given (then ``--model`` may also be a Hugging Face repo id); reference guidance
downloads its missing CLIP/DINO/TAESD weights into ``--weights-dir``. The K-LoRA settings are
validated before any model is loaded, and so is every other option (a bad one exits with code 2 and a
message, having loaded nothing).
"""

from __future__ import annotations

import argparse
import base64
import math
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from lib_klora.errors import KLoraError
from lib_klora.loras.safetensors_header import PICKLE_SUFFIXES
from lib_klora.params.fields import CHOICES, FIELD_HELP, MAX_SEED
from lib_klora.params.model import KLoraParams
from lib_klora.params.references import decode_reference_image

MAX_STEPS = 1000
MAX_SIDE = 16384
APPLY_TO_CHOICES = ("activations", "weights")  # the engine's APPLY_TO (torch-free here)
APPLY_TO_HELP = (
    "activations: forward hooks add the chosen LoRA's delta to each layer's output (every method). "
    "weights: the chosen ΔW is written into the weights at each layer's switch steps and copied back "
    "bit for bit afterwards (K-LoRA and the baselines; no per-step cost, a CPU copy of the adapted weights)"
)
SINGLE_FILE_PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


class ModelFilesError(KLoraError):
    """The model cannot be loaded from local files."""


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "method": args.method,
        "pattern": args.pattern,
        "alpha": args.alpha,
        "beta": args.beta,
        "gamma": args.gamma,
        "seed": args.seed,
        "subject_strength": args.subject_strength,
        "style_strength": args.style_strength,
        "te_policy": args.te_policy,
    }
    refs = {"style_refs": args.style_ref, "subject_refs": args.subject_ref}
    if any(refs.values()):
        settings["guidance"] = True
        settings["guidance_decoder"] = args.guidance_decoder
        for field, files in refs.items():
            settings[field] = [_reference(f) for f in files]
    return {k: v for k, v in settings.items() if v is not None}


def _reference(file: str) -> str:
    """A reference image file as the parameter model takes it (base64), decoded once to check it."""
    path = Path(file)
    if not path.is_file():
        raise KLoraError(f"reference image not found: {file}")
    data = path.read_bytes()
    decode_reference_image(data, name=file)
    return base64.b64encode(data).decode("ascii")


def _image_file(option: str, file: str) -> None:
    """An output file whose extension Pillow can write."""
    Image.init()
    extension = Path(file).suffix.lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise KLoraError(f"{option} {file}: not an image file name Pillow can write (e.g. .png, .jpg, .webp)")
    if Path(file).is_dir():
        raise KLoraError(f"{option} {file}: is a folder")


def _check_model_path(args: argparse.Namespace) -> None:
    model = Path(args.model)
    if model.is_file() and model.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFilesError(
            f"{model}: pickle checkpoints are not loaded (unpickling can run arbitrary code); use the "
            "model's .safetensors file or a diffusers folder"
        )
    if model.is_dir() and not (model / "model_index.json").is_file():
        raise _missing(args.model, f"{model} has no model_index.json")
    if not model.exists() and not args.allow_download:
        raise _missing(args.model, "no such file or folder")
    if args.config is not None and not Path(args.config).is_dir():
        raise KLoraError(
            f"--config {args.config}: not a folder (give a diffusers folder of the same model type)"
        )


def _check_device(device: str) -> None:
    import torch  # no model: only the device name and whether the machine has it

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise KLoraError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:0, mps ...)") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if kind in available and not available[kind]():
        raise KLoraError(f"--device {device}: this machine has no {kind} device")


def check_options(args: argparse.Namespace) -> KLoraParams:
    """Every option, checked before anything is loaded; the validated K-LoRA parameters."""
    from lib_klora.engines.torch_module import check_apply_to, klora_params

    if not 0 < args.steps <= MAX_STEPS:
        raise KLoraError(f"--steps must be 1 to {MAX_STEPS}")
    for what, path in (("subject", args.subject), ("style", args.style)):
        if not Path(path).is_file():
            raise KLoraError(f"{what} LoRA not found: {path}")
    for option, side in (("--width", args.width), ("--height", args.height)):
        if side is not None and not (0 < side <= MAX_SIDE and side % 8 == 0):
            raise KLoraError(f"{option} must be a multiple of 8 from 8 to {MAX_SIDE}, got {side}")
    if args.guidance_scale is not None and not (
        math.isfinite(args.guidance_scale) and args.guidance_scale >= 0
    ):
        raise KLoraError(f"--guidance-scale must be a finite number ≥ 0, got {args.guidance_scale}")
    if not 0 <= args.image_seed <= MAX_SEED:
        raise KLoraError(f"--image-seed must be 0 to {MAX_SEED}, got {args.image_seed}")
    _image_file("--out", args.out)
    if args.map is not None:
        _image_file("--map", args.map)
    if args.weights_dir is not None and Path(args.weights_dir).is_file():
        raise KLoraError(f"--weights-dir {args.weights_dir}: not a folder")
    params: KLoraParams = klora_params(args.subject, args.style, _settings(args))
    check_apply_to(args.apply_to, params)
    if params.uses_guidance and params.guidance_decoder == "taesd" and args.weights_dir is None:
        raise KLoraError("--guidance-decoder taesd needs --weights-dir (the decoder is read from there)")
    _check_model_path(args)
    _check_device(args.device)
    return params


def _missing(model: str, detail: str) -> ModelFilesError:
    return ModelFilesError(
        f"cannot load the model {model!r} from local files ({detail}). Give a local diffusers folder "
        "(with model_index.json) or a single-file .safetensors checkpoint with --pipeline sd|sdxl|sd3|flux "
        "(and --config DIR, a diffusers folder of the same model type, when diffusers has no cached config "
        "for it). Nothing is downloaded unless you add --allow-download."
    )


def load_pipeline(args: argparse.Namespace) -> Any:
    """The diffusers pipeline of `args.model`, from local files only unless --allow-download."""
    try:
        import diffusers
        import torch
    except ImportError:
        raise ModelFilesError(
            "the generate command needs diffusers: pip install diffusers transformers"
        ) from None
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = Path(args.model)
    local_only = not args.allow_download
    _check_model_path(args)
    try:
        if model.is_file():
            cls = getattr(diffusers, SINGLE_FILE_PIPELINES[args.pipeline])
            extra = {"config": args.config} if args.config else {}
            return cls.from_single_file(str(model), torch_dtype=dtype, local_files_only=local_only, **extra)
        return diffusers.DiffusionPipeline.from_pretrained(
            args.model, torch_dtype=dtype, local_files_only=local_only
        )
    except (OSError, ValueError) as exc:
        raise _missing(args.model, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def cmd_generate(args: argparse.Namespace) -> int:
    params = check_options(args)
    pipe = load_pipeline(args)
    import torch

    from lib_klora.diffusers import apply_klora

    pipe.to(args.device)
    call: dict[str, Any] = {"prompt": args.prompt, "num_inference_steps": args.steps}
    for key in ("negative_prompt", "guidance_scale", "width", "height"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)
    call["generator"] = torch.Generator(device="cpu").manual_seed(args.image_seed)
    with apply_klora(
        pipe,
        args.subject,
        args.style,
        params,
        prompt=args.prompt,
        guidance_weights_dir=args.weights_dir,
        apply_to=args.apply_to,
    ) as fusion:
        image = pipe(**call).images[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote image: {out}")
    if fusion.skipped:
        print(f"LoRA layers this model does not have (ignored): {len(fusion.skipped)}", file=sys.stderr)
    if args.map:
        fusion.selection_map().save(args.map)
        print(f"wrote selection map: {args.map}")
    return 0


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate an image with the two LoRAs fused (needs diffusers and a local model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("subject", help="subject (content) LoRA, .safetensors")
    p.add_argument("style", help="style LoRA, .safetensors")
    p.add_argument(
        "--model", required=True, metavar="DIR_OR_FILE", help="diffusers folder or .safetensors file"
    )
    p.add_argument(
        "--prompt", required=True, help="the prompt (name the subject's and the style's trigger words)"
    )
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default none)")
    p.add_argument("--steps", type=int, default=30, help=f"sampling steps (1-{MAX_STEPS}, default 30)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (the pipeline's default)")
    p.add_argument(
        "--width", type=int, default=None, help="image width, a multiple of 8 (the pipeline's default)"
    )
    p.add_argument(
        "--height", type=int, default=None, help="image height, a multiple of 8 (the pipeline's default)"
    )
    p.add_argument("--image-seed", type=int, default=0, help=f"seed of the initial noise (0-{MAX_SEED})")
    p.add_argument(
        "--out", default="klora.png", help="image file to write (.png, .jpg ...; default ./klora.png)"
    )
    p.add_argument(
        "--map", default=None, help="also write the selection map (layers x steps) here, an image file"
    )
    p.add_argument("--method", choices=CHOICES["method"], default="klora", help=FIELD_HELP["method"])
    p.add_argument("--pattern", choices=CHOICES["pattern"], default="s", help=FIELD_HELP["pattern"])
    p.add_argument("--alpha", type=float, default=None, help=FIELD_HELP["alpha"])
    p.add_argument("--beta", type=float, default=None, help=FIELD_HELP["beta"])
    p.add_argument("--gamma", choices=CHOICES["gamma"], default=None, help=FIELD_HELP["gamma"])
    p.add_argument("--seed", type=int, default=None, help=FIELD_HELP["seed"])
    p.add_argument("--subject-strength", type=float, default=None, help=FIELD_HELP["subject_strength"])
    p.add_argument("--style-strength", type=float, default=None, help=FIELD_HELP["style_strength"])
    p.add_argument("--te-policy", choices=CHOICES["te_policy"], default=None, help=FIELD_HELP["te_policy"])
    p.add_argument("--apply-to", choices=APPLY_TO_CHOICES, default="activations", help=APPLY_TO_HELP)
    p.add_argument(
        "--style-ref", action="append", default=[], help="style reference image (turns on guidance)"
    )
    p.add_argument("--subject-ref", action="append", default=[], help="subject reference image (guidance)")
    p.add_argument(
        "--guidance-decoder",
        choices=CHOICES["guidance_decoder"],
        default="vae",
        help=FIELD_HELP["guidance_decoder"]
        + " taesd reads the decoder of the model's latents from --weights-dir.",
    )
    p.add_argument(
        "--weights-dir",
        default=None,
        help="folder of the guidance weights (CLIP/DINO, TAESD decoders); missing ones are downloaded there",
    )
    p.add_argument("--pipeline", choices=sorted(SINGLE_FILE_PIPELINES), default="sd", help="single-file type")
    p.add_argument("--config", default=None, metavar="DIR", help="local diffusers config for a single file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="model precision")
    p.add_argument("--allow-download", action="store_true", help="let diffusers download missing files")
    p.set_defaults(func=cmd_generate)
    return p
