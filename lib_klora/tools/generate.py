"""``python -m lib_klora generate``: one image with two LoRAs fused, from a local diffusers model.

The model is a diffusers folder (with ``model_index.json``) or a single-file checkpoint (``.safetensors``;
diffusers needs the matching config, from ``--config DIR`` or its cache). Nothing is downloaded unless
``--allow-download`` is given (then ``--model`` may also be a Hugging Face repo id). The K-LoRA settings are
validated before any model is loaded.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

from lib_klora.errors import KLoraError
from lib_klora.params.fields import CHOICES, FIELD_HELP
from lib_klora.params.model import KLoraParams

MAX_STEPS = 1000
SINGLE_FILE_PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
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
        settings["guidance_decoder"] = "vae"
        for field, files in refs.items():
            settings[field] = [base64.b64encode(Path(f).read_bytes()).decode("ascii") for f in files]
    return {k: v for k, v in settings.items() if v is not None}


def _missing(model: str, detail: str) -> ModelFilesError:
    return ModelFilesError(
        f"cannot load the model {model!r} from local files ({detail}). Give a local diffusers folder "
        "(with model_index.json) or a single-file .safetensors checkpoint with --pipeline sd|sdxl|flux "
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
    try:
        if model.is_file():
            cls = getattr(diffusers, SINGLE_FILE_PIPELINES[args.pipeline])
            extra = {"config": args.config} if args.config else {}
            return cls.from_single_file(str(model), torch_dtype=dtype, local_files_only=local_only, **extra)
        if model.is_dir() and not (model / "model_index.json").is_file():
            raise _missing(args.model, f"{model} has no model_index.json")
        if not model.exists() and local_only:
            raise _missing(args.model, "no such file or folder")
        return diffusers.DiffusionPipeline.from_pretrained(
            args.model, torch_dtype=dtype, local_files_only=local_only
        )
    except (OSError, ValueError) as exc:
        raise _missing(args.model, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from lib_klora.engines.torch_module import klora_params

    if not 0 < args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be 1 to {MAX_STEPS}")
    for what, path in (("subject", args.subject), ("style", args.style)):
        if not Path(path).is_file():
            raise KLoraError(f"{what} LoRA not found: {path}")
    params: KLoraParams = klora_params(args.subject, args.style, _settings(args))  # checked before loading
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
        pipe, args.subject, args.style, params, prompt=args.prompt, guidance_weights_dir=args.weights_dir
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
    p.add_argument("--width", type=int, default=None, help="image width (the pipeline's default)")
    p.add_argument("--height", type=int, default=None, help="image height (the pipeline's default)")
    p.add_argument("--image-seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--out", default="klora.png", help="image file to write (default ./klora.png)")
    p.add_argument("--map", default=None, help="also write the selection map (layers x steps) here")
    p.add_argument("--method", choices=CHOICES["method"], default="klora", help=FIELD_HELP["method"])
    p.add_argument("--pattern", choices=CHOICES["pattern"], default="s", help=FIELD_HELP["pattern"])
    p.add_argument("--alpha", type=float, default=None, help=FIELD_HELP["alpha"])
    p.add_argument("--beta", type=float, default=None, help=FIELD_HELP["beta"])
    p.add_argument("--gamma", choices=CHOICES["gamma"], default=None, help=FIELD_HELP["gamma"])
    p.add_argument("--seed", type=int, default=None, help="seed of the random baseline")
    p.add_argument("--subject-strength", type=float, default=None, help=FIELD_HELP["subject_strength"])
    p.add_argument("--style-strength", type=float, default=None, help=FIELD_HELP["style_strength"])
    p.add_argument("--te-policy", choices=CHOICES["te_policy"], default=None, help="text-encoder LoRAs")
    p.add_argument(
        "--style-ref", action="append", default=[], help="style reference image (turns on guidance)"
    )
    p.add_argument("--subject-ref", action="append", default=[], help="subject reference image (guidance)")
    p.add_argument("--weights-dir", default=None, help="CLIP/DINO weights for guidance")
    p.add_argument("--pipeline", choices=sorted(SINGLE_FILE_PIPELINES), default="sd", help="single-file type")
    p.add_argument("--config", default=None, metavar="DIR", help="local diffusers config for a single file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="model precision")
    p.add_argument("--allow-download", action="store_true", help="let diffusers download missing files")
    p.set_defaults(func=cmd_generate)
    return p
