"""K-LoRA's Table 1 metrics for generated images, and the ``eval`` command.

Protocol (klora-algorithm.md §5): cosine similarity of L2-normalised embeddings ×100, averaged over all
(generated image, reference) pairs:

* Style Sim: CLIP image embedding vs. the style references;
* CLIP-I (the paper's "CLIP Score"): CLIP image embedding vs. the subject references;
* DINO: DINO ViT CLS embedding vs. the subject references.

Defaults follow the DreamBooth convention the spec recommends: CLIP ViT-L/14 (OpenAI) and DINO ViT-S/16. They
differ from the guidance CLIP (ViT-B/32), since LLR optimises these very similarities (dynamic-fusion.md §3.2,
"metric hacking"); for a fully independent check also pass ``--dino vit_base_patch16_224.dino``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib_klora.errors import KLoraError
from lib_klora.fusion.scores import resolve_device
from lib_klora.guidance.encoders import ClipImageEncoder, DinoEncoder, parse_clip_spec

DEFAULT_EVAL_CLIP = "ViT-L-14:openai"
DEFAULT_EVAL_DINO = "vit_small_patch16_224.dino"
# Tags used when --clip names a model only.
DEFAULT_CLIP_TAGS = {"ViT-L-14": "openai", "ViT-B-32": "laion2b_s34b_b79k", "ViT-B-16": "laion2b_s34b_b88k"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROTOCOL = "cosine of L2-normalised embeddings x100, mean over all (image, reference) pairs"
RANDOM_NOTE = "RANDOM WEIGHTS: randomly initialised encoders, for tests/demos only; the numbers mean nothing"
_METRICS = (
    ("style_sim", "Style Sim", "CLIP image vs style refs"),
    ("clip_i", "CLIP-I", "CLIP image vs subject refs"),
    ("dino", "DINO", "DINO CLS vs subject refs"),
)

ImageInput = Image.Image | str | Path


def list_images(folder: str | Path, *, what: str = "image") -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; a clear error when there are none."""
    p = Path(folder)
    if not p.exists():
        raise KLoraError(f"{what} folder not found: {p}")
    if not p.is_dir():
        raise KLoraError(f"{what} folder is not a folder: {p}")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KLoraError(f"{what} folder has no images ({', '.join(IMAGE_SUFFIXES)}): {p}")
    return files


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders given on the command line into image files."""
    if not paths:
        raise KLoraError("no images given: name the generated image files (or folders) to evaluate")
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            out.extend(list_images(p, what="generated-image"))
        elif p.is_file():
            out.append(p)
        else:
            raise KLoraError(f"image not found: {p}")
    return out


def load_image(path: str | Path) -> Image.Image:
    """An RGB image, or a :class:`KLoraError` naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise KLoraError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _load_all(items: Sequence[ImageInput]) -> tuple[list[Image.Image], list[str]]:
    images, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            images.append(item.convert("RGB"))
            names.append(f"#{i}")
        else:
            images.append(load_image(item))
            names.append(str(item))
    return images, names


def build_eval_encoders(
    clip: str = DEFAULT_EVAL_CLIP,
    dino: str = DEFAULT_EVAL_DINO,
    *,
    pretrained: bool = True,
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    download: bool = True,
) -> tuple[ClipImageEncoder, DinoEncoder]:
    """The two evaluation encoders. ``pretrained=False`` gives seeded random weights (tests, demos)."""
    model, tag = parse_clip_spec(clip)
    dev = resolve_device(device)
    if pretrained:
        tag = tag or DEFAULT_CLIP_TAGS.get(model)
        if tag is None:
            raise KLoraError(f"--clip {clip}: name the pretrained weights too, as MODEL:PRETRAINED")
        c = ClipImageEncoder(model, tag, weights_dir, device=dev, download=download)
        d = DinoEncoder(dino, True, weights_dir, device=dev, download=download)
    else:
        with torch.random.fork_rng(devices=[]):  # same random encoders on every run, global RNG untouched
            torch.manual_seed(0)
            c = ClipImageEncoder(model, None, device=dev)
            d = DinoEncoder(dino, False, device=dev)
    return c, d


def _pair_means(gen: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Per generated image: mean cosine ×100 over the references."""
    return (gen @ refs.T).mean(dim=1) * 100.0


def evaluate(
    images: Sequence[ImageInput],
    subject_refs: Sequence[ImageInput],
    style_refs: Sequence[ImageInput],
    *,
    clip: str = DEFAULT_EVAL_CLIP,
    dino: str = DEFAULT_EVAL_DINO,
    pretrained: bool = True,
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    download: bool = True,
    encoders: tuple[ClipImageEncoder, DinoEncoder] | None = None,
) -> dict[str, Any]:
    """Style Sim, CLIP-I and DINO (×100) of ``images`` against the references; PIL images or paths.

    A metric whose references are empty is ``None``. ``encoders`` reuses already built (clip, dino) encoders.
    """
    if not images:
        raise KLoraError("no images to evaluate")
    if not subject_refs and not style_refs:
        raise KLoraError("no reference images: give subject and/or style references")
    gen, names = _load_all(images)
    subj, _ = _load_all(subject_refs)
    sty, _ = _load_all(style_refs)
    c, d = encoders or build_eval_encoders(
        clip, dino, pretrained=pretrained, weights_dir=weights_dir, device=device, download=download
    )
    gen_clip = c.embed_pil(gen)
    per: dict[str, torch.Tensor | None] = {"style_sim": None, "clip_i": None, "dino": None}
    if sty:
        per["style_sim"] = _pair_means(gen_clip, c.embed_pil(sty))
    if subj:
        per["clip_i"] = _pair_means(gen_clip, c.embed_pil(subj))
        per["dino"] = _pair_means(d.embed_pil(gen), d.embed_pil(subj))
    random = c.random_weights or d.random_weights
    result: dict[str, Any] = {
        key: (None if v is None else round(float(v.mean()), 4)) for key, v in per.items()
    }
    result.update(
        {
            "per_image": [
                {"image": name, **{k: (None if v is None else round(float(v[i]), 4)) for k, v in per.items()}}
                for i, name in enumerate(names)
            ],
            "counts": {"images": len(gen), "subject_refs": len(subj), "style_refs": len(sty)},
            "models": {"clip": c.name, "dino": d.name},
            "random_weights": random,
            "protocol": PROTOCOL,
        }
    )
    if random:
        result["note"] = RANDOM_NOTE
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text report of :func:`evaluate`'s result."""

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    n = result["counts"]
    lines = []
    if result.get("random_weights"):
        lines += [f"*** {RANDOM_NOTE} ***"]
    lines += [
        f"K-LoRA Table 1 metrics ({PROTOCOL})",
        f"CLIP {result['models']['clip']}   DINO {result['models']['dino']}",
        f"images {n['images']}   subject refs {n['subject_refs']}   style refs {n['style_refs']}",
        "",
        f"{'metric':<10} {'value':>7}   measured as",
    ]
    lines += [f"{label:<10} {cell(result[key]):>7}   {what}" for key, label, what in _METRICS]
    if len(result["per_image"]) > 1:
        width = min(max(len(Path(r["image"]).name) for r in result["per_image"]), 40)
        lines += ["", f"{'image':<{width}} " + " ".join(f"{label:>9}" for _, label, _ in _METRICS)]
        for row in result["per_image"]:
            name = Path(row["image"]).name[:width]
            lines.append(f"{name:<{width}} " + " ".join(f"{cell(row[key]):>9}" for key, _, _ in _METRICS))
    return "\n".join(lines)


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object; it dispatches to :func:`cmd_eval`."""
    p = subparsers.add_parser(
        "eval",
        help="score generated images: Style Sim, CLIP-I, DINO (K-LoRA Table 1)",
        description=f"K-LoRA Table 1 metrics: {PROTOCOL}.",
    )
    p.add_argument("images", nargs="*", help="generated images (files or folders)")
    p.add_argument("--subject-refs", required=True, metavar="DIR", help="folder of subject reference images")
    p.add_argument("--style-refs", required=True, metavar="DIR", help="folder of style reference images")
    p.add_argument(
        "--clip",
        default=DEFAULT_EVAL_CLIP,
        metavar="MODEL[:PRETRAINED]",
        help=f"open_clip model and weights (default {DEFAULT_EVAL_CLIP})",
    )
    p.add_argument(
        "--dino", default=DEFAULT_EVAL_DINO, metavar="MODEL", help=f"timm model ({DEFAULT_EVAL_DINO})"
    )
    p.add_argument(
        "--weights-dir",
        default=None,
        metavar="DIR",
        help="folder with open_clip_<model>_<tag>.safetensors / timm_<model>.safetensors",
    )
    p.add_argument("--offline", action="store_true", help="never download weights; use --weights-dir only")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:0 ...")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON here ('-' for stdout)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="randomly initialised encoders (tests/demos; clearly labelled, the numbers mean nothing)",
    )
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``eval``: table on stdout (stderr when the JSON goes to stdout); KLoraError on bad input."""
    if args.offline and args.weights_dir is None and not args.random_weights:
        raise KLoraError(
            "--offline needs --weights-dir DIR: the folder holding open_clip_<model>_<tag>.safetensors and "
            "timm_<model>.safetensors (or leave out --offline to download them)"
        )
    files = collect_images(args.images)
    subject = list_images(args.subject_refs, what="subject reference")
    style = list_images(args.style_refs, what="style reference")
    result = evaluate(
        files,
        subject,
        style,
        clip=args.clip,
        dino=args.dino,
        pretrained=not args.random_weights,
        weights_dir=args.weights_dir,
        device=args.device,
        download=not args.offline,
    )
    table = format_table(result)
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(table, file=sys.stderr)
        print(text)
    else:
        print(table)
        if args.json:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0
