"""World validity, measured by the judges on the shipped weights.

    python -m lib_klora.tools.world.validity [--seeds 72] [--steps 25] [--cfg 4] [--grid out.png]

Bars (issue 14): the base draws prompted generic combinations (object ≥ 85%, style ≥ 85%); each subject LoRA
alone draws its subject (≥ 85%); each style LoRA alone draws its style on generic objects (≥ 85%); the base
alone does not draw an unseen subject or style (≤ 10%). Prints one ``RESULT`` line and records the figures in
the manifest (``--no-record`` to leave it alone).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import render as R
from .judges import Judges
from .lora import DEFAULT_LORAS, merged_unet
from .model import load_world, sample

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


def measure(
    weights_dir: Path | None = None,
    n_seeds: int = 72,
    steps: int = 25,
    cfg: float = 4.0,
    seed0: int = 10_000,
    grid: Path | None = None,
    log=None,
) -> dict:
    unet, te, tok, _ = load_world(weights_dir)
    judges = Judges.load(weights_dir)
    wdir = Path(weights_dir) if weights_dir else Path(__file__).parent / "weights"
    seeds = list(range(seed0, seed0 + n_seeds))
    figures: dict[str, float] = {}
    sheets = []
    t0 = time.time()

    def run(model, prompts):
        imgs = sample(model, te, prompts, seeds, steps=steps, cfg=cfg, tokenizer=tok).numpy()
        objs, stys = judges(imgs)
        sheets.append(imgs[:12])
        return imgs, objs, stys

    prompts = _prompts_generic(n_seeds)
    _, objs, stys = run(unet, prompts)
    truth = [R.parse_caption(p) for p in prompts]
    figures["base_object"] = float(np.mean([o == t[0] for o, t in zip(objs, truth, strict=True)]))
    figures["base_style"] = float(np.mean([s == t[1] for s, t in zip(stys, truth, strict=True)]))
    unseen_subject, unseen_style = [], []
    for token in R.SUBJECTS:
        _, objs, _ = run(unet, _prompts_subject(token, n_seeds))
        unseen_subject.append(float(np.mean([o == token for o in objs])))
    for token in R.UNSEEN_STYLES:
        _, _, stys = run(unet, _prompts_style(token, n_seeds))
        unseen_style.append(float(np.mean([s == token for s in stys])))
    figures["base_unseen_subject"] = max(unseen_subject)
    figures["base_unseen_style"] = max(unseen_style)
    if log:
        log(f"base done ({time.time() - t0:.0f}s): {figures}")
    for spec in DEFAULT_LORAS:
        model = merged_unet(unet, wdir / f"{spec.name}.safetensors")
        if spec.kind == "subject":
            prompts = _prompts_subject(spec.token, n_seeds)
            _, objs, stys = run(model, prompts)
            figures[spec.name] = float(np.mean([o == spec.token for o in objs]))
            truth = [R.parse_caption(p)[1] for p in prompts]
            figures[f"{spec.name}_style"] = _share(stys, truth)
        else:
            prompts = _prompts_style(spec.token, n_seeds)
            _, objs, stys = run(model, prompts)
            figures[spec.name] = float(np.mean([s == spec.token for s in stys]))
            truth = [R.parse_caption(p)[0] for p in prompts]
            figures[f"{spec.name}_object"] = float(
                np.mean([o == t for o, t in zip(objs, truth, strict=True)])
            )
        if log:
            log(f"{spec.name}: {figures[spec.name]:.3f} ({time.time() - t0:.0f}s)")
    high = ["base_object", "base_style", *[s.name for s in DEFAULT_LORAS]]
    low = ["base_unseen_subject", "base_unseen_style"]
    result = {
        "figures": figures,
        "world_valid": min(figures[k] for k in high),
        "unseen_max": max(figures[k] for k in low),
        "passed": all(figures[k] >= BAR_HIGH for k in high) and all(figures[k] <= BAR_LOW for k in low),
        "protocol": {"seeds": n_seeds, "seed0": seed0, "steps": steps, "cfg": cfg, "sampler": "DDIM"},
        "seconds": round(time.time() - t0, 1),
    }
    if grid is not None:
        R.contact_sheet(np.concatenate(sheets), cols=12, scale=3).save(grid)
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
    ap.add_argument("--seeds", type=int, default=72, help="seeds per measurement (default 72)")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    ap.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--grid", type=Path, default=None, help="write a PNG contact sheet of the first images")
    ap.add_argument("--no-record", action="store_true", help="do not write the figures into the manifest")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(m: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    result = measure(args.weights, args.seeds, args.steps, args.cfg, grid=args.grid, log=log)
    line = result_line(result)
    print(line, flush=True)
    if not args.no_record:
        from .train import WEIGHTS, update_manifest

        update_manifest(
            args.weights or WEIGHTS, lambda m: m.__setitem__("validity", {**result, "result_line": line})
        )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
