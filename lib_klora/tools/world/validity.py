"""World validity, measured by the judges on the shipped weights.

    python -m lib_klora.tools.world.validity [--seeds 64] [--steps 25] [--cfg 4] [--grid out.png]

Bars (issue 14): the base draws prompted generic combinations (object ≥ 85%, style ≥ 85%); each subject LoRA
alone draws its subject (≥ 85%); each style LoRA alone draws its style on generic objects (≥ 85%); the base
alone does not draw an unseen subject or style (≤ 10%). Prints one ``RESULT`` line and records the figures in
the manifest (``--no-record`` to leave it alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lib_klora.tools.world import render as R
from lib_klora.tools.world.judges import Judges
from lib_klora.tools.world.lora import DEFAULT_LORAS, merged_unet
from lib_klora.tools.world.model import load_world, sample

BAR_HIGH = 0.85
BAR_LOW = 0.10


def _share(seen: list[str], truth: list[str]) -> float:
    return float(np.mean([a == b for a, b in zip(seen, truth, strict=True)]))


def _prompts_subject(token: str, n: int) -> list[str]:
    return [R.caption(token, R.GENERIC_STYLES[i % len(R.GENERIC_STYLES)]) for i in range(n)]


def _prompts_style(token: str, n: int) -> list[str]:
    return [R.caption(R.GENERIC_OBJECTS[i % len(R.GENERIC_OBJECTS)], token) for i in range(n)]


def _prompts_generic(n: int) -> list[str]:
    combos = [(o, s) for o in R.GENERIC_OBJECTS for s in R.GENERIC_STYLES]
    return [R.caption(*combos[i % len(combos)]) for i in range(n)]


def generate(
    weights_dir: Path | None = None,
    n_seeds: int = 64,
    steps: int = 25,
    cfg: float = 4.0,
    seed0: int = 10_000,
    log=None,
    only: set[str] | None = None,
) -> dict[str, dict]:
    """The validity images: {group: {"model", "prompts", "images"}} (base groups and one per LoRA)."""
    unet, te, tok, _ = load_world(weights_dir)
    wdir = Path(weights_dir) if weights_dir else Path(__file__).parent / "weights"
    seeds = list(range(seed0, seed0 + n_seeds))
    t0 = time.time()
    groups: dict[str, dict] = {}

    def run(name: str, model, prompts: list[str], model_name: str) -> None:
        if only and name not in only:
            return
        imgs = sample(model, te, prompts, seeds, steps=steps, cfg=cfg, tokenizer=tok).numpy()
        imgs = np.round(imgs * 255.0) / 255.0  # judged as 8-bit images, like a saved PNG
        groups[name] = {"model": model_name, "prompts": prompts, "images": imgs}
        if log:
            log(f"{name}: {len(prompts)} images ({time.time() - t0:.0f}s)")

    run("base_generic", unet, _prompts_generic(n_seeds), "base")
    # the unseen tokens on the base, the three cycled over the seeds
    subj = [R.caption(R.SUBJECTS[i % 3], R.GENERIC_STYLES[(i // 3) % 6]) for i in range(n_seeds)]
    run("base_unseen_subjects", unet, subj, "base")
    sty = [R.caption(R.GENERIC_OBJECTS[(i // 3) % 6], R.UNSEEN_STYLES[i % 3]) for i in range(n_seeds)]
    run("base_unseen_styles", unet, sty, "base")
    for spec in DEFAULT_LORAS:
        if only and spec.name not in only:
            continue
        model = merged_unet(unet, wdir / f"{spec.name}.safetensors")
        prompts = (
            _prompts_subject(spec.token, n_seeds)
            if spec.kind == "subject"
            else _prompts_style(spec.token, n_seeds)
        )
        run(spec.name, model, prompts, spec.name)
    return groups


def score(groups: dict[str, dict], judges: Judges) -> dict[str, float]:
    figures: dict[str, float] = {}
    seen = {}
    for name, g in groups.items():
        objs, stys = judges(g["images"])
        truth = [R.parse_caption(p) for p in g["prompts"]]
        seen[name] = (objs, stys, truth)
    objs, stys, truth = seen["base_generic"]
    figures["base_object"] = _share(objs, [t[0] for t in truth])
    figures["base_style"] = _share(stys, [t[1] for t in truth])
    objs, _, truth = seen["base_unseen_subjects"]
    figures["base_unseen_subject"] = _share(objs, [t[0] for t in truth])
    _, stys, truth = seen["base_unseen_styles"]
    figures["base_unseen_style"] = _share(stys, [t[1] for t in truth])
    for spec in DEFAULT_LORAS:
        objs, stys, truth = seen[spec.name]
        if spec.kind == "subject":
            figures[spec.name] = _share(objs, [t[0] for t in truth])
            figures[f"{spec.name}_style"] = _share(stys, [t[1] for t in truth])
        else:
            figures[spec.name] = _share(stys, [t[1] for t in truth])
            figures[f"{spec.name}_object"] = _share(objs, [t[0] for t in truth])
    return figures


def summarize(figures: dict[str, float], protocol: dict) -> dict:
    high = ["base_object", "base_style", *[s.name for s in DEFAULT_LORAS]]
    low = ["base_unseen_subject", "base_unseen_style"]
    return {
        "figures": figures,
        "world_valid": min(figures[k] for k in high),
        "unseen_max": max(figures[k] for k in low),
        "passed": all(figures[k] >= BAR_HIGH for k in high) and all(figures[k] <= BAR_LOW for k in low),
        "protocol": protocol,
    }


def save_groups(groups: dict[str, dict], path: Path) -> None:
    arrays = {f"{k}__images": np.round(g["images"] * 255).astype(np.uint8) for k, g in groups.items()}
    meta = {k: {"model": g["model"], "prompts": g["prompts"]} for k, g in groups.items()}
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)


def load_groups(path: Path) -> dict[str, dict]:
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    return {k: {**m, "images": data[f"{k}__images"].astype(np.float32) / 255.0} for k, m in meta.items()}


def measure(
    weights_dir: Path | None = None,
    n_seeds: int = 64,
    steps: int = 25,
    cfg: float = 4.0,
    seed0: int = 10_000,
    grid: Path | None = None,
    log=None,
    images_out: Path | None = None,
) -> dict:
    t0 = time.time()
    groups = generate(weights_dir, n_seeds, steps, cfg, seed0, log)
    if images_out is not None:
        save_groups(groups, images_out)
    protocol = {
        "seeds": n_seeds,
        "seed0": seed0,
        "steps": steps,
        "cfg": cfg,
        "sampler": "DDPM ancestral, trailing, x0 clipped",
    }
    result = summarize(score(groups, Judges.load(weights_dir)), protocol)
    result["seconds"] = round(time.time() - t0, 1)
    if grid is not None:
        R.contact_sheet(np.concatenate([g["images"][:12] for g in groups.values()]), cols=12, scale=3).save(
            grid
        )
    return result


def result_line(result: dict) -> str:
    f = result["figures"]
    parts = [f"world_valid={result['world_valid']:.3f}", f"unseen_max={result['unseen_max']:.3f}"]
    parts += [f"{k}={v:.3f}" for k, v in f.items()]
    parts.append(f"passed={int(result['passed'])}")
    return "RESULT " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib_klora.tools.world.validity", description=__doc__)
    ap.add_argument("--weights", type=Path, default=None, help="weights folder (default: the shipped one)")
    ap.add_argument("--seeds", type=int, default=64, help="seeds per measurement (default 64)")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    ap.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--grid", type=Path, default=None, help="write a PNG contact sheet of the first images")
    ap.add_argument("--images", type=Path, default=None, help="save the generated images (.npz)")
    ap.add_argument(
        "--rejudge", type=Path, nargs="+", default=None, help="score saved images (.npz) instead of sampling"
    )
    ap.add_argument("--only", nargs="+", default=None, help="generate only these groups into --images")
    ap.add_argument("--no-record", action="store_true", help="do not write the figures into the manifest")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(m: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    if args.only:  # generate a subset of the groups (to run them side by side), save, no score
        groups = generate(args.weights, args.seeds, args.steps, args.cfg, log=log, only=set(args.only))
        save_groups(groups, args.images)
        return 0
    if args.rejudge is not None:
        groups = {k: v for path in args.rejudge for k, v in load_groups(path).items()}
        n = len(next(iter(groups.values()))["prompts"])
        protocol = {
            "seeds": n,
            "steps": args.steps,
            "cfg": args.cfg,
            "sampler": "DDPM ancestral, trailing, x0 clipped",
            "images": [p.name for p in args.rejudge],
        }
        result = summarize(score(groups, Judges.load(args.weights)), protocol)
    else:
        result = measure(
            args.weights, args.seeds, args.steps, args.cfg, grid=args.grid, log=log, images_out=args.images
        )
    line = result_line(result)
    print(line, flush=True)
    if not args.no_record:
        from lib_klora.tools.world.train import WEIGHTS, update_manifest

        update_manifest(
            args.weights or WEIGHTS, lambda m: m.__setitem__("validity", {**result, "result_line": line})
        )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
